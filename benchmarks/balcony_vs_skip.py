"""Balcony exit against layer skipping at matched rollout cost, and against the full model.

    python -m benchmarks.balcony_vs_skip [--seeds 0 1 2] [--max_steps 24] [--exit K] [--exit_steps 200]
                                         [--jobs 2] [--model_name_or_path M] [--out outputs/benchmarks/balcony_vs_skip]
                                         [-- extra recipes/math_reft.py arguments]

On the embedded default (`recipes/configs/math_reft_tiny.yaml`, L = 8 layers):
1. trains Balcony exit k (default: the shallowest default exit, 4 of 8) with recipes/train_balcony.py, once;
2. times the three behavior models on one fixed workload (the same prompts, a fixed number of tokens
   each, EOS ignored, in one batch; best of --repeats, the order alternated): the full model (L layers per
   token), the model with L − k − 1 layers skipped and exit k (both k + 1 layers per token);
3. runs recipes/math_reft.py for each behavior and seed with the same step budget: `full` (skip_ratio 0:
   on-policy), `skip` (skip_ratio (L − k − 1)/L, a fresh random set of eligible layers each round) and
   `balcony` (behavior balcony, the trained exit, frozen during RL).
Prints a table (held-out greedy accuracy before / after over the seeds, mean ESS, mean KL(μ‖π_old),
rollout tokens/s in the rounds and on the fixed workload, seconds per step) and writes
`balcony_vs_skip.json` and `.md` into --out. `--jobs N` runs N recipe runs at once, one torch thread each.
`--reuse_runs` re-reads the trained exit and the finished RL runs under --out and only times again.

Timing is best-of-N on purpose: on a machine shared with other jobs a single run can be 10-30x slower
than an undisturbed one, so a median of a few runs still mixes in other jobs' load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.nested_reft_grid import read_cell
from benchmarks.report import command_line, write_report

CONFIG = "recipes/configs/math_reft_tiny.yaml"
BEHAVIORS = ("full", "skip", "balcony")


def behavior_args(behavior: str, k: int, num_layers: int, exits_path: Path) -> list[str]:
    """Recipe arguments of one behavior model: skipping L − k − 1 layers runs k + 1, as exit k does."""
    if behavior == "full":
        return ["--skip_ratio", "0"]
    if behavior == "skip":
        return ["--skip_ratio", str((num_layers - k - 1) / num_layers)]
    return ["--behavior", "balcony", "--skip_ratio", "0", "--balcony_exit", str(k), "--balcony_exits_path",
            str(exits_path), "--balcony_warmup_steps", "0"]


def layers_run(behavior: str, k: int, num_layers: int) -> int:
    return num_layers if behavior == "full" else k + 1


def run_cell(behavior: str, seed: int, cell_args: list[str], args, extra: list[str]) -> dict:
    out = Path(args.out) / f"{behavior}_seed{seed}"
    argv = ["--config", args.config, "--model_name_or_path", args.model_name_or_path, "--output_dir", str(out),
            "--seed", str(seed), "--max_steps", str(args.max_steps), "--save_strategy", "no", "--eval_every", "0",
            *cell_args, *extra]
    start = time.perf_counter()
    if args.jobs > 1:  # separate processes, one torch thread each (as benchmarks/nested_reft_grid.py)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.with_suffix(".log").open("w") as f:
            done = subprocess.run([sys.executable, "-m", "recipes.math_reft", *argv], stdout=f,
                                  stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if done.returncode != 0:
            raise RuntimeError(f"run {behavior} seed {seed} failed; see {out.with_suffix('.log')}")
    else:
        from recipes import math_reft

        math_reft.main(argv)
    row = read_cell(out, wall_seconds=time.perf_counter() - start)
    return {**row, "behavior": behavior, "seed": seed}


def rollout_throughput(model_path: str, k: int, exits_path: Path, args) -> dict:
    """tokens/s of full, skipped and exit-k sampling on one fixed workload (best of the repeats)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from archs.tiny.math_task import as_chat, generate_problems
    from nested_reft.engines import HFEngine, SamplingSpec
    from nested_reft.engines.balcony import BalconyHFEngine
    from nested_reft.skipping import LayerSkipPolicy

    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    tok = AutoTokenizer.from_pretrained(model_path)
    n = len(model.model.layers)
    prompts = [tok.apply_chat_template(as_chat(p), add_generation_prompt=True, tokenize=True)
               for p in generate_problems(args.throughput_prompts, "test", seed=0)]
    prompts = [list(p["input_ids"]) if hasattr(p, "keys") else list(p) for p in prompts]  # a BatchEncoding or ids
    skip = LayerSkipPolicy(n, skip_ratio=(n - k - 1) / n, keep_first=args.keep_first, keep_last=args.keep_last,
                           seed=0).draw()
    skipped = HFEngine(model, tok, batch_size=len(prompts))
    skipped.set_skip(skip)
    engines = {"full": HFEngine(model, tok, batch_size=len(prompts)), "skip": skipped,
               "balcony": BalconyHFEngine(model, tok, exit=k, exits_path=str(exits_path), batch_size=len(prompts))}
    spec = SamplingSpec(max_new_tokens=args.throughput_tokens, seed=0)
    timings: dict[str, list[float]] = {name: [] for name in engines}
    with torch.no_grad():
        for engine in engines.values():  # warm-up
            engine.generate(prompts[:1], SamplingSpec(max_new_tokens=2, seed=0), ignore_eos=True)
        for r in range(args.repeats):
            names = list(engines) if r % 2 == 0 else list(engines)[::-1]  # alternate the order against drift
            for name in names:
                timings[name].append(engines[name].generate(prompts, spec, ignore_eos=True).tokens_per_s)
    return {"skip_set": list(skip), "prompts": len(prompts), "tokens_per_prompt": args.throughput_tokens,
            "tokens_per_s": {name: max(v) for name, v in timings.items()}, "all": timings}


