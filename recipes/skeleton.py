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
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from trl import TrlParser

from recipes.distributed import is_main_process, on_main_process, read_summary
from recipes.run_folder import prepare_run_folder, run_record

logger = logging.getLogger("recipes")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def parse(dataclass_types, argv=None) -> tuple:
    """TRL's parser over the recipe's dataclasses (a `--config` YAML, then command-line flags)."""
    parsed = TrlParser(tuple(dataclass_types)).parse_args_and_config(args=argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    return parsed


@dataclass
class Run:
    """One recipe run's folder: `out` (the resolved output_dir), the checkpoint it resumes (if any),
    the summary a previous run left there, and whether this process writes the files."""

    out: Path
    resume: str | None
    previous: dict = field(default_factory=dict)
    is_main: bool = True
    world_size: int = 1
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
            self.summary_path.write_text(json.dumps({"before": before}, indent=2))
        return before

    def train(self, trainer, save_tokenizer=None) -> float:
        """Train (resuming if there is a checkpoint) and save `final/`; returns the training seconds.
        With one process a rollout engine is closed as soon as training stops (a colocated vLLM frees
        its memory before the evaluation); with several, `close_engine` closes it at the end, because
        closing an in-process vLLM destroys the default process group that saving and ZeRO-3
        gathering still use."""
        start = time.perf_counter()
        try:
            trainer.train(resume_from_checkpoint=self.resume)
        finally:
            if self.world_size == 1:
                self.close_engine(trainer)
        seconds = time.perf_counter() - start
        trainer.save_model(str(self.out / "final"))
        if save_tokenizer is not None and self.is_main:
            save_tokenizer.save_pretrained(str(self.out / "final"))
        return seconds

    def close_engine(self, trainer) -> None:
        engine = getattr(trainer, "engine", None)
        if engine is not None and not self._engine_closed:
            self._engine_closed = True
            engine.close()

    def write_summary(self, summary: dict) -> None:
        if self.is_main:
            self.summary_path.write_text(json.dumps(summary, indent=2))


def open_run(model_path: str, training_args, data: dict, fresh_run: bool, required: tuple[str, ...] = ()) -> Run:
    """Resolve the output folder: a used folder is resumed only by the same run (model, data,
    settings; see recipes/run_folder.py). With several processes the main one decides and the
    others use its answer. Sets `training_args.output_dir` to the folder used."""
    record = run_record(model_path, training_args, data)
    out, resume, previous = on_main_process(training_args, lambda: read_summary(*prepare_run_folder(
        training_args.output_dir, record, fresh_run, required=required)))
    training_args.output_dir = str(out)
    return Run(Path(out), resume, previous, is_main_process(training_args), training_args.world_size)
