"""Throughput of the math accuracy reward: verifications per second, serial and parallel.

    python -m benchmarks.rewards [--n 1000] [--workers N] [--timeout 1.0] [--out PATH]

Builds `--n` mixed completions (right and wrong boxed integers, fractions, GSM8K `####` answers,
symbolic expressions, malformed and long text) and scores them three ways:

- serial:        one `MathVerifier` worker process;
- verifier-pool: one `MathVerifier` with `--workers` worker processes (its own thread pool);
- process-pool:  a `ProcessPoolExecutor` of `--workers` processes, each calling `accuracy_reward`
                 on chunks of the batch (each with its own one-worker verifier).

Worker start-up is excluded: every mode is warmed up before it is timed. Prints a Markdown table
and writes the numbers as JSON to `--out`.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: its own folder would shadow the `rewards` package
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402

from rewards.completions import completion_text  # noqa: E402
from rewards.math import accuracy_reward, get_verifier  # noqa: E402
from rewards.verifier import MathVerifier  # noqa: E402

FILLER = "Let me think about this step by step, checking every intermediate result twice. "


def build_items(n: int, seed: int = 0) -> list[tuple[object, str, float]]:
    """`n` (completion, gold, expected score) triples, cycling through the kinds of output."""
    rng = random.Random(seed)

    def boxed_int():
        a = rng.randint(-999, 9999)
        ok = rng.random() < 0.5
        return f"The result is \\boxed{{{a if ok else a + rng.randint(1, 9)}}}.", str(a), float(ok)

    def fraction():
        p, q = rng.randint(1, 20), rng.choice([2, 4, 5, 8, 10])
        ok = rng.random() < 0.5
        pred = f"\\boxed{{\\frac{{{p * 3}}}{{{q * 3}}}}}" if ok else f"\\boxed{{\\frac{{{p + 1}}}{{{q}}}}}"
        return pred, str(p / q), float(ok)

    def gsm8k():
        a = rng.randint(1000, 99999)
        ok = rng.random() < 0.5
        pred = f"She earns {a - 10} + 10 dollars.\n#### {a if ok else a - 10:,}"
        gold = f"She earns {a - 10} + 10 = <<{a - 10}+10={a}>>{a} dollars.\n#### {a:,}"
        return [{"role": "assistant", "content": pred}], gold, float(ok)

    def symbolic():
        a = rng.randint(1, 9)
        ok = rng.random() < 0.5
        pred = f"\\boxed{{x^2+{2 * a}x+{a * a}}}" if ok else f"\\boxed{{x^2+{a * a}}}"
        return pred, f"(x+{a})^2", float(ok)

    def malformed():
        junk = rng.choice(
            ["\\boxed{", "}}}{{", "\\frac{", "$$", "#### ", "\\sqrt", "\ud800", "<think>", "\x00"]
        )
        return "I am not sure " + junk * rng.randint(1, 50), str(rng.randint(0, 99)), 0.0

    def long_text():
        a = rng.randint(0, 999)
        return FILLER * 100 + f"\nSo the answer is \\boxed{{{a}}}.", str(a), 1.0

    kinds = [boxed_int, fraction, gsm8k, symbolic, malformed, long_text]
    return [kinds[i % len(kinds)]() for i in range(n)]


_barrier = None


def _warm_process(timeout: float, barrier) -> None:
    """Process-pool initializer: start this process's verifier worker before timing begins."""
    global _barrier
    _barrier = barrier
    accuracy_reward(["\\boxed{x^2+2x+1}", "\\boxed{\\frac{1}{2}}"], ["(x+1)^2", "0.5"], timeout=timeout)


def _rendezvous(_: int) -> int:
    """Blocks until every pool process runs one: so all of them exist and are warm."""
    _barrier.wait(timeout=300)
    return os.getpid()


def _score_chunk(args: tuple[list, list[str], float]) -> tuple[list[float], int]:
    completions, golds, timeout = args
    verifier = get_verifier(1, timeout)
    before = verifier.timeouts
    scores = accuracy_reward(completions, golds, timeout=timeout)
    return scores, verifier.timeouts - before


