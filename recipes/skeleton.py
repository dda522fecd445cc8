"""What every recipe does the same way: parse, open its run folder, evaluate before, train, save,
evaluate after, write the summary; as one process or several (`accelerate launch`, docs/scaling.md).

    args = parse((MyArguments, NestedReFTConfig, ModelConfig), argv)   # TRL's parser: --config YAML + flags
    run = open_run(model_path, training_args, {"dataset": ...}, fresh_run, required=(...,))
    before = run.before(lambda: held_out("before"))                    # measured once, kept on resume
    seconds = run.train(trainer)                                       # resumes, saves final/
    after = held_out("after")
    run.close_engine(trainer)                                          # (done in train() with one process)
    if run.is_main: run.write_summary({... "before": before, "after": after})

Flag names are the same in every recipe: `--model_name_or_path`, `--output_dir`, `--config`. With
several processes the main one prepares the folder and writes the files; every process evaluates
(the recipes gather ZeRO-3 shards for it with `recipes.distributed.whole_model`).

A save that fails on a full disk removes the partial checkpoint (or `final/`) it left, which would
hold the space a retry needs, and raises one `OSError(ENOSPC)` naming the disk, its free space and
the folder (torch.save's own error names no cause).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainingArguments
from trl import ModelConfig, TrlParser

from recipes.distributed import is_main_process, on_main_process
from recipes.run_folder import (
    checkpoint_problem,
    checkpoints,
    prepare_run_folder,
    run_record,
    write_json,
)

logger = logging.getLogger("recipes")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MODEL_ARGS = "_run_model_args"  # where parse() leaves the ModelConfig for open_run's run record
NEARLY_FULL = 64 * 2**20  # free bytes under which a failed save is taken for a full disk


def parse(dataclass_types, argv=None) -> tuple:
    """TRL's parser over the recipe's dataclasses (a `--config` YAML, then command-line flags).
    The ModelConfig is also attached to the training arguments: its PEFT, quantization and dtype
    settings shape the weights, so `open_run` records them with the training settings."""
    parsed = TrlParser(tuple(dataclass_types)).parse_args_and_config(args=argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    model_args = next((p for p in parsed if isinstance(p, ModelConfig)), None)
    check_unsupported_arguments(model_args, [p for p in parsed if isinstance(p, TrainingArguments)])
    for p in parsed:
        if isinstance(p, TrainingArguments) and model_args is not None:
            setattr(p, MODEL_ARGS, model_args)
    return parsed


def check_unsupported_arguments(model_args, training_args: list) -> None:
    """Flags TRL's parsers accept that these recipes would otherwise ignore: one error each, before
    any model loads (a QLoRA user must not get a full bf16 load without being told)."""
    if model_args is not None:
        for name in ("load_in_4bit", "load_in_8bit"):
            if getattr(model_args, name, False):
                raise ValueError(f"--{name} (bitsandbytes quantized loading, QLoRA) is not supported by these recipes: "
                                 "the behavior engines sample from the policy's own weights or a vLLM copy of them. "
                                 "Use --use_peft true on the bf16 model (docs/r1t1.md sizes a 7B LoRA run) or DeepSpeed")
    for args in training_args:
        if getattr(model_args, "trust_remote_code", False) or getattr(args, "trust_remote_code", False):
            raise ValueError("--trust_remote_code is not supported by these recipes: the layer-skip engines and the "
                             "families need an architecture transformers (or archs/) implements; remote code is never run")
        if getattr(args, "resume_from_checkpoint", None):
            raise ValueError(f"--resume_from_checkpoint {args.resume_from_checkpoint!r} is not used: a recipe resumes "
                             "from the last complete checkpoint in --output_dir by itself (the same command again); "
                             "point --output_dir at that run's folder")


@dataclass
class Run:
    """One recipe run's folder: `out` (the resolved output_dir), the checkpoint it resumes (if any),
    the summary a previous run left there, and whether this process writes the files."""

    out: Path
    resume: str | None
    previous: dict = field(default_factory=dict)
    is_main: bool = True
    world_size: int = 1
    required: tuple[str, ...] = ()  # files the recipe's trainer writes last in a checkpoint
    _engine_closed: bool = False

    @property
    def summary_path(self) -> Path:
        return self.out / "summary.json"

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    def before(self, evaluate) -> dict:
        """The before-training evaluation: measured now (by every process), or, when resuming, the one
        the first run saved."""
        if self.resume and "before" in self.previous:
            logger.info("resuming from %s (the before-training evaluation is the first run's)", self.resume)
            return self.previous["before"]
        before = evaluate()
        if self.is_main:
            write_json(self.summary_path, {"before": before})
        return before

    def train(self, trainer, save_tokenizer=None) -> float:
        """Train (resuming if there is a checkpoint) and save `final/`; returns the training seconds.
        With one process a rollout engine is closed as soon as training stops (a colocated vLLM frees
        its memory before the evaluation); with several, `close_engine` closes it at the end, because
        closing an in-process vLLM destroys the default process group that saving and ZeRO-3
        gathering still use."""
        start = time.perf_counter()
        before = set(checkpoints(self.out))
        try:
            with self._full_disk_named(lambda: [p for p in checkpoints(self.out)
                                                if p not in before and checkpoint_problem(p, self.required)]):
                trainer.train(resume_from_checkpoint=self.resume)
        finally:
            if self.world_size == 1:
                self.close_engine(trainer)
        seconds = time.perf_counter() - start
        final = self.out / "final"
        with self._full_disk_named(lambda: [final] if final.exists() else []):
            trainer.save_model(str(final))
            if save_tokenizer is not None and self.is_main:
                save_tokenizer.save_pretrained(str(final))
        return seconds

    @contextlib.contextmanager
    def _full_disk_named(self, partial_folders):
        """On an error that is a full disk: remove the folders the failed save left cut short
        (`partial_folders()`) and raise one OSError naming the disk and the folder."""
        try:
            yield
        except Exception as e:
            partial = partial_folders()
            usage = shutil.disk_usage(self.out)
            if not (_says_disk_full(e) or (partial and usage.free < NEARLY_FULL)):
                raise
            for path in partial:
                shutil.rmtree(path, ignore_errors=True)
            raise OSError(errno.ENOSPC, f"No space left on the disk of {self.out} ({_size(usage.free)} free of "
                          f"{_size(usage.total)}) while saving {', '.join(map(str, partial)) or 'the run'}"
                          f"{': removed the partial folder, so the space is free again' if partial else ''}. Free "
                          "space on that disk (or lower save_total_limit) and run the same command again: it resumes "
                          f"from the last complete checkpoint. ({type(e).__name__}: {e})") from None

    def close_engine(self, trainer) -> None:
        engine = getattr(trainer, "engine", None)
        if engine is not None and not self._engine_closed:
            self._engine_closed = True
            engine.close()

    def write_summary(self, summary: dict) -> None:
        if self.is_main:
            write_json(self.summary_path, summary)


def _says_disk_full(error: BaseException) -> bool:
    """ENOSPC anywhere in the error's chain, or its text (safetensors wraps it in its own error)."""
    for _ in range(8):
        if error is None:
            return False
        if getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error) or "os error 28" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} TiB"


