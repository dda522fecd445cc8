"""The Nested-ReFT study grid: skip_ratio x correction on the embedded default.

    python -m benchmarks.nested_reft_grid [--ratios 0 0.25 0.5] [--corrections none tis retrace seq_mask]
                                          [--max_steps 40] [--out outputs/benchmarks/nested_reft_grid]
                                          [-- extra recipe arguments]

Each cell is one run of `recipes/math_reft.py` in its own process (same seed, same data, same
step budget). Prints a Markdown table (held-out greedy accuracy before/after, rollout tokens/s,
seconds per step, mean ESS) and writes `grid.json` and `grid.md` into --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CONFIG = "recipes/configs/math_reft_tiny.yaml"


def run_cell(ratio: float, correction: str, args, extra: list[str]) -> dict:
    out = Path(args.out) / f"r{ratio}_{correction}"
    cmd = [sys.executable, "-m", "recipes.math_reft", "--config", args.config, "--output_dir", str(out),
           "--skip_ratio", str(ratio), "--correction", correction, "--max_steps", str(args.max_steps),
           "--save_strategy", "no", *extra]
    start = time.perf_counter()
    log = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"run failed ({' '.join(cmd)}); see {log}")
    summary = json.loads((out / "summary.json").read_text())
    summary["wall_seconds"] = time.perf_counter() - start
    return summary


def table(rows: list[dict]) -> str:
    lines = ["| skip_ratio | correction | acc before | acc after | Δ | behavior tok/s | full tok/s | s/step | mean ESS |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, a = r["before"]["accuracy"], r["after"]["accuracy"]
        method = "any (w ≡ 1)" if r["skip_ratio"] == 0 else r["correction"]
        lines.append(f"| {r['skip_ratio']} | {method} | {b:.1%} | {a:.1%} | {100 * (a - b):+.1f} | "
                     f"{r['behavior_tokens_per_s']:.0f} | {r['full_tokens_per_s']:.0f} | "
                     f"{r['seconds_per_step']:.1f} | {r['mean_ess']:.3f} |")
    return "\n".join(lines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    p.add_argument("--corrections", nargs="+", default=["none", "tis", "retrace", "seq_mask"])
    p.add_argument("--max_steps", type=int, default=40)
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--out", default="outputs/benchmarks/nested_reft_grid")
    args = p.parse_args(argv)
    rows = []
    for ratio in args.ratios:
        for correction in args.corrections:
            if ratio == 0 and correction != args.corrections[0]:
                continue  # nothing skipped: μ = π_old exactly, every correction gives w ≡ 1: one run
            print(f"running skip_ratio={ratio} correction={correction} ...", flush=True)
            rows.append(run_cell(ratio, correction, args, extra))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    md = table(rows)
    out = Path(args.out)
    (out / "grid.json").write_text(json.dumps(rows, indent=2))
    (out / "grid.md").write_text(md + "\n")
    print("\n" + md)


if __name__ == "__main__":
    main()
