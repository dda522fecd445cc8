"""Seconds per optimizer step of the embedded default, on-policy against layer-skipped rollouts.

    python -m benchmarks.step_time [--configs skip0 skip0.25 skip0:fixed skip0.25:fixed skip0.25:rescore]
                                   [--rounds 3] [--warmup_rounds 1] [--repeats 1] [--threads 1]
                                   [--out outputs/benchmarks/step_time]

Every config is `recipes/configs/math_reft_tiny.yaml` (HF engine) with only `skip_ratio` and, after a
colon, `behavior_logprobs` changed (`skip0.125:rescore`: μ from a second, skipped forward instead of
the sampler's own scores), `rollout_compact_every` (`skip0:compact0`: one generate() call per batch) and
`:fixed` (every completion runs to max_completion_length, EOS ignored: the same tokens in every config). All configs run in this one process, back to back, with the same seed, so
the same prompts; `--repeats N` runs the list N times, every other pass in reverse order, so that a
drift in the machine's load falls on every config alike. Each run trains `warmup_rounds + rounds`
generation rounds (`steps_per_generation` optimizer steps each) and times the optimizer steps after
the warm-up round(s). Prints a table and writes `step_time.json` and `step_time.md` into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from benchmarks.report import command_line, write_report

CONFIG = "recipes/configs/math_reft_tiny.yaml"


def parse_config_name(name: str) -> tuple[float, str, int | None]:
    """'skip0.125' -> (0.125, 'sampler', None); 'skip0.125:rescore' -> (0.125, 'rescore', None);
    'skip0:compact0' -> (0.0, 'sampler', 0): rollout_compact_every 0 (None: the config's value)."""
    head, *options = name.split(":")
    source, compact, ok = "sampler", None, True
    for option in options:
        if option in ("sampler", "rescore"):
            source = option
        elif option == "fixed":  # see fixed_length
            pass
        elif option.startswith("compact") and option.removeprefix("compact").isdigit():
            compact = int(option.removeprefix("compact"))
        else:
            ok = False
    try:
        ratio = float(head.removeprefix("skip")) if head.startswith("skip") else None
    except ValueError:
        ratio = None
    if not ok or ratio is None or not 0 <= ratio < 1:
        raise ValueError(f"config {name!r}: expected skip<ratio in [0, 1)>[:sampler|:rescore][:compact<N>][:fixed], "
                         "e.g. skip0.125:rescore or skip0:compact0")
    return ratio, source, compact


def fixed_length(name: str) -> bool:
    """'skip0.125:fixed': every completion runs to max_completion_length (EOS ignored), so every config
    generates the same number of tokens and the per-step time measures the model, not the luck of how
    long a round's longest completion was. A timing workload only: the samples are still trained on."""
    return "fixed" in name.split(":")[1:]


def run_order(configs: list[str], repeats: int) -> list[tuple[int, str]]:
    """(pass, config) in running order: every other pass reversed (A B C, C B A, A B C, ...)."""
    return [(p, c) for p in range(repeats) for c in (configs if p % 2 == 0 else configs[::-1])]


def summarise(step_ends: list[float], t0: float, logs: list[dict], steps_per_round: int, warmup_rounds: int,
              cpu_ends: list[float] | None = None, cpu0: float = 0.0) -> dict:
    """Timings of the steps after the warm-up rounds, from the wall-clock (and this process's CPU
    time) at each step's end and the trainer's per-round logs (rollout/* metrics are logged once per
    round, on its first step). With one torch thread, CPU time leaves out the time spent waiting for
    a core that other jobs hold, so it is the steadier measure on a shared machine."""
    w = warmup_rounds * steps_per_round
    if len(step_ends) <= w:
        raise ValueError(f"only {len(step_ends)} steps ran, need more than the {w} warm-up steps")
    durations = [b - a for a, b in zip([t0, *step_ends[:-1]], step_ends)]
    timed = durations[w:]
    rounds = [r for r in logs if "rollout/generate_seconds" in r and r["step"] > w]
    n = len(timed)
    cpu = (cpu_ends[-1] - ([cpu0, *cpu_ends][w])) / n if cpu_ends else float("nan")

    def per_step(key):
        return sum(r.get(key, 0.0) for r in rounds) / n

    first = [d for i, d in enumerate(timed) if i % steps_per_round == 0]  # the round's step: generation + scoring
    rest = [d for i, d in enumerate(timed) if i % steps_per_round != 0]
    return {
        "timed_steps": n, "timed_rounds": len(rounds),
        "seconds_per_step": sum(timed) / n,
        "cpu_seconds_per_step": cpu,
        "generate_seconds_per_step": per_step("rollout/generate_seconds"),
        "behavior_logprob_seconds_per_step": per_step("rollout/logprob_seconds"),  # engine-side rescoring (0 here)
        "correction_seconds_per_step": per_step("correction/seconds"),  # π_old / μ forwards and weights in our trainer
        "generation_step_seconds": statistics.mean(first) if first else float("nan"),
        "other_step_seconds": statistics.mean(rest) if rest else float("nan"),
        "skipped_layers": [r.get("rollout/skipped_layers") for r in rounds],
        "behavior_tokens_per_s": statistics.mean(r["rollout/behavior_tokens_per_s"] for r in rounds) if rounds else float("nan"),
        "tokens_per_round": statistics.mean(r["rollout/behavior_tokens_per_s"] * r["rollout/generate_seconds"] for r in rounds) if rounds else float("nan"),
        "mean_completion_length": statistics.mean(r.get("completions/mean_length", float("nan")) for r in rounds) if rounds else float("nan"),
        "max_length_ratio": statistics.mean(r.get("completions/clipped_ratio", float("nan")) for r in rounds) if rounds else float("nan"),
        "step_seconds": timed,
        # per decode step of the batch and per padded completion token: the costs with the length factored out
        "generate_ms_per_decode_step": statistics.median(1000 * r["rollout/generate_seconds"] / r["completions/max_length"]
                                                          for r in rounds) if rounds and all("completions/max_length" in r for r in rounds) else float("nan"),
        # HF generate decodes the whole batch until its longest completion ends, and TRL pads every
        # training tensor of the round to that length: the longest completion sets both costs
        "rounds": [{"skipped_layers": r.get("rollout/skipped_layers"), "max_length": r.get("completions/max_length"),
                    "mean_length": r.get("completions/mean_length"), "generate_seconds": r["rollout/generate_seconds"],
                    "first_step_seconds": timed[i * steps_per_round] if i * steps_per_round < n else None,
                    "other_steps_seconds": statistics.mean(timed[i * steps_per_round + 1:(i + 1) * steps_per_round] or [float("nan")])}
                   for i, r in enumerate(rounds)],
    }


def run_one(name: str, args, model_path: str) -> dict:
    """One training run of `name` in this process; its timings."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import ModelConfig, TrlParser

    from nested_reft.config import NestedReFTConfig
    from nested_reft.trainer import NestedReFTTrainer
    from recipes.math_reft import MathReFTArguments, load_data
    from rewards.math import accuracy_reward, format_reward

    ratio, source, compact = parse_config_name(name)
    parser = TrlParser((MathReFTArguments, NestedReFTConfig, ModelConfig))
    script_args, targs, _ = parser.parse_args_and_config(args=[
        "--config", args.config, "--skip_ratio", str(ratio), "--behavior_logprobs", source,
        *(["--rollout_compact_every", str(compact)] if compact is not None else []),
        "--output_dir", str(Path(args.out) / name.replace(":", "_")), "--save_strategy", "no", "--report_to", "none",
        "--max_steps", "1"])  # replaced below, once steps_per_generation is known
    steps_per_round = targs.steps_per_generation
    targs.max_steps = (args.warmup_rounds + args.rounds) * steps_per_round
    train = load_data(script_args, script_args.train_split, script_args.train_limit, targs.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)

    class Clock(TrainerCallback):
        t0, cpu0, ends, cpu_ends, logs = 0.0, 0.0, [], [], []

        def on_train_begin(self, *a, **kw):
            Clock.t0, Clock.cpu0 = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **kw):
            Clock.ends.append(time.perf_counter())
            Clock.cpu_ends.append(time.process_time())

        def on_log(self, targs, state, control, logs=None, **kw):
            Clock.logs.append({"step": state.global_step, **(logs or {})})

    Clock.ends, Clock.cpu_ends, Clock.logs = [], [], []
    trainer = NestedReFTTrainer(model=model, reward_funcs=[accuracy_reward, format_reward], args=targs,
                                train_dataset=train, processing_class=tokenizer, callbacks=[Clock()])
    if fixed_length(name):
        generate = trainer.engine.generate
        trainer.engine.generate = lambda prompts, sampling, **kw: generate(prompts, sampling, ignore_eos=True)
    trainer.train()
    trainer.engine.close()
    row = summarise(Clock.ends, Clock.t0, Clock.logs, steps_per_round, args.warmup_rounds, Clock.cpu_ends, Clock.cpu0)
    return {"config": name, "skip_ratio": ratio, "behavior_logprobs": source, "engine": targs.engine,
            "load_average_1min": os.getloadavg()[0], **row}


def aggregate(runs: list[dict], configs: list[str]) -> list[dict]:
    """Per config: the median over passes of each timing, and of its s/step over the first config's in
    the same pass."""
    keys = ("seconds_per_step", "cpu_seconds_per_step", "generate_seconds_per_step", "generate_ms_per_decode_step", "correction_seconds_per_step", "generation_step_seconds",
            "other_step_seconds", "behavior_tokens_per_s", "tokens_per_round", "mean_completion_length", "max_length_ratio")
    rows = []
    for c in configs:
        mine = [r for r in runs if r["config"] == c]
        if not mine:
            raise ValueError(f"no run of config {c!r}")
        row = {"config": c, "passes": len(mine), **{k: statistics.median(r[k] for r in mine) for k in keys},
               "seconds_per_step_each": [r["seconds_per_step"] for r in mine],
               "skipped_layers": [k for r in mine for k in r["skipped_layers"]]}
        rows.append(row)
    # the ratio to the first config within each pass (same machine load, minutes apart), then its median
    for key, name in (("seconds_per_step", "ratio_to_first"), ("cpu_seconds_per_step", "cpu_ratio_to_first")):
        first = {r["pass"]: r.get(key, float("nan")) for r in runs if r["config"] == configs[0]}
        for row in rows:
            ratios = [r.get(key, float("nan")) / first[r["pass"]] for r in runs if r["config"] == row["config"] and r["pass"] in first]
            row[f"{name}_each_pass"] = ratios
            row[name] = statistics.median(ratios) if ratios else float("nan")
    return rows


def _each_pass(row: dict, key: str) -> str:
    return "" if row["passes"] == 1 else " (" + ", ".join(f"{x:.2f}" for x in row[key]) + ")"


def table(rows: list[dict]) -> str:
    first = rows[0]["config"]
    lines = [f"| config | k drawn | s/step (each pass) | × {first}, same pass | CPU s/step | CPU × {first}, same pass "
             "| generate s/step | generate ms per decode step | π_old/μ scoring s/step | round's first step s "
             "| other steps s | behavior tok/s | tokens per round | mean completion length | at max length |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ks = ",".join(str(k) for k in sorted({int(k) for k in r["skipped_layers"] if k is not None}))
        lines.append(f"| {r['config']} | {ks} | {r['seconds_per_step']:.2f}{_each_pass(r, 'seconds_per_step_each')} | "
                     f"{r['ratio_to_first']:.2f}{_each_pass(r, 'ratio_to_first_each_pass')} | {r['cpu_seconds_per_step']:.2f} | "
                     f"{r['cpu_ratio_to_first']:.2f}{_each_pass(r, 'cpu_ratio_to_first_each_pass')} | "
                     f"{r['generate_seconds_per_step']:.2f} | {r['generate_ms_per_decode_step']:.1f} | "
                     f"{r['correction_seconds_per_step']:.2f} | "
                     f"{r['generation_step_seconds']:.2f} | {r['other_step_seconds']:.2f} | {r['behavior_tokens_per_s']:.0f} | "
                     f"{r['tokens_per_round']:.0f} | {r['mean_completion_length']:.1f} | {r['max_length_ratio']:.0%} |")
    return "\n".join(lines)


def rounds_table(runs: list[dict]) -> str:
    """Per timed round of the first pass: longest and mean completion, and what it cost."""
    lines = ["| config | round | k | longest completion | mean completion | generate s | generate ms per decode step "
             "| round's first step s | other steps s | other steps ms per padded token |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    first_pass = min(r["pass"] for r in runs)
    for r in (r for r in runs if r["pass"] == first_pass):
        for i, x in enumerate(r.get("rounds", []), start=1):
            lines.append(f"| {r['config']} | {i} | {int(x['skipped_layers'] or 0)} | {x['max_length']:.0f} | {x['mean_length']:.1f} | "
                         f"{x['generate_seconds']:.2f} | {1000 * x['generate_seconds'] / x['max_length']:.1f} | "
                         f"{x['first_step_seconds']:.2f} | {x['other_steps_seconds']:.2f} | "
                         f"{1000 * x['other_steps_seconds'] / x['max_length']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["skip0", "skip0.25", "skip0:fixed", "skip0.25:fixed", "skip0.25:rescore"])
    p.add_argument("--rounds", type=int, default=3, help="timed generation rounds per run")
    p.add_argument("--warmup_rounds", type=int, default=1, help="untimed generation rounds first")
    p.add_argument("--repeats", type=int, default=1, help="passes over --configs, alternating order")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 avoids oversubscription on a shared machine)")
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--out", default="outputs/benchmarks/step_time")
    p.add_argument("--table_only", action="store_true", help="re-make the table from --out/step_time.json, run nothing")
    args = p.parse_args(argv)
    for c in args.configs:
        try:
            parse_config_name(c)
        except ValueError as e:
            p.error(f"--configs: {e}")
    if args.rounds < 1 or args.warmup_rounds < 0 or args.repeats < 1:
        p.error("need --rounds >= 1, --warmup_rounds >= 0, --repeats >= 1")
    out = Path(args.out)
    if args.table_only:
        saved = json.loads((out / "step_time.json").read_text())
        rows = aggregate(saved["runs"], [r["config"] for r in saved["rows"]])
        saved["rows"] = rows
        md = table(rows) + "\n\n" + rounds_table(saved["runs"])
        write_report(out, "step_time", saved, md)
        print(md)
        return rows
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from archs.tiny import build_tiny_math_model

    model_path = str(build_tiny_math_model())
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for pass_, name in run_order(args.configs, args.repeats):
        print(f"pass {pass_}: {name} ...", flush=True)
        runs.append({"pass": pass_, **run_one(name, args, model_path)})
        r = runs[-1]
        print(f"pass {pass_}: {name}: {r['seconds_per_step']:.2f} s/step, generate {r['generate_seconds_per_step']:.2f} s/step, "
              f"k {r['skipped_layers']}, load {r['load_average_1min']:.1f}", flush=True)
    rows = aggregate(runs, args.configs)
    md = table(rows) + "\n\n" + rounds_table(runs)
    meta = {"command": command_line("benchmarks.step_time", argv),
            "config": args.config, "rounds": args.rounds, "warmup_rounds": args.warmup_rounds, "repeats": args.repeats,
            "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M"), "cpu_count": os.cpu_count()}
    write_report(out, "step_time", {**meta, "rows": rows, "runs": runs}, md)
    print("\n" + md)
    print(f"\nwrote {out}/step_time.json and step_time.md")
    return rows


if __name__ == "__main__":
    main()
