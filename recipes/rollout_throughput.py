"""Rollout tokens/sec of layer-skipped behavior models, per engine, skip ratio and batch size.

    python -m recipes.rollout_throughput [--engines hf,vllm] [--batch_sizes 8,32] [--new_tokens 64]
        [--model_name_or_path DIR | --random_init_config Qwen2.5-1.5B-shaped [--num_layers 8]]

Prompts and lengths are fixed (random token ids of `--prompt_len`, exactly `--new_tokens` sampled
per prompt with EOS ignored); every cell is the median of `--repeats` timed rounds after
`--warmup` untimed ones. Speedup is against the same engine and batch size at k = 0, beside the
ideal L / (L - k). `stock vLLM` is vLLM's own class for the architecture (no skip support) at
k = 0: the cost of the skip-aware model with nothing skipped. Writes `throughput.json` and
`throughput.png` in `--output_dir`. With no model given, the embedded tiny math model is used.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

# Public shapes of real models (config.json values), instantiated with random weights.
SHAPES = {
    "Qwen2.5-0.5B": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768),
    "Qwen2.5-1.5B": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                         tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768),
    "Llama-3.2-1B": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         tie_word_embeddings=True, rope_theta=5e5, rms_norm_eps=1e-5, max_position_embeddings=131072),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engines", default="hf,vllm", help="comma list of hf, vllm")
    p.add_argument("--skip_ratios", default="0,0.125,0.25,0.375,0.5")
    p.add_argument("--batch_sizes", default="8,32")
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--keep_first", type=int, default=2)
    p.add_argument("--keep_last", type=int, default=2)
    p.add_argument("--model_name_or_path", default=None, help="local checkpoint folder or Hub id (default: embedded tiny model)")
    p.add_argument("--random_init_config", default=None, help=f"random weights in a real shape: one of {sorted(SHAPES)} (a '-shaped' suffix is allowed)")
    p.add_argument("--num_layers", type=int, default=None, help="with --random_init_config: fewer decoder layers (to fit small machines)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--no_stock_baseline", action="store_true", help="skip the stock vLLM row")
    p.add_argument("--cpu_kvcache_gib", type=int, default=2)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for both engines (torch.set_num_threads, and VLLM_CPU_OMP_THREADS_BIND=nobind so vLLM keeps them and does not pin cores). "
                        "On a shared machine 1 avoids OpenMP oversubscription, which slowed HF generate 20x here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", default="outputs/rollout_throughput")
    args = p.parse_args(argv)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [e for e in args.engines if e not in ("hf", "vllm")]
    if bad:
        p.error(f"--engines: unknown {bad}; choose from hf, vllm")
    args.skip_ratios = [float(x) for x in args.skip_ratios.split(",")]
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    if args.random_init_config is not None:
        name = args.random_init_config.removesuffix("-shaped")
        if name not in SHAPES:
            p.error(f"--random_init_config: unknown shape {args.random_init_config!r}; choose from {sorted(SHAPES)}")
        args.random_init_config = name
        if args.model_name_or_path:
            p.error("give --model_name_or_path or --random_init_config, not both")
    return args


def materialise_model(args, workdir: Path) -> tuple[str, str]:
    """(checkpoint folder, label). Random-init shapes are saved with the tiny model's tokenizer,
    built alone in seconds (only token ids are used; the model's vocabulary stays the real one):
    the tiny model itself trains for minutes on first use and is not needed for them."""
    if args.model_name_or_path:
        return args.model_name_or_path, args.model_name_or_path
    if args.random_init_config is None:
        from archs.tiny import build_tiny_math_model

        return str(build_tiny_math_model()), "embedded tiny math model"
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from archs.tiny.build import TinyMathRecipe, build_tokenizer

    shape = dict(SHAPES[args.random_init_config])
    if args.num_layers:
        shape["num_hidden_layers"] = args.num_layers
    config = AutoConfig.for_model(**shape)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    folder = workdir / "random_init"
    model.save_pretrained(folder)
    build_tokenizer(TinyMathRecipe(), seed=0).save_pretrained(folder)
    return str(folder), f"{args.random_init_config}-shaped, random init, {shape['num_hidden_layers']} layers"


def random_prompts(seed: int, n: int, length: int, vocab: int) -> list[list[int]]:
    """n prompts of `length` random token ids (ids 10..399: ordinary tokens of the tiny vocabulary)."""
    rng = random.Random(seed)
    return [[rng.randrange(10, min(vocab, 400)) for _ in range(length)] for _ in range(n)]


def timed(generate, prompts, sampling, warmup: int, repeats: int) -> tuple[float, int]:
    for _ in range(warmup):
        generate(prompts, sampling)
    rates, tokens = [], 0
    for _ in range(repeats):
        r = generate(prompts, sampling)
        tokens = r.num_tokens
        if tokens != len(prompts) * sampling.max_new_tokens:
            raise RuntimeError(f"expected {len(prompts) * sampling.max_new_tokens} tokens, got {tokens}")
        rates.append(r.num_tokens / r.generate_seconds)
    return statistics.median(rates), tokens


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"  # let the OS place the threads (cores are shared)

    from nested_reft.engines import HFEngine, SamplingSpec
    from nested_reft.skipping import LayerSkipPolicy

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="throughput_"))
    path, label = materialise_model(args, workdir)
    from transformers import AutoConfig

    num_layers = AutoConfig.from_pretrained(path).num_hidden_layers
    vocab = AutoConfig.from_pretrained(path).vocab_size
    skips = {}
    for r in args.skip_ratios:
        policy = LayerSkipPolicy(num_layers, skip_ratio=r, keep_first=args.keep_first, keep_last=args.keep_last, seed=args.seed)
        skips[r] = policy.draw()
    max_bs = max(args.batch_sizes)
    all_prompts = random_prompts(args.seed, max_bs, args.prompt_len, vocab)
    sampling = SamplingSpec(max_new_tokens=args.new_tokens, temperature=1.0, seed=args.seed)
    rows = []

    def measure(engine_name, engine, ratios):
        def generate(p, s):
            return engine.generate(p, s, ignore_eos=True)

        for bs in args.batch_sizes:
            base = None
            for r in ratios:
                skip = skips[r]
                engine.set_skip(skip)
                rate, _ = timed(generate, all_prompts[:bs], sampling, args.warmup, args.repeats)
                base = rate if base is None and not skip else base
                k = len(skip)
                row = {"engine": engine_name, "batch_size": bs, "skip_ratio": r, "k": k, "skip": list(skip),
                       "tokens_per_s": rate, "speedup": rate / base if base else float("nan"),
                       "ideal": num_layers / (num_layers - k)}
                rows.append(row)
                print(f"{engine_name:>10} bs={bs:<3} k={k:<2} {rate:9.0f} tok/s  x{row['speedup']:.2f} (ideal x{row['ideal']:.2f})", flush=True)

    for name in args.engines:
        if name == "hf":
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()
            engine = HFEngine(model, AutoTokenizer.from_pretrained(path), batch_size=max_bs, score_logprobs=False)
            measure("hf", engine, args.skip_ratios)
            del model, engine
        else:
            from nested_reft.engines.vllm_engine import VLLMEngine

            engine = VLLMEngine(path, dtype=args.dtype, multiprocessing=False, cpu_kvcache_gib=args.cpu_kvcache_gib,
                                max_model_len=args.prompt_len + args.new_tokens + 8, max_num_seqs=max_bs, seed=args.seed)
            measure("vllm", engine, args.skip_ratios)
            engine.close()
            if not args.no_stock_baseline:
                rows.extend(stock_vllm_rows(args, path, all_prompts, sampling, num_layers, rows))
    summary = {"model": label, "path": path, "num_layers": num_layers, "prompt_len": args.prompt_len,
               "new_tokens": args.new_tokens, "repeats": args.repeats, "dtype": args.dtype,
               "device": "cuda" if torch.cuda.is_available() else "cpu", "torch_threads": torch.get_num_threads(),
               "load_average_1min": os.getloadavg()[0],  # other jobs on the machine disturb CPU numbers
               "rows": rows}
    (out / "throughput.json").write_text(json.dumps(summary, indent=2))
    print_table(summary)
    plot(summary, out / "throughput.png")
    print(f"\nwrote {out}/throughput.json and throughput.png")
    return summary


class StockVLLM:
    """vLLM's own model class for the architecture (no skip support), started with the settings
    `VLLMEngine` uses (in-process, eager, no prefix cache, processed log-probs), so that the two
    differ only in the model class (`enforce_eager=False`: compiled, as `CompiledVLLMEngine`
    runs). `generate` returns `Rollouts` like the engines."""

    def __init__(self, path: str, *, dtype: str, seed: int, max_model_len: int, max_num_seqs: int, cpu_kvcache_gib: int,
                 enforce_eager: bool = True):
        from vllm import LLM

        from nested_reft.engines.vllm_engine import _environ

        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": str(cpu_kvcache_gib)}
        if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:  # as VLLMEngine does in-process: no core pinning
            env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        with _environ(env):
            from vllm import envs

            envs.disable_envs_cache()
            self.llm = LLM(model=path, dtype=dtype, enforce_eager=enforce_eager, seed=seed, enable_prefix_caching=False,
                           logprobs_mode="processed_logprobs", max_model_len=max_model_len, max_num_seqs=max_num_seqs)

    def generate(self, prompts, sampling, *, ignore_eos: bool = True):
        from vllm.inputs import TokensPrompt

        from nested_reft.engines.vllm_engine import rollouts_from_outputs, vllm_sampling_params

        params = vllm_sampling_params(sampling, len(prompts), eos_ids=None, logprobs=True, ignore_eos=ignore_eos)
        start = time.perf_counter()
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=x) for x in prompts], params, use_tqdm=False)
        return rollouts_from_outputs(outs, True, (), time.perf_counter() - start)

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()


def stock_vllm_rows(args, path, prompts, sampling, num_layers, rows):
    """vLLM's own model class (no skip support), k = 0, same settings."""
    stock = StockVLLM(path, dtype=args.dtype, seed=args.seed, max_model_len=args.prompt_len + args.new_tokens + 8,
                      max_num_seqs=max(args.batch_sizes), cpu_kvcache_gib=args.cpu_kvcache_gib)

    def generate(p, s):
        return stock.generate(p, s, ignore_eos=True)

    out = []
    for bs in args.batch_sizes:
        rate, _ = timed(generate, prompts[:bs], sampling, args.warmup, args.repeats)
        ours = next(r for r in rows if r["engine"] == "vllm" and r["batch_size"] == bs and r["k"] == 0)
        out.append({"engine": "stock vLLM", "batch_size": bs, "skip_ratio": 0.0, "k": 0, "skip": [], "tokens_per_s": rate,
                    "speedup": rate / ours["tokens_per_s"], "ideal": 1.0})
        print(f"stock vLLM bs={bs:<3} k=0  {rate:9.0f} tok/s  (skip-aware k=0 / stock = {ours['tokens_per_s'] / rate:.3f})", flush=True)
    stock.close()
    return out


def print_table(summary: dict) -> None:
    print(f"\n{summary['model']}: L={summary['num_layers']}, prompt {summary['prompt_len']} + {summary['new_tokens']} new tokens, "
          f"{summary['dtype']}, {summary['device']}, median of {summary['repeats']}, load average {summary['load_average_1min']:.1f}")
    print("| engine | batch | k | skip ratio | tokens/s | speedup vs k=0 | ideal L/(L-k) |")
    print("|---|---|---|---|---|---|---|")
    for r in summary["rows"]:
        speed = f"{r['speedup']:.2f}" if r["engine"] != "stock vLLM" else f"{r['speedup']:.2f} (stock / skip-aware at k=0)"
        print(f"| {r['engine']} | {r['batch_size']} | {r['k']} | {r['skip_ratio']:.3f} | {r['tokens_per_s']:.0f} | {speed} | {r['ideal']:.2f} |")


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    L = summary["num_layers"]
    ks = sorted({r["k"] for r in summary["rows"]})
    ax.plot(ks, [L / (L - k) for k in ks], "k--", label="ideal L/(L-k)")
    for engine in dict.fromkeys(r["engine"] for r in summary["rows"] if r["engine"] != "stock vLLM"):
        for bs in dict.fromkeys(r["batch_size"] for r in summary["rows"]):
            pts = [(r["k"], r["speedup"]) for r in summary["rows"] if r["engine"] == engine and r["batch_size"] == bs]
            ax.plot(*zip(*pts), "o-", label=f"{engine}, batch {bs}")
    ax.set_xlabel("skipped layers k")
    ax.set_ylabel("tokens/s speedup over k = 0")
    ax.set_title(f"{summary['model']} ({summary['device']})", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
