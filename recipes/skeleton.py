"""What every recipe does the same way: parse, open its run folder, evaluate before, train, save,
evaluate after, write the summary.

    args = parse((MyArguments, NestedReFTConfig, ModelConfig), argv)   # TRL's parser: --config YAML + flags
    run = open_run(model_path, training_args, {"dataset": ...}, fresh_run, required=(...,))
    before = run.before(lambda: held_out("before"))                    # measured once, kept on resume
    seconds = run.train(trainer)                                       # resumes; closes the engine; saves final/
    run.write_summary({... "before": before, "after": after})

Flag names are the same in every recipe: `--model_name_or_path`, `--output_dir`, `--config`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from trl import TrlParser

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
    """One recipe run's folder: `out` (the resolved output_dir) and the checkpoint it resumes, if any."""

    out: Path
    resume: str | None

    @property
    def summary_path(self) -> Path:
        return self.out / "summary.json"

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    def before(self, evaluate) -> dict:
        """The before-training evaluation: measured now, or, when resuming, the one the first run saved."""
        previous = json.loads(self.summary_path.read_text()) if self.summary_path.exists() else {}
        if self.resume and "before" in previous:
            logger.info("resuming from %s (the before-training evaluation is the first run's)", self.resume)
            return previous["before"]
        before = evaluate()
        self.summary_path.write_text(json.dumps({"before": before}, indent=2))
        return before

    def train(self, trainer, save_tokenizer=None) -> float:
        """Train (resuming if there is a checkpoint), free a rollout engine's memory, save `final/`;
        returns the training seconds."""
        start = time.perf_counter()
        try:
            trainer.train(resume_from_checkpoint=self.resume)
        finally:
            engine = getattr(trainer, "engine", None)
            if engine is not None:
                engine.close()  # a colocated vLLM engine frees its memory before the evaluation
        seconds = time.perf_counter() - start
        trainer.save_model(str(self.out / "final"))
        if save_tokenizer is not None:
            save_tokenizer.save_pretrained(str(self.out / "final"))
        return seconds

    def write_summary(self, summary: dict) -> None:
        self.summary_path.write_text(json.dumps(summary, indent=2))


def open_run(model_path: str, training_args, data: dict, fresh_run: bool, required: tuple[str, ...] = ()) -> Run:
    """Resolve the output folder: a used folder is resumed only by the same run (model, data,
    settings; see recipes/run_folder.py). Sets `training_args.output_dir` to the folder used."""
    record = run_record(model_path, training_args, data)
    out, resume = prepare_run_folder(training_args.output_dir, record, fresh_run, required=required)
    training_args.output_dir = str(out)
    return Run(Path(out), resume)