def summarize(cells: list[dict], throughput: dict, k: int, num_layers: int) -> list[dict]:
    rows = []
    for behavior in BEHAVIORS:
        mine = sorted((c for c in cells if c["behavior"] == behavior), key=lambda c: c["seed"])

        def mean(key, mine=mine):
            return statistics.fmean(c[key] for c in mine)

        rows.append({
            "behavior": behavior, "layers_run": layers_run(behavior, k, num_layers), "seeds": [c["seed"] for c in mine],
            "before": [c["before"]["accuracy"] for c in mine], "after": [c["after"]["accuracy"] for c in mine],
            "mean_ess": mean("mean_ess"), "mean_kl_behavior": mean("mean_kl_behavior"),
            "round_tokens_per_s": mean("behavior_tokens_per_s"), "seconds_per_step": mean("seconds_per_step"),
            "fixed_tokens_per_s": throughput["tokens_per_s"][behavior],
        })
    return rows


def table(rows: list[dict], k: int, num_layers: int) -> str:
    label = {"full": "full model", "skip": f"skip {num_layers - k - 1} of {num_layers} layers",
             "balcony": f"Balcony exit {k}"}
    full_speed = next(r["fixed_tokens_per_s"] for r in rows if r["behavior"] == "full")
    lines = ["| behavior | layers per token | acc before | acc after (per seed) | Δ | mean ESS | mean KL(μ‖π_old) "
             "| tok/s, rounds | tok/s, fixed workload (× full) | s/step |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        before, after = statistics.fmean(r["before"]), statistics.fmean(r["after"])
        seeds = ", ".join(f"{a:.1%}" for a in r["after"])
        lines.append(f"| {label[r['behavior']]} | {r['layers_run']} | {before:.1%} | {after:.1%} ({seeds}) | "
                     f"{100 * (after - before):+.1f} | {r['mean_ess']:.3f} | {r['mean_kl_behavior']:.3f} | "
                     f"{r['round_tokens_per_s']:.0f} | {r['fixed_tokens_per_s']:.0f} "
                     f"({r['fixed_tokens_per_s'] / full_speed:.2f}×) | {r['seconds_per_step']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max_steps", type=int, default=24, help="optimizer steps per RL run")
    p.add_argument("--exit", type=int, default=None, help="exit depth k (default: the shallowest default exit)")
    p.add_argument("--exit_steps", type=int, default=200, help="distillation steps of the exit (recipes/train_balcony.py)")
    p.add_argument("--exit_args", nargs="*", default=[], help="extra recipes/train_balcony.py arguments, as key=value")
    p.add_argument("--jobs", type=int, default=2, help="RL runs at once")
    p.add_argument("--model_name_or_path", default=None, help="default: the embedded tiny math model")
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--keep_first", type=int, default=2, help="as the config's keep_first (the skip set's range)")
    p.add_argument("--keep_last", type=int, default=2)
    p.add_argument("--throughput_prompts", type=int, default=128, help="prompts of the fixed workload (one batch)")
    p.add_argument("--throughput_tokens", type=int, default=64, help="tokens sampled per prompt")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--reuse_runs", action="store_true", help="re-read the exit and RL runs under --out; time again")
    p.add_argument("--out", default="outputs/benchmarks/balcony_vs_skip")
    args = p.parse_args(own)
    from transformers import AutoConfig

    from archs.balcony import default_exits
    from recipes import train_balcony

    if args.model_name_or_path is None:
        from archs.tiny import build_tiny_math_model

        args.model_name_or_path = str(build_tiny_math_model())
    num_layers = AutoConfig.from_pretrained(args.model_name_or_path).num_hidden_layers
    k = args.exit if args.exit is not None else default_exits(num_layers, args.keep_first)[0]
    out = Path(args.out)
    start = time.perf_counter()
    if args.reuse_runs:
        exit_summary = json.loads((out / "exit" / "train_balcony.json").read_text())
    else:
        print(f"training Balcony exit {k} of {num_layers} ({args.exit_steps} steps) ...", flush=True)
        exit_argv = [f"--{a}" if i % 2 == 0 else a for pair in args.exit_args for i, a in enumerate(pair.split("=", 1))]
        exit_summary = train_balcony.main(["--model_name_or_path", args.model_name_or_path, "--exits", str(k),
                                           "--max_steps", str(args.exit_steps), "--output_dir", str(out / "exit"),
                                           *exit_argv])
    exits_path = Path(exit_summary["exits_path"])
    print("timing the behavior models on a fixed workload ...", flush=True)
    throughput = rollout_throughput(args.model_name_or_path, k, exits_path, args)
    cells = [(b, s) for s in args.seeds for b in BEHAVIORS]

    def run(cell):
        behavior, seed = cell
        if args.reuse_runs:
            return {**read_cell(out / f"{behavior}_seed{seed}"), "behavior": behavior, "seed": seed}
        print(f"running {behavior} seed {seed} ...", flush=True)
        return run_cell(behavior, seed, behavior_args(behavior, k, num_layers, exits_path), args, extra)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(run, cells))
    rows = summarize(results, throughput, k, num_layers)
    md = table(rows, k, num_layers)
    payload = {"command": command_line("benchmarks.balcony_vs_skip", argv), "model": args.model_name_or_path,
               "num_layers": num_layers, "exit": k, "exit_training": {key: exit_summary[key] for key in (
                   "heldout_kl_before", "heldout_kl_after", "train_seconds")},
               "throughput": throughput, "rows": rows, "cells": results, "wall_seconds": time.perf_counter() - start}
    write_report(out, "balcony_vs_skip", payload, md)
    print("\n" + md)
    print(f"\nexit {k}: held-out KL to the full model {exit_summary['heldout_kl_before'][str(k)]:.3f} untrained -> "
          f"{exit_summary['heldout_kl_after'][str(k)]:.3f} after {args.exit_steps} steps; "
          f"wall {payload['wall_seconds'] / 60:.1f} min; {out}/balcony_vs_skip.json, .md")
    return payload


if __name__ == "__main__":
    main()