def last_summary(out: Path) -> dict:
    """The summary.json a previous run left in `out` ({} when none, or when a kill or a full disk
    left it unreadable: the before-training evaluation is then measured again)."""
    path = Path(out) / "summary.json"
    if not path.exists():
        return {}
    try:
        summary = json.loads(path.read_text())
    except ValueError as e:
        logger.warning("%s cannot be read (%s): the before-training evaluation will be measured again", path, e)
        return {}
    return summary if isinstance(summary, dict) else {}


def open_run(model_path: str, training_args, data: dict, fresh_run: bool, required: tuple[str, ...] = (),
             model_args=None) -> Run:
    """Resolve the output folder: a used folder is continued only by the same run (model, recipe,
    data, training and model settings; see recipes/run_folder.py). `model_args`: the ModelConfig
    (default: the one `parse` attached to `training_args`). With several processes the main one
    decides and the others use its answer. Sets `training_args.output_dir` to the folder used."""
    model_args = model_args if model_args is not None else getattr(training_args, MODEL_ARGS, None)
    record = run_record(model_path, training_args, data, model_args)

    def prepare():
        out, resume = prepare_run_folder(training_args.output_dir, record, fresh_run, required=required)
        return out, resume, last_summary(out)

    out, resume, previous = on_main_process(training_args, prepare)
    training_args.output_dir = str(out)
    return Run(Path(out), resume, previous, is_main_process(training_args), training_args.world_size, required)
