"""Output folders that are safe to reuse: a run resumes only its own checkpoints.

Each recipe records what identifies its run (the model and the training settings that shape the
weights) in `<output_dir>/run.json`. Started again on a folder with checkpoints, it resumes when
the record matches, and otherwise stops with one message naming the differing settings, or, with
`fresh_run`, moves on to the next free `<output_dir>-N`. Settings a resumed run may change (more
steps, logging, evaluation, saving) are not part of the record. On resume, rows of
`metrics.jsonl` logged after the checkpoint (by the interrupted run) are dropped, so every step
appears once.
"""

from __future__ import annotations

import json
import logging
import re
import struct
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
# TrainingArguments fields a resumed run may change without changing what it trains.
MAY_CHANGE = ("output_dir", "logging_dir", "run_name", "max_steps", "num_train_epochs", "report_to",
              "disable_tqdm", "resume_from_checkpoint", "overwrite_output_dir", "push_to_hub", "hub_model_id",
              "dataloader_num_workers", "full_model_probe_every", "full_model_probe_tokens", "log_completions",
              "vllm_server_base_url", "vllm_server_host", "vllm_server_port", "vllm_server_timeout",
              "vllm_request_timeout", "vllm_server_retries", "vllm_weight_transfer", "vllm_server_weights_dir",
              "vllm_group_port")
MAY_CHANGE_PREFIXES = ("logging_", "save_", "eval_", "hub_")


CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_problem(folder: Path, required: tuple[str, ...] = ()) -> str | None:
    """Why `folder` cannot be resumed from (missing, truncated or unreadable files), or None.

    Cheap checks that a write cut short fails: the JSON files parse, every safetensors file's
    header parses and the file is as long as the header says, and every torch zip archive
    (optimizer, scheduler, RNG) has its central directory, which is written last. `required`: files
    the recipe's trainer writes last (the Nested-ReFT state), so their absence means a cut save."""
    for name in required:
        if not (folder / name).exists():
            return f"{name} is missing"
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
        int(state["global_step"])
    except (OSError, ValueError, KeyError) as e:
        return f"trainer_state.json: {type(e).__name__}: {e}"
    weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    if not weights:
        return "no model or adapter weights"
    for path in folder.glob("*.json"):
        try:
            json.loads(path.read_text())
        except (OSError, ValueError) as e:
            return f"{path.name}: {type(e).__name__}: {e}"
    for path in folder.glob("*.safetensors"):
        try:
            with path.open("rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                if n > path.stat().st_size:
                    return f"{path.name}: header length {n} exceeds the file"
                header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if path.stat().st_size < 8 + n + end:
                return f"{path.name} is truncated ({path.stat().st_size} of {8 + n + end} bytes)"
        except (OSError, ValueError, OverflowError, struct.error, KeyError, TypeError) as e:
            return f"{path.name}: {type(e).__name__}: {e}"
    for path in [*folder.glob("*.pt"), *folder.glob("*.pth"), *folder.glob("*.bin")]:
        if not zipfile.is_zipfile(path):
            return f"{path.name} is not a complete torch archive"
    return None


def last_valid_checkpoint(folder: Path, required: tuple[str, ...] = ()) -> str | None:
    """The newest checkpoint that is complete. Newer ones that are not (a run killed while saving,
    a corrupt file) are renamed `checkpoint-N.incomplete`, with a warning, so neither this run nor
    the Trainer's rotation takes them for checkpoints."""
    steps = sorted((int(m[1]), p) for p in folder.iterdir() if p.is_dir() and (m := CHECKPOINT.match(p.name)))
    for _, path in reversed(steps):
        problem = checkpoint_problem(path, required)
        if problem is None:
            return str(path)
        target = path.with_name(path.name + ".incomplete")
        n = 1
        while target.exists():
            target, n = path.with_name(f"{path.name}.incomplete-{n}"), n + 1
        path.rename(target)
        logger.warning("%s cannot be resumed from (%s): moved to %s; using the previous checkpoint", path, problem,
                       target.name)
    return None


def run_record(model: str, training_args, extra: dict | None = None) -> dict:
    """What identifies a run: the model and every setting that shapes its weights."""
    settings = {}
    for key, value in sorted(training_args.to_dict().items()):
        if key in MAY_CHANGE or key.startswith(MAY_CHANGE_PREFIXES):
            continue
        settings[key] = value if isinstance(value, (int, float, str, bool, type(None), list)) else str(value)
    return {"model": str(model), "settings": settings, **(extra or {})}


def _differences(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old["settings"]) | set(new["settings"]))
    diffs = [f"model: {old['model']!r} -> {new['model']!r}"] if old["model"] != new["model"] else []
    diffs += [f"{k}: {old['settings'].get(k)!r} -> {new['settings'].get(k)!r}" for k in keys
              if old["settings"].get(k) != new["settings"].get(k)]
    diffs += [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted((set(old) | set(new)) - {"model", "settings"})
              if old.get(k) != new.get(k)]
    return diffs


def prepare_run_folder(output_dir: str | Path, record: dict, fresh_run: bool = False,
                       required: tuple[str, ...] = ()) -> tuple[Path, str | None]:
    """(the folder to write into, the checkpoint to resume from or None). Raises ValueError when
    the folder holds another run's checkpoints and `fresh_run` is off."""
    out = Path(output_dir)
    base, n = out, 0
    while True:
        checkpoint = last_valid_checkpoint(out, required) if out.is_dir() else None
        saved = out / RUN_FILE
        old = json.loads(saved.read_text()) if saved.exists() else None
        if checkpoint is None or (old is not None and not _differences(old, record)):
            break
        diffs = _differences(old, record) if old is not None else ["the folder has checkpoints but no run.json"]
        if not fresh_run:
            raise ValueError(f"{out} holds checkpoints of another run ({'; '.join(diffs[:6])}"
                             f"{'; ...' if len(diffs) > 6 else ''}): resuming would train from them. Use another "
                             "--output_dir, delete the folder, or pass --fresh_run true to start in the next free "
                             f"{base}-N")
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    if out != base:
        logger.info("%s holds another run's checkpoints: this run writes to %s", base, out)
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))
    if checkpoint is not None:
        drop_metrics_after(out / "metrics.jsonl", _checkpoint_step(checkpoint))
    return out, checkpoint


def _checkpoint_step(checkpoint: str) -> int:
    state = Path(checkpoint) / "trainer_state.json"
    if state.exists():
        return int(json.loads(state.read_text())["global_step"])
    return int(Path(checkpoint).name.rsplit("-", 1)[-1])


def drop_metrics_after(path: Path, step: int) -> int:
    """Remove rows logged after `step` (by a run interrupted after its last checkpoint); returns
    how many were dropped. The file is rewritten atomically."""
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
        logger.info("resuming at step %d: dropped %d metric rows logged after it", step, len(lines) - len(kept))
    return len(lines) - len(kept)
