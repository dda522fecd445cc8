"""Decode-cache sizes of SCOUT against Llama (docs/architectures/scout.md):

    python -m archs.scout.cache_counts

Entry counts (one token's K and V in one layer) are read from the caches of real forwards, batch 1,
prefilled in chunks of 512, at a tiny width: counts depend on depth, S, w and N only. Each is checked
against its formula (Llama L·N; SCOUT per block min(N, w−1) + ⌊N/S⌋ for the sliding-window mixer, ⌊N/S⌋
for Mamba). Bytes are for a 125M-like shape in bf16: entries × 2 · kv_heads · head_dim · 2 B, plus the
Mamba conv/SSM state; that formula is checked once against `ScoutCache.nbytes()` of a real bf16 forward
at the full shape.
"""

from __future__ import annotations

import argparse

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from .configuration_scout import ScoutConfig
from .modeling_scout import ScoutForCausalLM

# 125M-like: Llama 12 layers; SCOUT 6 double blocks (the same 12 MLPs and 12 token-mixing sublayers)
SHAPE = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_key_value_heads=12)
LLAMA_LAYERS, SCOUT_BLOCKS = 12, 6
LENGTHS = (256, 512, 1024, 2048, 4096, 8192)
TINY = dict(vocab_size=64, hidden_size=16, intermediate_size=16, num_attention_heads=2, num_key_value_heads=2)


@torch.no_grad()
def prefill(model, n: int, chunk: int = 512):
    ids = torch.randint(1, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache(config=model.config) if isinstance(model, LlamaForCausalLM) else None
    for lo in range(0, n, chunk):
        out = model(input_ids=ids[:, lo:lo + chunk], attention_mask=torch.ones(1, min(n, lo + chunk), dtype=torch.long),
                    past_key_values=cache, use_cache=True)
        cache = out.past_key_values
    return cache


def scout_config(mixer: str, **shape) -> ScoutConfig:
    return ScoutConfig(**shape, num_hidden_layers=SCOUT_BLOCKS, mixer=mixer, segment_size=10, sliding_window=1024)


def mamba_state_bytes(config: ScoutConfig, dtype_bytes: int) -> int:
    """Conv state (model dtype) and SSM state (float32) of every block, batch 1."""
    e = config.expand * config.hidden_size
    return config.num_hidden_layers * (e * (config.conv_kernel - 1) * dtype_bytes + e * config.state_size * 4)


def measured_entries(lengths) -> list[dict]:
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**TINY, num_hidden_layers=LLAMA_LAYERS)).eval()
    swa = ScoutForCausalLM(scout_config("swa", **TINY)).eval()
    mamba = ScoutForCausalLM(scout_config("mamba", **TINY, time_step_rank="auto")).eval()
    rows = []
    for n in lengths:
        llama_entries = sum(layer.get_seq_length() for layer in prefill(llama, n).layers)
        swa_entries, mamba_entries = prefill(swa, n).kv_entries(), prefill(mamba, n).kv_entries()
        window, checkpoints = min(n, 1024 - 1), n // 10
        assert llama_entries == LLAMA_LAYERS * n
        assert swa_entries == {"window": SCOUT_BLOCKS * window, "checkpoint": SCOUT_BLOCKS * checkpoints,
                               "total": SCOUT_BLOCKS * (window + checkpoints)}, swa_entries
        assert mamba_entries == {"window": 0, "checkpoint": SCOUT_BLOCKS * checkpoints,
                                 "total": SCOUT_BLOCKS * checkpoints}, mamba_entries
        rows.append(dict(n=n, llama=llama_entries, swa=swa_entries["total"], mamba=mamba_entries["total"]))
    return rows


def check_bytes_formula_at_full_shape(n: int = 256) -> None:
    """One real bf16 forward per mixer at the 125M-like shape: nbytes() equals the formula."""
    for mixer in ("swa", "mamba"):
        config = scout_config(mixer, **SHAPE)
        model = ScoutForCausalLM(config).to(torch.bfloat16).eval()
        cache = prefill(model, n)
        sizes, entries = cache.nbytes(), cache.kv_entries()["total"]
        assert sizes["kv"] == entries * 2 * config.num_key_value_heads * config.head_dim * 2, sizes
        assert sizes["recurrent"] == (mamba_state_bytes(config, 2) if mixer == "mamba" else 0), sizes


def table(rows) -> str:
    entry = 2 * SHAPE["num_key_value_heads"] * (SHAPE["hidden_size"] // SHAPE["num_attention_heads"]) * 2
    state = mamba_state_bytes(scout_config("mamba", **SHAPE), 2)
    lines = ["| N | Llama entries | SCOUT-SWA entries | SCOUT-Mamba entries | Llama MiB | SCOUT-SWA MiB | "
             "SCOUT-Mamba MiB (K/V + state) | Llama / SCOUT-Mamba |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    mib = 2**20
    for r in rows:
        llama_b, swa_b, mamba_b = r["llama"] * entry, r["swa"] * entry, r["mamba"] * entry + state
        lines.append(f"| {r['n']} | {r['llama']:,} | {r['swa']:,} | {r['mamba']:,} | {llama_b / mib:.2f} | "
                     f"{swa_b / mib:.2f} | {mamba_b / mib:.2f} | {llama_b / mamba_b:.1f}× |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--skip-full-shape-check", action="store_true")
    args = parser.parse_args()
    if not args.skip_full_shape_check:
        check_bytes_formula_at_full_shape()
    print(table(measured_entries(args.lengths)))


if __name__ == "__main__":
    main()
