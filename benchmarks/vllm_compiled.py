"""Compiled compact vLLM (`CompiledVLLMEngine`) against the eager run-time-skip engine (`VLLMEngine`),
interleaved, and the compact model at k = 0 against stock compiled vLLM.

    python -m benchmarks.vllm_compiled [--batch_sizes 8,32,128] [--fractions 0,0.25,0.5] [--repeats 3]
                                       [--new_tokens 64] [--threads N] [--out outputs/benchmarks/vllm_compiled]

All engines run in this one process. One repeat measures, per batch size and k (k = round(f · L)
for each fraction f), the compiled and the eager engine one right after the other on the same
prompts, seeds and skip set (exactly `--new_tokens` tokens per prompt, EOS ignored), each as the
median tokens/s of `--rounds` generate calls; at k = 0 stock compiled vLLM (vLLM's own class, the
same settings) joins them. The order rotates between repeats and the ratios are taken within each
repeat. Then, per k > 0, the cost of a round's weights against its generation: a new skip set of the
same size (the moved layers into their slots) and an optimizer step's full sync (every kept layer),
each timed over `--rounds` calls. Writes `compiled.json` and `compiled.md` into --out.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from pathlib import Path

from benchmarks.report import command_line, write_report


def skip_set(num_layers: int, k: int, rng: random.Random) -> tuple[int, ...]:
    """k distinct layers, never the first or the last (as the trainer's default draw)."""
    return tuple(sorted(rng.sample(range(1, num_layers - 1), k))) if k else ()


def rotation(repeat: int, names: list[str]) -> list[str]:
    """The engines in the order they run in this repeat (each goes first in turn)."""
    shift = repeat % len(names)
    return names[shift:] + names[:shift]


def summarise(measurements: list[dict]) -> list[dict]:
    """Per (batch, k): each engine's median tokens/s and the within-repeat ratios to compiled."""
    rows = []
    for bs, k in sorted({(m["batch_size"], m["k"]) for m in measurements}):
        repeats: dict[int, dict[str, float]] = {}
        for m in measurements:
            if (m["batch_size"], m["k"]) == (bs, k):
                repeats.setdefault(m["repeat"], {})[m["engine"]] = m["tokens_per_s"]
        engines = sorted({e for r in repeats.values() for e in r})
        row = {"batch_size": bs, "k": k, "n": len(repeats)}
        for e in engines:
            row[f"{e}_tokens_per_s"] = statistics.median(r[e] for r in repeats.values() if e in r)
        if "eager" in engines:
            row["compiled_over_eager"] = statistics.median(r["compiled"] / r["eager"] for r in repeats.values())
        if "stock" in engines:
            row["compiled_over_stock"] = statistics.median(r["compiled"] / r["stock"] for r in repeats.values())
        rows.append(row)
    return rows


def table(rows: list[dict], loads: list[dict], num_layers: int) -> str:
    lines = ["| batch | k / L | compiled tok/s | eager tok/s | compiled / eager | stock compiled tok/s | compiled / stock |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        stock = f"{r['stock_tokens_per_s']:.0f}" if "stock_tokens_per_s" in r else ""
        ratio = f"{r['compiled_over_stock']:.3f}" if "compiled_over_stock" in r else ""
        lines.append(f"| {r['batch_size']} | {r['k']}/{num_layers} | {r['compiled_tokens_per_s']:.0f} | "
                     f"{r['eager_tokens_per_s']:.0f} | {r['compiled_over_eager']:.2f} | {stock} | {ratio} |")
    if loads:
        lines += ["", "| k / L | new skip set: layers moved | load s | optimizer-step sync: tensors | load s | "
                  "a round's generation s (batch, tokens) |", "|---|---|---|---|---|---|"]
        for w in loads:
            lines.append(f"| {w['k']}/{num_layers} | {w['moved_layers']:.1f} | {w['new_skip_seconds']:.4f} | "
                         f"{w['sync_tensors']} | {w['sync_seconds']:.4f} | {w['generate_seconds']:.3f} "
                         f"({w['batch_size']}, {w['new_tokens']}) |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch_sizes", default="8,32,128")
    p.add_argument("--fractions", default="0,0.25,0.5", help="skipped fractions of the layers: k = round(f * L)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="timed generate calls per measurement (median taken)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--model_name_or_path", default=None, help="local checkpoint (default: the embedded tiny math model)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--cpu_kvcache_gib", type=int, default=1, help="per vLLM instance")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (set before vLLM starts)")
    p.add_argument("--no_stock", action="store_true", help="leave out stock compiled vLLM")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/benchmarks/vllm_compiled")
    args = p.parse_args(argv)
    batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    fractions = [float(x) for x in args.fractions.split(",")]
    if args.repeats < 1 or args.rounds < 1 or not all(0 <= f < 1 for f in fractions):
        p.error("need --repeats >= 1, --rounds >= 1 and fractions in [0, 1)")
    import torch

    if args.threads:  # before vLLM starts: it disables torch.set_num_threads afterwards
        torch.set_num_threads(args.threads)
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    from transformers import AutoConfig

    from nested_reft.engines import SamplingSpec
    from nested_reft.engines.vllm_compiled import CompiledVLLMEngine, layer_of
    from nested_reft.engines.vllm_engine import VLLMEngine
    from recipes.rollout_throughput import StockVLLM, random_prompts

    if args.model_name_or_path:
        path = args.model_name_or_path
    else:
        from archs.tiny import build_tiny_math_model

        path = str(build_tiny_math_model())
    config = AutoConfig.from_pretrained(path)
    num_layers = config.num_hidden_layers
    ks = sorted({round(f * num_layers) for f in fractions})
    rng = random.Random(args.seed)
    skips = {k: skip_set(num_layers, k, rng) for k in ks}
    prompts = random_prompts(args.seed, max(batch_sizes), args.prompt_len, config.vocab_size)
    sampling = SamplingSpec(max_new_tokens=args.new_tokens, temperature=1.0, seed=args.seed)
    settings = dict(dtype=args.dtype, seed=args.seed, max_model_len=args.prompt_len + args.new_tokens + 8,
                    max_num_seqs=max(batch_sizes), cpu_kvcache_gib=args.cpu_kvcache_gib)
    started = {}
    t = time.perf_counter()
    compiled = CompiledVLLMEngine(path, multiprocessing=False, **settings)
    for k in ks:  # one instance per k, compiled now rather than inside a timed call
        compiled.set_skip(skips[k])
    started["compiled"] = {str(k): compiled.start_seconds[k] for k in ks}
    t = time.perf_counter()
    eager = VLLMEngine(path, multiprocessing=False, **settings)
    started["eager"] = time.perf_counter() - t
    engines = {"compiled": compiled, "eager": eager}
    if not args.no_stock and 0 in ks:
        t = time.perf_counter()
        engines["stock"] = StockVLLM(path, enforce_eager=False, **settings)
        started["stock"] = time.perf_counter() - t

    def rate(name: str, bs: int, k: int) -> float:
        engine = engines[name]
        if name != "stock":
            engine.set_skip(skips[k])
        r = engine.generate(prompts[:bs], sampling, ignore_eos=True)
        if r.num_tokens != bs * args.new_tokens:
            raise RuntimeError(f"{name}: expected {bs * args.new_tokens} tokens, got {r.num_tokens}")
        return r.num_tokens / r.generate_seconds

    def names(k: int) -> list[str]:
        return [n for n in engines if n != "stock" or k == 0]

    for bs in batch_sizes:
        for k in ks:
            for name in names(k):
                for _ in range(args.warmup):
                    rate(name, bs, k)
    measurements = []
    for repeat in range(args.repeats):
        for bs in batch_sizes:
            for k in ks:
                for name in rotation(repeat, names(k)):
                    tps = statistics.median(rate(name, bs, k) for _ in range(args.rounds))
                    measurements.append({"repeat": repeat, "batch_size": bs, "k": k, "engine": name,
                                         "tokens_per_s": tps, "load_average_1min": os.getloadavg()[0]})
                    print(f"repeat {repeat} bs={bs:<3} k={k:<2} {name:>8}: {tps:8.0f} tok/s", flush=True)
    rows = summarise(measurements)

    # a round's weights against its generation (batch 32 or the nearest measured)
    bs = min(batch_sizes, key=lambda b: abs(b - 32))
    loads = []
    policy = dict(compiled.weights)
    for k in [k for k in ks if k > 0]:
        moved, new_skip, sync = [], [], []
        for _ in range(args.rounds):
            skip = skip_set(num_layers, k, rng)
            before = compiled.kept[k]
            t = time.perf_counter()
            compiled.set_skip(skip)
            new_skip.append(time.perf_counter() - t)
            moved.append(sum(a != b for a, b in zip(before, compiled.kept[k])))
            compiled.load_weights(policy.items())  # an optimizer step changed every tensor
            t = time.perf_counter()
            compiled.set_skip(skip)  # the same skip set: every kept layer's new weights
            sync.append(time.perf_counter() - t)
        gen = next(r for r in rows if r["batch_size"] == bs and r["k"] == k)
        loads.append({"k": k, "moved_layers": statistics.mean(moved), "new_skip_seconds": statistics.median(new_skip),
                      "sync_tensors": sum(1 for n in policy if layer_of(n) is None or layer_of(n) in compiled.kept[k]),
                      "sync_seconds": statistics.median(sync), "batch_size": bs, "new_tokens": args.new_tokens,
                      "generate_seconds": bs * args.new_tokens / gen["compiled_tokens_per_s"]})
    for engine in engines.values():
        engine.close()
    md = table(rows, loads, num_layers)
    meta = {"command": command_line("benchmarks.vllm_compiled", argv), "model": path, "num_layers": num_layers,
            "skip_sets": {str(k): list(v) for k, v in skips.items()}, "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens, "rounds": args.rounds, "repeats": args.repeats, "dtype": args.dtype,
            "device": "cuda" if torch.cuda.is_available() else "cpu", "torch_threads": torch.get_num_threads(),
            "start_seconds": started, "date": time.strftime("%Y-%m-%d %H:%M")}
    result = {**meta, "rows": rows, "weight_loads": loads, "measurements": measurements}
    write_report(Path(args.out), "compiled", result, md)
    print("\nstart (s): " + ", ".join(f"{k}: {v}" for k, v in started.items()))
    print("\n" + md)
    print(f"\nwrote {args.out}/compiled.json and compiled.md")
    return result


if __name__ == "__main__":
    main()
