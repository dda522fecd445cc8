"""TRL's GRPOTrainer against NestedReFTTrainer, both sampling through a colocated vLLM.

    python -m benchmarks.vs_trl [--max_steps 30] [--eval_every 10] [--eval_limit 100]
                                [--runs trl skip0.25 skip0.5] [--out outputs/benchmarks/vs_trl]

On the embedded default (tiny math model, synthetic problems, the hyper-parameters of
recipes/configs/math_reft_tiny.yaml), with the same step budget: TRL on-policy
(`use_vllm=True, vllm_mode="colocate"`, its default vLLM importance-sampling correction) and
Nested-ReFT (`engine=vllm`, `correction=tis`) with skip_ratio 0.25 and 0.5. Every
`--eval_every` steps the clock is paused and held-out greedy accuracy measured. Wall-clock runs
from trainer construction (vLLM start included) and excludes evaluation. Prints a table, writes
`vs_trl.json` and `vs_trl.png`, and for each of ours the ratio of the wall-clock it needs to reach
TRL's final accuracy to the wall-clock TRL needed (first evaluation at or above it).
Each run is its own process (one vLLM per process).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

CONFIG = "recipes/configs/math_reft_tiny.yaml"
SHARED_KEYS = ("num_generations", "per_device_train_batch_size", "max_completion_length", "temperature", "top_k",
               "top_p", "steps_per_generation", "learning_rate", "lr_scheduler_type", "warmup_steps", "beta", "loss_type", "reward_weights", "seed")


def run_one(name: str, args) -> dict:
    """One training run in this process; returns its accuracy-vs-wall-clock curve."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch

    if args.threads:  # same CPU threads for the trainer and vLLM in every run
        torch.set_num_threads(args.threads)
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"  # let the OS place the threads (cores are shared)
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from archs.tiny import build_tiny_math_model
    from nested_reft.config import NestedReFTConfig
    from nested_reft.data import load_math_dataset
    from nested_reft.evaluation import evaluate_math
    from nested_reft.trainer import NestedReFTTrainer
    from rewards.math import accuracy_reward, format_reward

    cfg = yaml.safe_load(Path(CONFIG).read_text())
    shared = {k: cfg[k] for k in SHARED_KEYS}
    common = dict(output_dir=str(Path(args.out) / name), max_steps=args.max_steps, save_strategy="no", report_to=[],
                  logging_steps=1, bf16=False, use_cpu=not torch.cuda.is_available(), log_completions=False, **shared)
    path = str(build_tiny_math_model())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    train = load_math_dataset("synthetic", "train", seed=cfg["seed"])
    test = load_math_dataset("synthetic", "test", limit=args.eval_limit, seed=cfg["seed"])
    curve: list[dict] = []
    clock = {"start": 0.0, "paused": 0.0}

    def evaluate(step: int) -> None:
        t = time.perf_counter()
        r = evaluate_math(model_ref[0], tokenizer, test, temperature=0.0, max_new_tokens=cfg["eval_max_new_tokens"], batch_size=64)
        elapsed = t - clock["start"] - clock["paused"] if clock["start"] else 0.0
        clock["paused"] += time.perf_counter() - t
        curve.append({"step": step, "wall_seconds": elapsed, "accuracy": r.accuracy})
        print(f"[{name}] step {step}: held-out accuracy {r.accuracy:.1%} at {elapsed:.0f} s", flush=True)

    class EvalEvery(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            if state.global_step % args.eval_every == 0 or state.global_step == args.max_steps:
                evaluate(state.global_step)

    model_ref = [model]
    evaluate(0)
    clock["start"] = time.perf_counter()
    if name == "trl":
        targs = GRPOConfig(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.3, **common)
        trainer = GRPOTrainer(model=model, reward_funcs=[accuracy_reward, format_reward], args=targs,
                              train_dataset=train, processing_class=tokenizer, callbacks=[EvalEvery()])
    else:
        ratio = float(name.removeprefix("skip"))
        targs = NestedReFTConfig(engine="vllm", vllm_dtype="float32", skip_ratio=ratio, correction="tis",
                                 keep_first=cfg["keep_first"], keep_last=cfg["keep_last"], full_model_probe_every=0, **common)
        trainer = NestedReFTTrainer(model=model, reward_funcs=[accuracy_reward, format_reward], args=targs,
                                    train_dataset=train, processing_class=tokenizer, callbacks=[EvalEvery()])
    model_ref[0] = trainer.model
    construct = time.perf_counter() - clock["start"]
    trainer.train()
    total = time.perf_counter() - clock["start"] - clock["paused"]
    return {"name": name, "curve": curve, "construct_seconds": construct, "train_wall_seconds": total,
            "steps": trainer.state.global_step}


def time_to_reach(curve: list[dict], target: float) -> float | None:
    return next((p["wall_seconds"] for p in curve if p["step"] > 0 and p["accuracy"] >= target), None)


def report(results: list[dict], out: Path) -> None:
    trl = next((r for r in results if r["name"] == "trl"), None)
    target = trl["curve"][-1]["accuracy"] if trl else None
    t_trl = time_to_reach(trl["curve"], target) if trl else None
    lines = ["| run | steps | start s | train wall-clock s | s/step | acc @0 | final acc | time to TRL's final acc | ratio to TRL |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        t = time_to_reach(r["curve"], target) if target is not None else None
        r["time_to_trl_final"] = t
        r["ratio_to_trl"] = t / t_trl if t is not None and t_trl else None
        c = r["curve"]
        reach = "not reached" if t is None else f"{t:.0f} s"
        ratio = "—" if r["ratio_to_trl"] is None else f"{r['ratio_to_trl']:.2f}"
        lines.append(f"| {r['name']} | {r['steps']} | {r['construct_seconds']:.0f} | {r['train_wall_seconds']:.0f} | "
                     f"{r['train_wall_seconds'] / max(1, r['steps']):.1f} | {c[0]['accuracy']:.1%} | {c[-1]['accuracy']:.1%} | "
                     f"{reach} | {ratio} |")
    table = "\n".join(lines)
    print("\n" + table)
    (out / "vs_trl.json").write_text(json.dumps({"trl_final_accuracy": target, "results": results}, indent=2))
    (out / "vs_trl.md").write_text(table + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        ax.plot([p["wall_seconds"] for p in r["curve"]], [p["accuracy"] for p in r["curve"]], "o-", label=r["name"])
    if target is not None:
        ax.axhline(target, color="gray", ls="--", lw=1, label="TRL final")
    ax.set_xlabel("training wall-clock (s, evaluation excluded)")
    ax.set_ylabel("held-out greedy accuracy")
    ax.set_title("TRL GRPO vs Nested-ReFT, both with colocated vLLM", fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "vs_trl.png", dpi=120)
    plt.close(fig)
    print(f"wrote {out}/vs_trl.json, vs_trl.md, vs_trl.png")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=["trl", "skip0.25", "skip0.5"])
    p.add_argument("--max_steps", type=int, default=30)
    p.add_argument("--eval_every", type=int, default=10)
    p.add_argument("--eval_limit", type=int, default=100)
    p.add_argument("--out", default="outputs/benchmarks/vs_trl")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per run (1 avoids oversubscription on a shared machine)")
    p.add_argument("--run", default=None, help=argparse.SUPPRESS)  # child mode: one run, JSON to --out/<run>.json
    args = p.parse_args(argv)
    for name in args.runs if args.run is None else [args.run]:
        if name != "trl" and not (name.startswith("skip") and 0 <= float(name.removeprefix("skip")) < 1):
            p.error(f"--runs: {name!r} is neither 'trl' nor 'skip<ratio>'")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.run is not None:
        (out / f"{args.run}.json").write_text(json.dumps(run_one(args.run, args)))
        return
    results = []
    for name in args.runs:
        cmd = [sys.executable, "-m", "benchmarks.vs_trl", "--run", name, "--max_steps", str(args.max_steps),
               "--eval_every", str(args.eval_every), "--eval_limit", str(args.eval_limit), "--out", str(out)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        with (out / f"{name}.log").open("w") as log:
            if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
                raise RuntimeError(f"run {name} failed; see {out / f'{name}.log'}")
        results.append(json.loads((out / f"{name}.json").read_text()))
        print(f"{name}: done", flush=True)
    report(results, out)


if __name__ == "__main__":
    main()
