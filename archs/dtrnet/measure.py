"""Measured decode-cache entries and attention FLOPs of a tiny DTRNet against Llama, per routed fraction.

    python -m archs.dtrnet.measure

The routed fraction is steered by shifting the routers' output biases (random router weights, std 10 and 1, so that its logits spread over tokens).
Cache entries are read from the `DTRNetCache` after `generate()`; FLOPs are counted with
`torch.utils.flop_counter.FlopCounterMode` over one full forward of the generated sequences. The attention core
is the `bmm` FLOPs: 4·H·d_h·L_q·L_k per attention call, masked pairs included. The masked path and Llama are
counted with eager attention (FlopCounterMode does not count CPU's fused SDPA kernel; the packed path's per-row
SDPA calls with a boolean mask run as two `bmm`, and the assertion below fails if that ever changes).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from .configuration_dtrnet import DTRNetConfig
from .modeling_dtrnet import DTRNetForCausalLM

SHAPE = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
BATCH, PROMPT, NEW = 2, 16, 49  # 16 + 48 tokens fed per row: N = 64 seen
SHIFTS = (-40.0, -2.0, -1.0, 0.0, 1.0, 2.0, 40.0)


def build(path: str, shift: float, attn: str = "sdpa") -> DTRNetForCausalLM:
    torch.manual_seed(0)
    model = DTRNetForCausalLM._from_config(DTRNetConfig(**SHAPE, routed_attention=path),
                                           attn_implementation=attn).eval()
    for layer in model.model.layers:
        if layer.routed:
            torch.nn.init.normal_(layer.router.weight_predictor[0].weight, std=10.0)  # h is small (embeddings std 0.02)
            last = layer.router.weight_predictor[2]
            torch.nn.init.normal_(last.weight, std=1.0)
            last.bias.data = torch.tensor([shift, -shift])
    return model


def attention_flops(model, ids) -> tuple[int, int]:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids)
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return counts.get("aten.bmm", 0), sum(counts.values())


def main() -> None:
    heads, head_dim = SHAPE["num_attention_heads"], SHAPE["hidden_size"] // SHAPE["num_attention_heads"]
    layers = SHAPE["num_hidden_layers"]
    prompts = torch.randint(1, SHAPE["vocab_size"], (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    llama = LlamaForCausalLM._from_config(LlamaConfig(**SHAPE), attn_implementation="eager").eval()
    print(f"tiny DTRNet: L={layers} (dense {DTRNetConfig(**SHAPE).dense_layers}), H={heads}, d_h={head_dim}, "
          f"batch {BATCH}, N={PROMPT + NEW - 1} tokens seen per row\n")
    print("| router shift | routed fraction (routed layers) | cache entries DTRNet | Llama | ratio | "
          "attn FLOPs packed | masked | Llama | packed / Llama |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shift in SHIFTS:
        model = build("packed", shift)
        with torch.no_grad():
            out = model.generate(input_ids=prompts, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                 pad_token_id=0, eos_token_id=None, return_dict_in_generate=True)
        cache = out.past_key_values
        seen = int(cache.seen_tokens.sum())
        entries = cache.entry_counts()  # (L, B)
        routed = [i for i, layer in enumerate(model.model.layers) if layer.routed]
        fraction = entries[routed].sum().item() / (len(routed) * seen)
        llama_entries = layers * seen  # DynamicCache: every token of every row, in every layer
        # attention FLOPs of one full forward over the fed tokens (what the trainer recomputes)
        fed = out.sequences[:, :-1]
        packed, _ = attention_flops(model, fed)
        masked, _ = attention_flops(build("masked", shift, "eager"), fed)
        llama.load_state_dict(model.state_dict(), strict=False)
        dense_llama, _ = attention_flops(llama, fed)
        taken = [int(n) for n in entries.flatten()]  # the full forward routes as decode did (tests: decode = forward)
        expected = 4 * heads * head_dim * sum(n * n for n in taken)
        assert packed == expected, (packed, expected)
        assert masked == dense_llama == 4 * heads * head_dim * layers * BATCH * fed.shape[1] ** 2
        print(f"| {shift:+.0f} | {fraction:.3f} | {entries.sum().item()} | {llama_entries} | "
              f"{entries.sum().item() / llama_entries:.3f} | {packed} | {masked} | {dense_llama} | "
              f"{packed / dense_llama:.3f} |")
    print("\npacked attention FLOPs = 4·H·d_h·Σ_layers Σ_rows n² exactly (n = tokens that attended), checked above")


if __name__ == "__main__":
    main()
