"""Soak test of the rewards: many fuzzed completions through the math verifier's worker pool and
the translation reward, in trainer-sized batches.

    python -m benchmarks.reward_soak [--n 10000] [--batch 128] [--workers 2] [--out outputs/benchmarks/reward_soak]

Math items are the labelled kinds of `benchmarks.rewards` (right and wrong answers, fractions,
GSM8K, symbolic, malformed, 10 kB texts) plus fuzz: random bytes and Unicode, unbalanced braces,
`\\boxed{10^{10^{10}}}` and other expressions that hang a verifier without its time limit.
Translation items mix well-formed `<think>…</think><answer>…</answer>` completions with broken,
nested, empty and non-text ones. Checks, batch by batch: nothing raises, one score per item in
the order given, every labelled item gets its label, and no batch takes longer than
`batch × timeout` (the verifier's own bound). Prints items/s and writes JSON and Markdown.
"""

from __future__ import annotations

import argparse
import random
import string
import time
from pathlib import Path

from benchmarks.report import command_line, write_report
from benchmarks.rewards import build_items
from rewards.math import accuracy_reward, get_verifier
from rewards.translation import translation_reward

HANGS = ["\\boxed{10^{10^{10}}}", "\\boxed{9^{9^{9^{9}}}}", "\\boxed{(10**(10**10))}", "\\boxed{2^{2^{2^{2^{2^{2}}}}}}"]


def fuzz_text(rng: random.Random, max_len: int = 400) -> str:
    alphabet = string.printable + "{}\\$#<>/" + "".join(chr(c) for c in (0x00, 0x7f, 0xe9, 0x4e2d, 0x1f600, 0x202e))
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, max_len)))


def math_items(n: int, seed: int) -> list[tuple[object, str, float | None]]:
    """(completion, gold, expected score or None when unlabelled)."""
    rng = random.Random(seed)
    labelled = build_items(n, seed)
    out = []
    for i in range(n):
        r = rng.random()
        if r < 0.003:  # rare, as in training: each costs up to the verifier's time limit
            out.append((f"so \\boxed{{{rng.randint(1, 9)}}} or maybe {rng.choice(HANGS)}", "7", None))
        elif r < 0.15:
            out.append((fuzz_text(rng), str(rng.randint(0, 99)), None))
        elif r < 0.2:
            out.append(([{"role": "assistant", "content": fuzz_text(rng)}], fuzz_text(rng, 20) or "0", None))
        else:
            out.append(labelled[i])
    return out


def translation_items(n: int, seed: int) -> list[tuple[object, str, str, float | None]]:
    """(completion, src, ref, expected or None)."""
    rng = random.Random(seed + 1)
    out = []
    for _ in range(n):
        ref = " ".join(rng.choice(["the", "cat", "sat", "on", "a", "mat", "dog", "ran"]) for _ in range(rng.randint(1, 12)))
        r = rng.random()
        if r < 0.3:  # exact translation: 0.2 + chrF 1.0
            think = "".join(rng.choice(string.ascii_letters + " .,") for _ in range(rng.randint(1, 80))) + "."
            out.append((f"<think>{think}</think><answer>{ref}</answer>", "src", ref, 1.2))
        elif r < 0.5:  # format broken: 0
            broken = rng.choice(["<think>x</think>", "<answer>" + ref + "</answer>", "<think></think><answer>a</answer>",
                                 "<think>a<think>b</think></think><answer>c</answer>", ""])
            out.append((broken, "src", ref, 0.0))
        elif r < 0.6:
            out.append(([{"role": "assistant", "content": fuzz_text(rng)}], "src", ref, None))
        else:
            out.append((f"<think>{fuzz_text(rng, 60)}</think><answer>{fuzz_text(rng, 60)}</answer>", fuzz_text(rng, 30),
                        ref, None))
    return out


