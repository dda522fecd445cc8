"""What a recipe needs to run as several processes (`accelerate launch`, docs/scaling.md): files
written by one process only, decisions made once and shared, and the whole model for its
evaluations when ZeRO-3 shards it."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path


def is_main_process(training_args) -> bool:
    return training_args.process_index == 0


def on_main_process(training_args, fn):
    """`fn()` run by the main process alone, its result returned on every process (the others
    wait for it). When it raises, the main process raises that error and the others one naming
    it, so none is left waiting."""
    if training_args.world_size == 1:
        return fn()
    from accelerate.utils import broadcast_object_list

    box, error = [None], None
    if is_main_process(training_args):
        try:
            box = [(True, fn())]
        except Exception as e:  # noqa: BLE001  (raised below, after the others are told)
            box, error = [(False, f"{type(e).__name__}: {e}")], e
    broadcast_object_list(box, from_process=0)
    ok, value = box[0]
    if error is not None:
        raise error
    if not ok:
        raise RuntimeError(f"the main process stopped: {value}")
    return value


def read_summary(out: Path, resume: str | None) -> tuple[Path, str | None, dict]:
    """`prepare_run_folder`'s answer with the folder's last summary.json ({} when none)."""
    path = Path(out) / "summary.json"
    return out, resume, json.loads(path.read_text()) if path.exists() else {}


@contextlib.contextmanager
def whole_model(model, trainer=None):
    """`model` with whole parameters for generate(): under ZeRO-3 they are gathered on every rank
    for the block (every rank must enter it), through TRL's helper once the trainer has wrapped
    the model, and DeepSpeed's own before that (weights partitioned while loading); otherwise
    the model as it is."""
    if not any(hasattr(p, "ds_id") for p in model.parameters()):  # not a ZeRO-3 parameter
        yield model
        return
    if trainer is not None and trainer.model_wrapped is not trainer.model:
        from trl.models.utils import unwrap_model_for_generation

        with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator) as unwrapped:
            yield unwrapped
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        yield model
