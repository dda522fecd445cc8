"""The S-signal computation written out (the reference the fused path is tested against)."""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import repeat_kv


def integral_attention_signals(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_signals: int,
                               signal_scale: float, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """φ = softmax((1/S) Σ_s Q^s K^sᵀ · scale) V, Q^s / K^s the s-th column slice of each head's q / k.

    q (B, H, T, d_h), k and v (B, H_kv, K, d_h) (K = cached + new keys). attention_mask: None (causal,
    queries aligned to the end of the keys), boolean (True = attend) or additive, broadcastable to
    (B, H, T, K). Returns (B, T, H, d_h), as transformers' attention functions do."""
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    width = q.shape[-1] // num_signals
    logits = sum(q[..., s * width:(s + 1) * width] @ k[..., s * width:(s + 1) * width].transpose(-1, -2)
                 for s in range(num_signals))
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) * (signal_scale / num_signals)
    if attention_mask is None:
        n_q, n_k = q.shape[2], k.shape[2]
        attention_mask = (torch.arange(n_k, device=q.device)[None, :]
                          <= (n_k - n_q) + torch.arange(n_q, device=q.device)[:, None])
    if attention_mask.dtype == torch.bool:  # the dtype's min, not -inf: a pad query's empty row stays finite
        logits = logits.masked_fill(~attention_mask, torch.finfo(logits.dtype).min)
    else:
        logits = logits + attention_mask[..., : k.shape[2]]
    weights = logits.softmax(-1).to(v.dtype)
    return (weights @ v).transpose(1, 2).contiguous()
