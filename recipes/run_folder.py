"""Output folders that are safe to reuse: a folder is continued only by the run that made it.

Each recipe records what identifies its run in `<output_dir>/run.json`: the model, the trainer's
config class (which recipe), its data, and every setting that shapes the weights (the training
arguments and the model's: PEFT and its r/alpha/dropout/targets, quantization, dtype). Started
again on a folder that holds a run, finished or not, it continues when the record matches, and
otherwise stops with one message naming the differing settings, or, with `fresh_run`, moves on to
the next free `<output_dir>-N`; a folder with a run's files but no record (a plain TRL run, an
older version) is another run's. Nothing in another run's folder is moved or rewritten. Settings
a resumed run may change (more steps, logging, evaluation, saving) are not part of the record.

The same run resumes from its newest complete checkpoint: newer ones cut short are set aside as
`incomplete-checkpoint-N` (a name transformers' checkpoint rotation does not delete), and when
none is complete it stops instead of starting over. Rows of `metrics.jsonl` logged after the
checkpoint (all of them when it starts at step 0), and a line cut by a kill, are dropped, so every
step appears once. `run.json` and `summary.json` are replaced whole (`write_json`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
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
# ModelConfig fields that do not shape the weights (the record's `model` is the resolved path)
MODEL_MAY_CHANGE = ("model_name_or_path", "attn_implementation", "trust_remote_code")
# what a folder holds once a run (or a saved model) wrote to it
RUN_FILES = ("final", "metrics.jsonl", "summary.json", "trainer_state.json", "config.json", "adapter_config.json")
SET_ASIDE = "incomplete-"  # prefix of a checkpoint that cannot be resumed from


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


def checkpoints(folder: Path) -> list[Path]:
    """The `checkpoint-N` folders, oldest first."""
    steps = sorted((int(m[1]), p) for p in folder.iterdir() if p.is_dir() and (m := CHECKPOINT.match(p.name)))
    return [p for _, p in steps]


def last_valid_checkpoint(folder: Path, required: tuple[str, ...] = ()) -> str | None:
    """The newest checkpoint that is complete. Newer ones that are not (a run killed while saving,
    a corrupt file) are renamed `incomplete-checkpoint-N`, with a warning: transformers' rotation
    deletes any `checkpoint-*` folder, and neither it nor this run may take them for checkpoints.
    Call it on the run's own folder only."""
    for path in reversed(checkpoints(folder)):
        problem = checkpoint_problem(path, required)
        if problem is None:
            return str(path)
        target, n = path.with_name(SET_ASIDE + path.name), 1
        while target.exists():
            target, n = path.with_name(f"{SET_ASIDE}{path.name}.{n}"), n + 1
        path.rename(target)
        logger.warning("%s cannot be resumed from (%s): moved to %s; using the previous checkpoint", path, problem,
                       target.name)
    return None


def _plain(value):
    return value if isinstance(value, (int, float, str, bool, type(None), list)) else str(value)


def run_record(model: str, training_args, extra: dict | None = None, model_args=None) -> dict:
    """What identifies a run: the model, the recipe's trainer config, and every setting that shapes
    its weights (training arguments, and the model's: PEFT, LoRA, quantization, dtype)."""
    settings = {key: _plain(value) for key, value in sorted(training_args.to_dict().items())
                if key not in MAY_CHANGE and not key.startswith(MAY_CHANGE_PREFIXES)}
    record = {"model": str(model), "training_config": type(training_args).__name__, "settings": settings}
    if model_args is not None:
        record["model_settings"] = {key: _plain(value) for key, value in sorted(dataclasses.asdict(model_args).items())
                                    if key not in MODEL_MAY_CHANGE}
    return {**record, **(extra or {})}


def _flat(record: dict) -> dict:
    """A record's values by setting name (the groups `settings`, `model_settings` flattened)."""
    flat = {}
    for key, value in record.items():
        flat.update(value if isinstance(value, dict) else {key: value})
    return flat