def soak(name: str, items: list, score_batch, batch: int, bound_s: float, cut_off=lambda: 0) -> dict:
    """`cut_off()`: checks the scorer has cut off so far (each scores 0, whatever its label)."""
    scores, slowest, start, cut0 = [], 0.0, time.perf_counter(), cut_off()
    for lo in range(0, len(items), batch):
        chunk = items[lo:lo + batch]
        t = time.perf_counter()
        got = score_batch(chunk)
        elapsed = time.perf_counter() - t
        slowest = max(slowest, elapsed)
        if len(got) != len(chunk):
            raise AssertionError(f"{name}: {len(got)} scores for {len(chunk)} items at {lo}")
        if elapsed > bound_s * len(chunk):
            raise AssertionError(f"{name}: batch at {lo} took {elapsed:.1f} s > {bound_s} s x {len(chunk)} items")
        scores += got
    seconds = time.perf_counter() - start
    expected = [item[-1] for item in items]
    wrong = [i for i, (s, e) in enumerate(zip(scores, expected)) if e is not None and abs(s - e) > 1e-9]
    cut = cut_off() - cut0
    # a check cut off at the time limit scores 0: on a loaded machine a few labelled ones may be; a lost or
    # reordered result would instead disagree with about half of the labels
    if len(wrong) > cut or any(scores[i] != 0 for i in wrong):
        i = wrong[0]
        raise AssertionError(f"{name}: {len(wrong)} labelled items got another score (first: item {i}: "
                             f"{scores[i]} != {expected[i]}): lost or reordered results")
    return {"reward": name, "items": len(items), "labelled": sum(e is not None for e in expected),
            "seconds": round(seconds, 2), "items_per_s": round(len(items) / seconds, 1),
            "slowest_batch_s": round(slowest, 3), "cut_off": cut, "labelled_disagreeing": len(wrong),
            "mean_score": round(sum(scores) / len(scores), 4)}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10_000, help="items per reward")
    p.add_argument("--batch", type=int, default=128, help="items per reward call (a generation round)")
    p.add_argument("--workers", type=int, default=2, help="math verifier worker processes")
    p.add_argument("--timeout", type=float, default=1.0, help="seconds per math check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/benchmarks/reward_soak")
    args = p.parse_args(argv)
    if args.n < 1 or args.batch < 1 or args.workers < 1 or not args.timeout > 0:
        p.error("--n, --batch and --workers must be >= 1 and --timeout > 0")
    get_verifier(args.workers, args.timeout).score("1", "1")  # start the workers before timing

    def math_batch(chunk):
        return accuracy_reward([c for c, _, _ in chunk], [g for _, g, _ in chunk], timeout=args.timeout,
                               num_workers=args.workers)

    def translation_batch(chunk):
        return translation_reward([c for c, _, _, _ in chunk], [s for _, s, _, _ in chunk], [r for _, _, r, _ in chunk])

    # a check that overruns is killed at the timeout and its worker restarted (about 1 s on a loaded machine)
    rows = [soak("math accuracy", math_items(args.n, args.seed), math_batch, args.batch, bound_s=args.timeout + 2.0,
                 cut_off=lambda: get_verifier(args.workers, args.timeout).timeouts),
            soak("translation chrF (format-gated)", translation_items(args.n, args.seed), translation_batch,
                 args.batch, bound_s=0.1)]
    header = ("| reward | items | labelled | seconds | items/s | slowest batch s | cut off at the time limit | mean score |"
              "\n|---|---|---|---|---|---|---|---|")
    lines = [header] + [f"| {r['reward']} | {r['items']} | {r['labelled']} | {r['seconds']} | {r['items_per_s']} | "
                        f"{r['slowest_batch_s']} | {r['cut_off']} | {r['mean_score']} |" for r in rows]
    print("\n".join(lines))
    write_report(Path(args.out), "reward_soak", {"command": command_line("benchmarks.reward_soak", argv),
                                           "config": vars(args), "results": rows}, "\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
