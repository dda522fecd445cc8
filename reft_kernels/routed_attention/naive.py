"""The reference: one softmax per query token, written as a loop (slow, obviously correct)."""

from __future__ import annotations

import torch


def routed_attention_naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, routed: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """q (B, H, T, D), k and v (B, H_kv, T, D), routed (B, T) bool -> (B, H, T, D).

    A routed token i attends to the routed tokens j <= i of its own row; a token that is not routed
    attends to itself only. Query head h reads key/value head h // (H / H_kv)."""
    batch, heads, length, _ = q.shape
    group = heads // k.shape[1]
    out = torch.empty_like(q)
    acc = torch.promote_types(q.dtype, torch.float32)  # softmax in at least float32
    for b in range(batch):
        for i in range(length):
            if routed[b, i]:
                keys = [j for j in range(i + 1) if routed[b, j]]
            else:
                keys = [i]
            for h in range(heads):
                kh, vh = k[b, h // group, keys], v[b, h // group, keys]
                weights = torch.softmax((kh @ q[b, h, i]).to(acc) * scale, dim=-1).to(q.dtype)
                out[b, h, i] = weights @ vh
    return out
