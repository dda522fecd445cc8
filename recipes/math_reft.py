"""Nested-ReFT on math: GRPO whose rollouts come from layer-skipped copies of the policy.

    python -m recipes.math_reft --config recipes/configs/math_reft_tiny.yaml [--key value ...]

With no `--model_name_or_path`, the embedded tiny model is built (once, cached) and trained on
synthetic word problems. For real runs pass a Hub id or a local folder, and `--dataset_name`
(e.g. `openai/gsm8k`) or `--dataset_path` (GSM8K / MATH / SVAMP / generic files). Evaluates greedy
held-out accuracy before and after training, writes `metrics.jsonl`, `summary.json` and
`training.png` into `--output_dir`, and resumes from the last checkpoint there if one exists.
Prompts carry the embedded model's system message unless `--system_prompt` gives another (Qwen2.5-Math:
"Please reason step by step, and put your final answer within \\boxed{}.") or '' for none.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from trl import ModelConfig, get_peft_config

from archs.tiny.math_task import SYSTEM_PROMPT
from nested_reft.config import NestedReFTConfig
from nested_reft.data import holdout_split, load_math_dataset
from nested_reft.evaluation import evaluate_math
from nested_reft.reporting import (
    HeldOutEvalCallback,
    JsonlMetricsCallback,
    plot_training,
    read_jsonl,
)
from nested_reft.trainer import NestedReFTTrainer
from recipes.distributed import whole_model
from recipes.model_loading import load_model_and_tokenizer
from recipes.preflight import preflight
from recipes.skeleton import open_run, parse
from recipes.translation_common import full_model_path
from rewards.math import accuracy_reward, format_reward

logger = logging.getLogger("recipes.math_reft")


@dataclass
class MathReFTArguments:
    dataset_name: str = field(default="synthetic", metadata={"help": "'synthetic' (embedded arithmetic), or a Hub id such as openai/gsm8k."})
    dataset_path: str | None = field(default=None, metadata={"help": "A local file or folder in GSM8K, MATH, SVAMP or generic format (overrides dataset_name)."})
    dataset_format: str | None = field(default=None, metadata={"help": "gsm8k | math | svamp | generic | synthetic; inferred when unset."})
    synthetic_levels: list[int] | None = field(default=None, metadata={"help": "dataset_name=synthetic: the levels to train and evaluate on (1-5, in the task's relative weights); default all five."})
    question_field: str | None = field(default=None, metadata={"help": "Question column for generic files."})
    answer_field: str | None = field(default=None, metadata={"help": "Answer column for generic files."})
    train_split: str = field(default="train", metadata={"help": "Split used for training."})
    eval_split: str = field(default="test", metadata={"help": "Held-out split for the before/after accuracy."})
    eval_path: str | None = field(default=None, metadata={"help": "A separate held-out file or folder. Without it, a single --dataset_path file is split by holdout_fraction."})
    holdout_fraction: float = field(default=0.1, metadata={"help": "With one --dataset_path file and no --eval_path: the fraction of its questions held out (chosen by a hash of the question text, so duplicates stay on one side and the split is the same on every run)."})
    train_limit: int | None = field(default=None, metadata={"help": "Use at most this many training rows."})
    eval_limit: int | None = field(default=300, metadata={"help": "Evaluate on at most this many held-out rows."})
    eval_max_new_tokens: int = field(default=128, metadata={"help": "Generation budget of the held-out evaluation."})
    eval_every: int = field(default=0, metadata={"help": "Also evaluate held-out greedy accuracy every N steps (0: only before and after); logged as heldout/accuracy."})
    eval_batch_size: int = field(default=64, metadata={"help": "Prompts per generate() call in the held-out evaluation."})
    tiny_cache_dir: str | None = field(default=None, metadata={"help": "Where the embedded tiny model is cached (default ~/.cache/nested_reft)."})
    fresh_run: bool = field(default=False, metadata={"help": "When --output_dir holds another run's checkpoints, start fresh in the next free <output_dir>-N instead of stopping."})
    tiny_seed: int = field(default=0, metadata={"help": "Seed of the embedded tiny model's build."})
    merge_adapter: bool = field(default=False, metadata={"help": "When model_name_or_path is a LoRA adapter (an SFT run with --use_peft), merge it into its base as <adapter>-merged and start from that (reused while the adapter is unchanged); without it such a path is refused."})
    system_prompt: str | None = field(default=None, metadata={"help": f"System message of every prompt, training and held-out (default: the embedded tiny model's, {SYSTEM_PROMPT!r}; '' for none). Qwen2.5-Math's is 'Please reason step by step, and put your final answer within \\boxed{{}}.'"})


def resolve_model(model_args: ModelConfig, script_args: MathReFTArguments) -> str:
    if model_args.model_name_or_path:
        return full_model_path(model_args.model_name_or_path, script_args.merge_adapter)
    from archs.tiny import build_tiny_math_model

    logger.info("no --model_name_or_path: using the embedded tiny math model")
    return str(build_tiny_math_model(script_args.tiny_cache_dir, seed=script_args.tiny_seed))


def load_data(a: MathReFTArguments, split: str, limit: int | None, seed: int, source: str | None = None):
    system = SYSTEM_PROMPT if a.system_prompt is None else a.system_prompt
    ds = load_math_dataset(source or a.dataset_path or a.dataset_name, split, format=a.dataset_format,
                           question_field=a.question_field, answer_field=a.answer_field, system_prompt=system,
                           limit=limit, seed=seed, levels=tuple(a.synthetic_levels) if a.synthetic_levels else None)
    if not system:  # no system message rather than an empty one (a chat template may put its own default there)
        ds = ds.map(lambda row: {"prompt": [m for m in row["prompt"] if m["role"] != "system"]})
    return ds


def load_train_and_heldout(a: MathReFTArguments, seed: int):
    """Training rows and held-out rows that never overlap: a separate --eval_path, the dataset's
    own splits, or, for a single file, a deterministic hash split of its questions."""
    if a.eval_path:
        return (load_data(a, a.train_split, a.train_limit, seed),
                load_data(a, a.eval_split, a.eval_limit, seed, source=a.eval_path))
    if a.dataset_path and Path(a.dataset_path).expanduser().is_file():
        train, test = holdout_split(load_data(a, a.train_split, None, seed), a.holdout_fraction)
        logger.info("%s is one file: %d rows for training, %d held out (holdout_fraction %.2f)",
                    a.dataset_path, len(train), len(test), a.holdout_fraction)
        cap = lambda ds, n: ds.select(range(min(n, len(ds)))) if n else ds  # noqa: E731
        return cap(train, a.train_limit), cap(test, a.eval_limit)
    return (load_data(a, a.train_split, a.train_limit, seed),
            load_data(a, a.eval_split, a.eval_limit, seed))


def main(argv=None) -> dict:
    script_args, training_args, model_args = parse((MathReFTArguments, NestedReFTConfig, ModelConfig), argv)
    # Data first: a bad path or field fails before any model is loaded.
    train, test = load_train_and_heldout(script_args, training_args.seed)
    with training_args.main_process_first(local=True, desc="building the embedded model"):  # one build per machine
        model_path = resolve_model(model_args, script_args)
    preflight(model_path, training_args, train["prompt"], use_peft=model_args.use_peft,
              revision=model_args.model_revision)
    run = open_run(model_path, training_args, {"dataset": script_args.dataset_path or script_args.dataset_name,
                                               "eval_path": script_args.eval_path},
                   script_args.fresh_run, required=(NestedReFTTrainer.SKIP_STATE_FILE,))
    out, main_process = run.out, run.is_main
    model, tokenizer = load_model_and_tokenizer(model_path, model_args, use_cpu=training_args.use_cpu,
                                                use_peft=model_args.use_peft)

    def held_out(label, model=model, trainer=None):
        # every process evaluates (under ZeRO-3 all of them gather the weights); the main one reports
        with whole_model(model, trainer) as whole:
            r = evaluate_math(whole, tokenizer, test, temperature=0.0, batch_size=script_args.eval_batch_size,
                              max_new_tokens=script_args.eval_max_new_tokens, progress=main_process)
        logger.info("held-out greedy accuracy %s: %.1f%% (%d problems)", label, 100 * r.accuracy, r.n)
        return r

    before = run.before(lambda: held_out("before training").as_dict())

    trainer = NestedReFTTrainer(
        model=model, reward_funcs=[accuracy_reward, format_reward], args=training_args,
        train_dataset=train, processing_class=tokenizer, peft_config=get_peft_config(model_args),
    )
    if script_args.eval_every > 0:  # before the JSONL writer, so its rows carry heldout/accuracy
        trainer.add_callback(HeldOutEvalCallback(lambda: held_out(f"at step {trainer.state.global_step}", trainer.model,
                                                                  trainer).accuracy, script_args.eval_every))
    trainer.add_callback(JsonlMetricsCallback(run.metrics_path))
    train_seconds = run.train(trainer)
    after = held_out("after training", trainer.model, trainer).as_dict()
    run.close_engine(trainer)

    rows = read_jsonl(run.metrics_path) if main_process else []  # the main process writes it
    step_rows = [r for r in rows if "correction/ess" in r]
    def mean(key: str) -> float:  # over the steps that logged it (the probe logs only when it measures)
        values = [r[key] for r in step_rows if key in r]
        return sum(values) / len(values) if values else float("nan")

    summary = {
        "model": model_path, "dataset": script_args.dataset_path or script_args.dataset_name,
        "engine": training_args.engine,
        "skip_ratio": training_args.skip_ratio, "correction": training_args.correction,
        "steps": trainer.state.global_step, "train_seconds": train_seconds,
        "seconds_per_step": train_seconds / max(1, trainer.state.global_step),
        "before": before, "after": after,
        "mean_ess": mean("correction/ess"),
        "behavior_tokens_per_s": mean("rollout/behavior_tokens_per_s"),
        "full_tokens_per_s": mean("rollout/full_tokens_per_s"),
        "probe_behavior_tokens_per_s": mean("rollout/probe_behavior_tokens_per_s"),
        "probe_speedup": mean("rollout/probe_speedup"),
        "generate_seconds_per_round": mean("rollout/generate_seconds"),
        "weight_sync_seconds": mean("rollout/weight_sync_seconds"),
        "skip_history": [list(s) for s in trainer.skip_policy.history],
    }
    if not main_process:  # the files and the table are the main process's (its summary has the means)
        return summary
    run.write_summary(summary)
    # the held-out curve runs from the evaluation before training to the one after it
    steps = trainer.state.global_step
    curve = ([{"step": 0, "heldout/accuracy": before["accuracy"]}] + rows
             + [{"step": steps, "heldout/accuracy": after["accuracy"]}])
    plot_training(curve, out / "training.png",
                  title=f"Nested-ReFT: skip_ratio={training_args.skip_ratio}, correction={training_args.correction}",
                  evals={"before": (0, before["accuracy"]), "after": (steps, after["accuracy"])})

    print("\n| | held-out greedy accuracy | format | completion tokens |")
    print("|---|---|---|---|")
    print(f"| before | {before['accuracy']:.1%} | {before['format_rate']:.1%} | {before.get('mean_tokens', float('nan')):.1f} |")
    print(f"| after {trainer.state.global_step} steps | {after['accuracy']:.1%} | {after['format_rate']:.1%} | "
          f"{after['mean_tokens']:.1f} |")
    print(f"\nengine {training_args.engine}, skip_ratio {training_args.skip_ratio}, correction {training_args.correction}: "
          f"{summary['seconds_per_step']:.1f} s/step, mean ESS {summary['mean_ess']:.3f}, rollout tokens/s "
          f"{summary['behavior_tokens_per_s']:.0f} in rounds; fixed-length probe: behavior "
          f"{summary['probe_behavior_tokens_per_s']:.0f} vs full {summary['full_tokens_per_s']:.0f} "
          f"({summary['probe_speedup']:.2f}x; short single timings, noisy on a shared CPU: benchmarks/step_time.py "
          f"measures it on fixed lengths)")
    print(f"outputs: {out}/summary.json, metrics.jsonl, training.png")
    return summary


if __name__ == "__main__":
    main()
