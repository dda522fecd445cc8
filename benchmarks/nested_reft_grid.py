"""The Nested-ReFT study grid: skip_ratio x correction on the embedded default.

    python -m benchmarks.nested_reft_grid [--ratios 0 0.25 0.5] [--corrections none tis retrace seq_mask]
                                          [--max_steps N] [--jobs 2] [--out outputs/benchmarks/nested_reft_grid]
                                          [-- extra recipe arguments]

Each cell is one run of `recipes/math_reft.py` in its own process (same seed, same data, same
step budget; the step budget is the config's unless --max_steps is given). `--jobs N` runs N cells
at once, each with one torch thread (on a small CPU machine two cells with one thread each finish
sooner than one after the other with two threads; tokens/s are then per cell, under the same load). Prints a Markdown table (held-out greedy accuracy before/after, rollout tokens/s,
seconds per step, mean ESS) and writes `grid.json` and `grid.md` into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.report import write_report

CONFIG = "recipes/configs/math_reft_tiny.yaml"


def run_cell(ratio: float, correction: str, args, extra: list[str]) -> dict:
    out = cell_dir(args.out, ratio, correction)
    cmd = [sys.executable, "-m", "recipes.math_reft", "--config", args.config, "--output_dir", str(out),
           "--skip_ratio", str(ratio), "--correction", correction, "--save_strategy", "no", *extra]
    if args.max_steps is not None:
        cmd += ["--max_steps", str(args.max_steps)]
    env = dict(os.environ, OMP_NUM_THREADS="1") if args.jobs > 1 else None
    start = time.perf_counter()
    log = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"run failed ({' '.join(cmd)}); see {log}")
    return read_cell(out, wall_seconds=time.perf_counter() - start)


def cell_dir(out: str | Path, ratio: float, correction: str) -> Path:
    return Path(out) / f"r{ratio}_{correction}"


def read_cell(out: Path, wall_seconds: float | None = None) -> dict:
    """A finished cell: its summary.json, plus the mean KL(μ‖π_old) per token from metrics.jsonl
    (ESS is computed on the correction weights, so it reads 1 for `none` whatever the mismatch)."""
    summary = json.loads((out / "summary.json").read_text())
    kls = [row["correction/kl_behavior"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
           if "correction/kl_behavior" in row]
    summary["mean_kl_behavior"] = sum(kls) / len(kls) if kls else float("nan")
    summary["wall_seconds"] = wall_seconds
    return summary


def grid_cells(ratios, corrections) -> list[tuple[float, str]]:
    """(ratio, correction) pairs in grid order. Nothing skipped: μ = π_old exactly and every
    correction gives w ≡ 1, so ratio 0 is run once."""
    return [(r, c) for r in ratios for c in corrections if not (r == 0 and c != corrections[0])]


def _tokens(row: dict, key: str) -> str:
    value = row.get(key, float("nan"))
    return "—" if value != value else f"{value:.0f}"


def table(rows: list[dict]) -> str:
    # tokens/s of the fixed-length probe (same prompts and lengths for both models); a cell that
    # skips nothing has no probe: its behavior model is the full model
    lines = ["| skip_ratio | correction | acc before | acc after | Δ | behavior tok/s (probe) | full tok/s (probe) "
             "| s/step | mean ESS | mean KL(μ‖π_old) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, a = r["before"]["accuracy"], r["after"]["accuracy"]
        method = "any (w ≡ 1)" if r["skip_ratio"] == 0 else r["correction"]
        lines.append(f"| {r['skip_ratio']} | {method} | {b:.1%} | {a:.1%} | {100 * (a - b):+.1f} | "
                     f"{_tokens(r, 'probe_behavior_tokens_per_s')} | {_tokens(r, 'full_tokens_per_s')} | "
                     f"{r['seconds_per_step']:.1f} | {r['mean_ess']:.3f} | {r.get('mean_kl_behavior', float('nan')):.3f} |")
    return "\n".join(lines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    p.add_argument("--corrections", nargs="+", default=["none", "tis", "retrace", "seq_mask"])
    p.add_argument("--max_steps", type=int, default=None, help="default: the config's max_steps")
    p.add_argument("--jobs", type=int, default=1, help="cells run at once")
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--out", default="outputs/benchmarks/nested_reft_grid")
    p.add_argument("--table_only", action="store_true", help="re-read finished cells under --out, run nothing")
    args = p.parse_args(argv)
    cells = grid_cells(args.ratios, args.corrections)

    def run(cell):
        if args.table_only:
            return read_cell(cell_dir(args.out, *cell))
        print(f"running skip_ratio={cell[0]} correction={cell[1]} ...", flush=True)
        row = run_cell(*cell, args, extra)
        print(table([row]).splitlines()[-1], flush=True)
        return row

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = list(pool.map(run, cells))  # in grid order, whatever order they finish in
    md = table(rows)
    write_report(Path(args.out), "grid", rows, md)
    print("\n" + md)


if __name__ == "__main__":
    main()