def _differences(old: dict, new: dict) -> list[str]:
    old, new = _flat(old), _flat(new)
    first = ["model", "training_config"]
    keys = first + sorted((set(old) | set(new)) - set(first))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def _read_record(folder: Path) -> dict | None:
    try:
        return json.loads((folder / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None


def _refusal(out: Path, record: dict, required: tuple[str, ...]) -> str | None:
    """Why this run may not write into `out`, or None (a new folder, or this run's own)."""
    if not out.exists():
        return None
    if not out.is_dir():
        return "is not a folder"
    old = _read_record(out)
    if old is None:
        found = sorted(p.name for p in out.iterdir() if p.name in RUN_FILES or CHECKPOINT.match(p.name))
        return (f"holds the files of a run or a model ({', '.join(found[:4])}) but no readable {RUN_FILE}: they "
                "are not this run's") if found else None
    diffs = _differences(old, record)
    if diffs:
        return (f"holds another run ({'; '.join(diffs[:6])}{'; ...' if len(diffs) > 6 else ''}): continuing "
                "there would mix the two runs' checkpoints, metrics and final model")
    problems = {p.name: checkpoint_problem(p, required) for p in checkpoints(out)}
    if problems and None not in problems.values():
        listed = "; ".join(f"{name}: {problem}" for name, problem in list(problems.items())[-3:])
        return (f"holds this run, but none of its checkpoints can be resumed from ({listed}): starting over would "
                "log every step twice")
    return None


def prepare_run_folder(output_dir: str | Path, record: dict, fresh_run: bool = False,
                       required: tuple[str, ...] = ()) -> tuple[Path, str | None]:
    """(the folder to write into, the checkpoint to resume from or None). Raises ValueError when
    the folder is not this run's (or none of its checkpoints is complete) and `fresh_run` is off.
    `required`: files the recipe's trainer writes last in a checkpoint."""
    base = Path(os.path.abspath(os.path.expanduser(output_dir)))  # "." has no name to number
    if base.parent == base:
        raise ValueError(f"--output_dir {str(output_dir)!r} is the filesystem root: name a folder for the run")
    out, n = base, 0
    while (refusal := _refusal(out, record, required)) is not None:
        if not fresh_run:
            raise ValueError(f"{out} {refusal}. Use another --output_dir, delete the folder, or pass --fresh_run true "
                             f"to start in the next free {base}-N")
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    if out != base:
        logger.info("%s is not this run's folder: this run writes to %s", base, out)
    checkpoint = last_valid_checkpoint(out, required) if out.is_dir() else None
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / RUN_FILE, record, sort_keys=True)
    drop_metrics_after(out / "metrics.jsonl", _checkpoint_step(checkpoint) if checkpoint else -1)
    return out, checkpoint


def write_json(path: Path, data, **dumps_kwargs) -> None:
    """Replace `path` whole: a kill or a full disk mid-write leaves the old file, never a cut one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(data, indent=2, **dumps_kwargs))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _checkpoint_step(checkpoint: str) -> int:
    state = Path(checkpoint) / "trainer_state.json"
    if state.exists():
        return int(json.loads(state.read_text())["global_step"])
    return int(Path(checkpoint).name.rsplit("-", 1)[-1])


def drop_metrics_after(path: Path, step: int) -> int:
    """Remove rows logged after `step` (by a run interrupted after its last checkpoint; step -1:
    every row, the run starts over) and a line cut short by a kill; returns how many were dropped.
    The file is rewritten atomically."""
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:  # the last line of a run killed while appending
            logger.warning("%s: dropped a line that is not JSON: %.80s", path, line)
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            kept.append(line)
    if len(kept) != len(lines):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
        logger.info("starting at step %d: dropped %d metric rows logged after it", max(step, 0), len(lines) - len(kept))
    return len(lines) - len(kept)
