"""Decode cost of Balcony exits against the full model and matched layer skipping (docs/architectures/balcony.md):

    python -m archs.balcony.cache_counts

For each depth L (8: the embedded model; 28: Qwen2.5-1.5B; 32: the depth of the released 15/18/21) and
its default exits, one prompt of n tokens is prefilled and one token decoded (N = n + 1 tokens seen), at a tiny width (counts
depend on depth and N only). Reported, from the real cache and from forward hooks: K/V entries held
(one token's K and V in one layer slot) and decoder layers run for the decoded token, for the full
model, the model with L − k − 1 layers skipped, and exit k. Each is checked against its formula:
L·N and L; (k + 1)·N and k + 1 for both cheap models.
"""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from ..skipping import skip_layers
from .modeling_balcony import add_exits, default_exits, use_exit

TINY = dict(vocab_size=64, hidden_size=16, intermediate_size=16, num_attention_heads=2, num_key_value_heads=2)
DEPTHS = {8: (1, 2, 512), 28: (512,), 32: (512,)}  # depth: prompt lengths


@torch.no_grad()
def entries_and_layers(model, n: int) -> tuple[int, int]:
    """(K/V entries after prefilling n tokens and decoding one, decoder layers run for that one token)."""
    ids = torch.randint(1, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, use_cache=True)
    calls = []
    hooks = [layer.register_forward_hook(lambda *a: calls.append(1)) for layer in model.model.layers]
    try:
        out = model(input_ids=ids[:, -1:], past_key_values=out.past_key_values, use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    return sum(layer.get_seq_length() for layer in out.past_key_values.layers), len(calls)


def rows() -> list[dict]:
    out = []
    for depth, lengths in DEPTHS.items():
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(Qwen2Config(**TINY, num_hidden_layers=depth)).eval()
        exits = add_exits(model)
        for k in exits.depths:
            skipped = list(range(2, 2 + depth - k - 1))  # any L − k − 1 layers: the count is what matters
            for n in lengths:
                full = entries_and_layers(model, n)
                with skip_layers(model, skipped):
                    skip = entries_and_layers(model, n)
                with use_exit(model, k):
                    exit_ = entries_and_layers(model, n)
                seen = n + 1
                assert full == (depth * seen, depth) and skip == exit_ == ((k + 1) * seen, k + 1), (depth, k, n)
                out.append({"L": depth, "k": k, "N": n, "full": full, "skip": skip, "exit": exit_})
    return out


def main() -> None:
    print("| L | exit k | default exits | N (tokens seen) | full: entries, layers/token | skip L−k−1: entries, layers | "
          "exit k: entries, layers |")
    print("|---|---|---|---|---|---|---|")
    for r in rows():
        print(f"| {r['L']} | {r['k']} | {default_exits(r['L'])} | {r['N'] + 1} | {r['full'][0]}, {r['full'][1]} | "
              f"{r['skip'][0]}, {r['skip'][1]} | {r['exit'][0]}, {r['exit'][1]} |")


if __name__ == "__main__":
    main()
