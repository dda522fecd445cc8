"""Cost of the skip-aware vLLM model with nothing skipped (k = 0) against stock vLLM, interleaved.

    python -m benchmarks.vllm_skip_overhead [--batch_sizes 8,32] [--repeats 7] [--rounds 3] [--new_tokens 32]
                                            [--threads 1] [--stock_first] [--out outputs/benchmarks/vllm_skip_overhead]

Both engines run in this one process, side by side: our `VLLMEngine` (the skip-aware subclass of
vLLM's class, skip set empty) and `StockVLLM` (vLLM's own class, the same settings; see
`recipes/rollout_throughput.py`). One repeat measures, per batch size, the two engines one right
after the other on the same prompts and seeds (exactly `--new_tokens` tokens per prompt, EOS
ignored), each as the median tokens/s of `--rounds` generate calls; which engine goes first
alternates between repeats. The ratio skip-aware / stock is taken within each repeat, so a change
of the machine's load between repeats cancels; the table gives its median and spread over repeats.
Writes `overhead.json` and `overhead.md` into --out.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from benchmarks.report import command_line, write_report


def pair_order(repeat: int) -> tuple[str, str]:
    """Which engine is measured first in this repeat (alternating, so neither always goes first)."""
    return ("skip-aware", "stock") if repeat % 2 == 0 else ("stock", "skip-aware")


def spread(values: list[float]) -> dict:
    """Median, min, max and the quartiles (inclusive method; equal to the median for one value)."""
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "q1": q[0], "q3": q[2],
            "n": len(values)}


def summarise(measurements: list[dict]) -> list[dict]:
    """Per batch size: the within-repeat ratios skip-aware / stock, and each engine's tokens/s."""
    rows = []
    for bs in sorted({m["batch_size"] for m in measurements}):
        pairs = {}
        for m in measurements:
            if m["batch_size"] == bs:
                pairs.setdefault(m["repeat"], {})[m["engine"]] = m["tokens_per_s"]
        complete = [p for _, p in sorted(pairs.items()) if {"skip-aware", "stock"} <= p.keys()]
        if not complete:
            raise ValueError(f"batch {bs}: no repeat measured both engines")
        ratios = [p["skip-aware"] / p["stock"] for p in complete]
        rows.append({"batch_size": bs, "ratio": spread(ratios), "ratios": ratios,
                     "skip_aware_tokens_per_s": spread([p["skip-aware"] for p in complete]),
                     "stock_tokens_per_s": spread([p["stock"] for p in complete])})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| batch | repeats | skip-aware k=0 tok/s (median) | stock tok/s (median) | ratio skip-aware / stock: median "
             "| IQR | min–max |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        q = r["ratio"]
        lines.append(f"| {r['batch_size']} | {q['n']} | {r['skip_aware_tokens_per_s']['median']:.0f} | "
                     f"{r['stock_tokens_per_s']['median']:.0f} | {q['median']:.3f} | {q['q1']:.3f}–{q['q3']:.3f} | "
                     f"{q['min']:.3f}–{q['max']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch_sizes", default="8,32")
    p.add_argument("--repeats", type=int, default=7, help="interleaved pairs per batch size")
    p.add_argument("--rounds", type=int, default=3, help="timed generate calls per measurement (median taken)")
    p.add_argument("--warmup", type=int, default=2, help="untimed generate calls per engine and batch size, before the repeats")
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--model_name_or_path", default=None, help="local checkpoint (default: the embedded tiny math model)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--cpu_kvcache_gib", type=int, default=1, help="per engine")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for both engines (1 on a shared machine)")
    p.add_argument("--stock_first", action="store_true", help="start stock vLLM before the skip-aware engine (start order check)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/benchmarks/vllm_skip_overhead")
    args = p.parse_args(argv)
    batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    if args.repeats < 2 or args.rounds < 1:
        p.error("need --repeats >= 2 (a spread) and --rounds >= 1")
    import torch

    if args.threads:  # before vLLM starts: it disables torch.set_num_threads afterwards
        torch.set_num_threads(args.threads)
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    from transformers import AutoConfig

    from nested_reft.engines import SamplingSpec
    from nested_reft.engines.vllm_engine import VLLMEngine
    from recipes.rollout_throughput import StockVLLM, random_prompts

    if args.model_name_or_path:
        path = args.model_name_or_path
    else:
        from archs.tiny import build_tiny_math_model

        path = str(build_tiny_math_model())
    vocab = AutoConfig.from_pretrained(path).vocab_size
    prompts = random_prompts(args.seed, max(batch_sizes), args.prompt_len, vocab)
    sampling = SamplingSpec(max_new_tokens=args.new_tokens, temperature=1.0, seed=args.seed)
    settings = dict(dtype=args.dtype, seed=args.seed, max_model_len=args.prompt_len + args.new_tokens + 8,
                    max_num_seqs=max(batch_sizes), cpu_kvcache_gib=args.cpu_kvcache_gib)
    if args.stock_first:
        stock = StockVLLM(path, **settings)
    ours = VLLMEngine(path, multiprocessing=False, **settings)
    ours.set_skip(())
    if not args.stock_first:
        stock = StockVLLM(path, **settings)
    engines = {"skip-aware": ours, "stock": stock}

    def rate(engine, bs: int) -> float:
        r = engine.generate(prompts[:bs], sampling, ignore_eos=True)
        if r.num_tokens != bs * args.new_tokens:
            raise RuntimeError(f"expected {bs * args.new_tokens} tokens, got {r.num_tokens}")
        return r.num_tokens / r.generate_seconds

    for bs in batch_sizes:
        for engine in engines.values():
            for _ in range(args.warmup):
                rate(engine, bs)
    measurements = []
    for repeat in range(args.repeats):
        for bs in batch_sizes:
            for name in pair_order(repeat):
                tps = statistics.median(rate(engines[name], bs) for _ in range(args.rounds))
                measurements.append({"repeat": repeat, "batch_size": bs, "engine": name, "tokens_per_s": tps,
                                     "load_average_1min": os.getloadavg()[0]})
                print(f"repeat {repeat} bs={bs:<3} {name:>10}: {tps:7.0f} tok/s", flush=True)
    ours.close()
    stock.close()
    rows = summarise(measurements)
    md = table(rows)
    out = Path(args.out)
    meta = {"command": command_line("benchmarks.vllm_skip_overhead", argv),
            "model": path, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "rounds": args.rounds,
            "dtype": args.dtype, "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "started_first": "stock" if args.stock_first else "skip-aware"}
    write_report(out, "overhead", {**meta, "rows": rows, "measurements": measurements}, md)
    print("\n" + md)
    print(f"\nwrote {out}/overhead.json and overhead.md")
    return rows


if __name__ == "__main__":
    main()
