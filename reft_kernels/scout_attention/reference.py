"""Dense references for SCOUT's two attention patterns (SPEC.md §4): the masks written out as
(B, T, T) booleans over per-row content positions, and attention under such a mask with one fp32
softmax. Obviously correct and quadratic; the model runs `checkpoints.checkpoint_attention` instead,
and the tests compare the two (and both with `F.scaled_dot_product_attention`)."""

from __future__ import annotations

import torch


def softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 softmax, or fp64 when the inputs already are."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def checkpoint_mask(positions: torch.Tensor, valid: torch.Tensor, segment_size: int) -> torch.Tensor:
    """ScoutAttn: query i sees {i} ∪ {j : pos_j < pos_i, pos_j ≡ S−1 (mod S)}; pads are no checkpoints
    and pad queries see only themselves. positions, valid: (B, T); returns (B, T, T)."""
    is_checkpoint = valid & (positions % segment_size == segment_size - 1)
    earlier = positions[:, None, :] < positions[:, :, None]
    visible = valid[:, :, None] & is_checkpoint[:, None, :] & earlier
    return visible | torch.eye(positions.size(1), dtype=torch.bool, device=positions.device)


def sliding_window_mask(positions: torch.Tensor, valid: torch.Tensor, window: int) -> torch.Tensor:
    """Causal sliding window of `window` keys including the query: i − w < j ≤ i, on content positions."""
    q, k = positions[:, :, None], positions[:, None, :]
    visible = valid[:, :, None] & valid[:, None, :] & (k <= q) & (k > q - window)
    return visible | torch.eye(positions.size(1), dtype=torch.bool, device=positions.device)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """softmax(q kᵀ · scale, masked to `allowed`) v with grouped K/V heads.

    q: (B, Hq, T, D); k, v: (B, Hkv, L, D) with Hq % Hkv == 0; allowed: (B, T, L) bool, at least one
    key per query (every SCOUT mask includes the query itself). Returns (B, Hq, T, D)."""
    b, hq, t, d = q.shape
    hkv = k.size(1)
    qg = q.view(b, hkv, hq // hkv, t, d)
    scores = torch.matmul(qg, k.unsqueeze(2).transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=softmax_dtype(q.dtype)).to(v.dtype)
    return torch.matmul(probs, v.unsqueeze(2)).view(b, hq, t, v.size(-1))
