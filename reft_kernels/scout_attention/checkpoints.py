"""ScoutAttn without an N × N mask: each query attends to its own key and to a gathered set of
checkpoint keys (content position ≡ S−1 mod S) that precede it. Prefill gathers the checkpoints of
the prompt (about T/S of them), decode reads the checkpoint cache: both are T × (1 + M) scores."""

from __future__ import annotations

import torch

from .reference import softmax_dtype


def is_checkpoint(positions: torch.Tensor, valid: torch.Tensor, segment_size: int) -> torch.Tensor:
    """(B, T) bool: real tokens whose content position is ≡ S−1 (mod S). Pads never are."""
    return valid & (positions % segment_size == segment_size - 1)


def compact_index(keep: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the indices of the kept entries in their original order, left-aligned in `width`
    slots: (index (B, width), slot_valid (B, width)). Slots past a row's count point at other
    entries and are invalid. `width` must hold every row's count and be at most the entry count."""
    counts = keep.sum(dim=1)
    if width > keep.size(1) or (keep.size(0) and int(counts.max()) > width):
        raise ValueError(f"cannot place up to {int(counts.max())} of {keep.size(1)} entries in {width} slots")
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept entries first, in order
    slots = torch.arange(width, device=keep.device)
    return order[:, :width], slots[None, :] < counts[:, None]


def checkpoint_visible(q_pos: torch.Tensor, q_valid: torch.Tensor, ck_pos: torch.Tensor,
                       ck_valid: torch.Tensor) -> torch.Tensor:
    """(B, T, M): checkpoint m is visible to query t iff both are real and pos_m < pos_t."""
    return q_valid[:, :, None] & ck_valid[:, None, :] & (ck_pos[:, None, :] < q_pos[:, :, None])


def checkpoint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ck_k: torch.Tensor,
                         ck_v: torch.Tensor, visible: torch.Tensor, scale: float) -> torch.Tensor:
    """One softmax over {self} ∪ visible checkpoints.

    q: (B, Hq, T, D); k, v: (B, Hkv, T, D) the queries' own keys/values; ck_k, ck_v: (B, Hkv, M, D);
    visible: (B, T, M) bool. Returns (B, Hq, T, D)."""
    b, hq, t, d = q.shape
    hkv = k.size(1)
    qg = q.view(b, hkv, hq // hkv, t, d)
    own = (qg * k.unsqueeze(2)).sum(-1, keepdim=True) * scale  # (B, Hkv, G, T, 1)
    others = torch.matmul(qg, ck_k.unsqueeze(2).transpose(-1, -2)) * scale  # (B, Hkv, G, T, M)
    others = others.masked_fill(~visible[:, None, None], float("-inf"))
    probs = torch.softmax(torch.cat([own, others], dim=-1), dim=-1, dtype=softmax_dtype(q.dtype)).to(v.dtype)
    out = probs[..., :1] * v.unsqueeze(2) + torch.matmul(probs[..., 1:], ck_v.unsqueeze(2))
    return out.view(b, hq, t, v.size(-1))
