"""Soak test of the rewards: many fuzzed completions through the math verifier's worker pool and
the translation reward, in trainer-sized batches; then an adversarial batch of power towers.

    python -m benchmarks.reward_soak [--n 10000] [--batch 128] [--workers 2] [--out outputs/benchmarks/reward_soak]

Math items are the labelled kinds of `benchmarks.rewards` (right and wrong answers, fractions,
GSM8K, symbolic, malformed, 10 kB texts) plus fuzz: random bytes and Unicode, unbalanced braces,
`\\boxed{10^{10^{10}}}` and other expressions that hang a verifier without its time limit.
Translation items mix well-formed `<think>…</think><answer>…</answer>` completions with broken,
nested, empty and non-text ones. Checks, batch by batch: nothing raises, one score per item in
the order given, every labelled item gets its label, and no batch takes longer than
`batch × timeout` (the verifier's own bound). Prints items/s and writes JSON and Markdown.

The adversarial batch (`--adversarial_batch` items, every `--hang_every`-th a power tower, the rest
labelled answers) runs on warm workers, once as it is and once without its power towers. Each
item is timed: a power tower's wall time, next to the limit, is what a time-out costs; a check
that waited for a worker to start would show as the slowest other item. With them: the workers
restarted, the cold starts, and the load average (`/proc/loadavg`) before and after.
"""

from __future__ import annotations

import argparse
import random
import string
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.report import command_line, write_report
from benchmarks.rewards import build_items
from rewards.completions import completion_text
from rewards.math import accuracy_reward, get_verifier
from rewards.translation import translation_reward
from rewards.verifier import MathVerifier

# each keeps sympy busy for minutes without a time limit
HANGS = ["\\boxed{10^{10^{10}}}", "\\boxed{9^{9^{9^{9}}}}", "\\boxed{10^{10^{10^{10}}}}", "\\boxed{2^{2^{2^{2^{2^{2}}}}}}"]


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


def load_average() -> str | None:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return None


def adversarial_batch(batch: int, hang_every: int, workers: int, timeout: float, seed: int) -> dict:
    """One batch of labelled answers with a power tower every `hang_every` items, on warm workers:
    the wall time of each item, so what a time-out costs next to its limit."""
    labelled = build_items(batch, seed)
    items = [(HANGS[i // hang_every % len(HANGS)], "7", 0.0) if i % hang_every == 0 else labelled[i]
             for i in range(batch)]
    towers = [i % hang_every == 0 for i in range(batch)]
    verifier = MathVerifier(num_workers=workers, timeout=timeout)

    def timed(item):
        start = time.perf_counter()
        score = verifier.score(completion_text(item[0]), item[1])
        return score, time.perf_counter() - start

    def run(chunk):  # as score_many: one thread per worker
        start = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            out = list(pool.map(timed, chunk))
        return [s for s, _ in out], [t for _, t in out], time.perf_counter() - start

    try:
        verifier.start()
        load_before = load_average()
        _, _, without_s = run([item for item, tower in zip(items, towers, strict=True) if not tower])
        before = (verifier.timeouts, verifier.restarts, verifier.cold_starts)
        scores, seconds, batch_s = run(items)
        timeouts, restarts, cold = (a - b for a, b in zip((verifier.timeouts, verifier.restarts, verifier.cold_starts),
                                                         before, strict=True))
    finally:
        verifier.close()
    tower_s = [t for t, tower in zip(seconds, towers, strict=True) if tower]
    other_s = [t for t, tower in zip(seconds, towers, strict=True) if not tower]
    wrong = sum(s != e for s, (_, _, e) in zip(scores, items, strict=True))
    return {"items": batch, "power_towers": len(tower_s), "workers": workers, "limit_s": timeout,
            "batch_s": round(batch_s, 2), "without_power_towers_s": round(without_s, 2),
            "power_tower_item_s_mean": round(sum(tower_s) / len(tower_s), 3), "power_tower_item_s_max": round(max(tower_s), 3),
            "power_tower_over_limit": round(sum(tower_s) / len(tower_s) / timeout, 3),
            "other_item_s_max": round(max(other_s), 3), "timeouts": timeouts, "restarts": restarts,
            "cold_starts": cold, "labelled_disagreeing": wrong, "loadavg_before": load_before,
            "loadavg_after": load_average()}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10_000, help="items per reward")
    p.add_argument("--batch", type=int, default=128, help="items per reward call (a generation round)")
    p.add_argument("--workers", type=int, default=2, help="math verifier worker processes")
    p.add_argument("--timeout", type=float, default=1.0, help="seconds per math check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--adversarial_batch", type=int, default=128, help="items in the adversarial batch (0: skip it)")
    p.add_argument("--hang_every", type=int, default=8, help="a power tower every this many items of it")
    p.add_argument("--out", default="outputs/benchmarks/reward_soak")
    args = p.parse_args(argv)
    if args.n < 1 or args.batch < 1 or args.workers < 1 or not args.timeout > 0 or args.hang_every < 2:
        p.error("--n, --batch and --workers must be >= 1, --hang_every >= 2 and --timeout > 0")
    load_start = load_average()
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
    adversarial = None
    if args.adversarial_batch > 0:
        a = adversarial = adversarial_batch(args.adversarial_batch, args.hang_every, args.workers, args.timeout,
                                            args.seed)
        lines += ["", "| adversarial batch | items | power towers | workers | limit s | batch s | without them s |"
                      " power tower item s (mean / max) | mean / limit | slowest other item s | time-outs | restarts |"
                      " cold starts | labelled disagreeing | load average |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
                  f"| math accuracy | {a['items']} | {a['power_towers']} | {a['workers']} | {a['limit_s']} | "
                  f"{a['batch_s']} | {a['without_power_towers_s']} | {a['power_tower_item_s_mean']} / "
                  f"{a['power_tower_item_s_max']} | {a['power_tower_over_limit']} | {a['other_item_s_max']} | "
                  f"{a['timeouts']} | {a['restarts']} | {a['cold_starts']} | {a['labelled_disagreeing']} | "
                  f"{a['loadavg_before']} → {a['loadavg_after']} |"]
    lines += ["", f"load average (1, 5, 15 min): {load_start} at the start, {load_average()} at the end"]
    print("\n".join(lines))
    write_report(Path(args.out), "reward_soak", {"command": command_line("benchmarks.reward_soak", argv),
                                           "config": vars(args), "results": rows, "adversarial": adversarial,
                                           "loadavg": [load_start, load_average()]}, "\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
