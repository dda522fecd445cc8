"""The routed-attention mask for attention over all tokens of a chunk (eager / SDPA)."""

from __future__ import annotations

import torch


def routed_attention_mask(routed: torch.Tensor, past_lengths: torch.Tensor | None = None,
                          past_width: int = 0) -> torch.Tensor:
    """Boolean mask (B, 1, T, past_width + T), True = may attend.

    Keys are laid out as [cached routed keys of the row (its first `past_lengths[b]` of `past_width`
    slots are valid); the chunk's T tokens]. A routed query attends to the row's valid cached keys and
    to the routed chunk tokens before it; every query attends to itself, so a token that is not routed
    gets exactly its own value (the DTRNet bypass) and no row is ever empty."""
    batch, length = routed.shape
    idx = torch.arange(length, device=routed.device)
    earlier = idx[None, :] < idx[:, None]  # (T, T): j < i
    new = (routed[:, :, None] & routed[:, None, :] & earlier) | torch.eye(length, dtype=torch.bool,
                                                                           device=routed.device)
    if past_width == 0:
        return new[:, None]
    if past_lengths is None:
        raise ValueError("past_lengths is required when past_width > 0")
    slots = torch.arange(past_width, device=routed.device)
    past = routed[:, :, None] & (slots[None, None, :] < past_lengths[:, None, None])  # (B, T, P)
    return torch.cat([past, new], dim=-1)[:, None]