def bench_verifier(preds: list[str], golds: list[str], workers: int, timeout: float) -> dict:
    verifier = MathVerifier(num_workers=workers, timeout=timeout)
    try:
        # start every worker and let each warm its caches (the first sympy call is slow)
        verifier.score_many(preds[: 2 * workers], golds[: 2 * workers])
        before = verifier.timeouts
        started = time.perf_counter()
        scores = verifier.score_many(preds, golds)
        seconds = time.perf_counter() - started
        return {"scores": scores, "seconds": seconds, "timeouts": verifier.timeouts - before}
    finally:
        verifier.close()


def bench_process_pool(completions: list, golds: list[str], workers: int, timeout: float,
                       chunk_size: int) -> dict:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(workers)
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_warm_process,
                             initargs=(timeout, barrier)) as pool:
        pids = set(pool.map(_rendezvous, range(workers)))
        assert len(pids) == workers, pids
        chunks = [
            (completions[i : i + chunk_size], golds[i : i + chunk_size], timeout)
            for i in range(0, len(completions), chunk_size)
        ]
        started = time.perf_counter()
        results = list(pool.map(_score_chunk, chunks))
        seconds = time.perf_counter() - started
    scores = [s for chunk_scores, _ in results for s in chunk_scores]
    return {"scores": scores, "seconds": seconds, "timeouts": sum(t for _, t in results)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="completions to score (default 1000)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="parallel workers (default: os.cpu_count())")
    parser.add_argument("--timeout", type=float, default=1.0, help="seconds per check (default 1.0)")
    parser.add_argument("--out", default="outputs/benchmarks/rewards.json", help="JSON results file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.n < 1 or args.workers < 1 or not args.timeout > 0:
        parser.error("--n and --workers must be >= 1 and --timeout > 0")

    items = build_items(args.n, args.seed)
    completions = [c for c, _, _ in items]
    golds = [g for _, g, _ in items]
    expected = [e for _, _, e in items]
    preds = [completion_text(c) for c in completions]
    chunk_size = max(1, -(-args.n // (4 * args.workers)))  # about 4 chunks per process

    runs = [
        ("serial (MathVerifier)", 1, lambda: bench_verifier(preds, golds, 1, args.timeout)),
        ("verifier-pool (MathVerifier)", args.workers,
         lambda: bench_verifier(preds, golds, args.workers, args.timeout)),
        ("process-pool (ProcessPoolExecutor + accuracy_reward)", args.workers,
         lambda: bench_process_pool(completions, golds, args.workers, args.timeout, chunk_size)),
    ]
    rows = []
    for mode, workers, run in runs:
        result = run()
        scores = result["scores"]
        assert len(scores) == len(items)
        rows.append({
            "mode": mode,
            "workers": workers,
            "items": len(scores),
            "seconds": round(result["seconds"], 3),
            "items_per_s": round(len(scores) / result["seconds"], 1),
            "timeouts": result["timeouts"],
            "accuracy_mean": round(sum(scores) / len(scores), 4),
            "agreement_with_expected": round(sum(s == e for s, e in zip(scores, expected, strict=True)) / len(scores), 4),
        })

    header = ["mode", "workers", "items", "seconds", "items/s", "timeouts", "accuracy-mean", "agree"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        print(f"| {r['mode']} | {r['workers']} | {r['items']} | {r['seconds']:.2f} | {r['items_per_s']:.1f} "
              f"| {r['timeouts']} | {r['accuracy_mean']:.3f} | {r['agreement_with_expected']:.3f} |")
    expected_mean = sum(expected) / len(expected)
    print(f"\nexpected accuracy-mean {expected_mean:.3f}; 'agree' = share of scores equal to the "
          f"expected label; timeout {args.timeout} s per check")

    report = {
        "config": {"n": args.n, "workers": args.workers, "timeout": args.timeout, "seed": args.seed,
                   "chunk_size": chunk_size, "expected_accuracy_mean": round(expected_mean, 4)},
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpu_count": os.cpu_count()},
        "results": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
