"""Routed tokens gathered per row and attended as variable-length segments.

Only routed tokens are scored, so the attention work is `Σ_rows n_b (P_b + n_b)` query-key pairs
instead of `T (P + T)`. `RoutedKV` is the per-row store (also the DTRNet decode cache layer);
`pack_routed` builds the segments; `varlen_attention_torch` attends them in plain torch (one SDPA
call per row) and `varlen_attention_flash` hands the same segments to flash-attn's varlen kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


class RoutedKV:
    """Routed keys/values of each row, ragged: row b's entries are slots [0, lengths[b]) of
    (B, H_kv, capacity, D), in time order; slots past a row's length are unused (zeros)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor):
        self.keys, self.values, self.lengths = keys, values, lengths

    @classmethod
    def empty(cls, like: torch.Tensor) -> RoutedKV:
        """An empty store shaped for keys like `like` (B, H_kv, T, D)."""
        batch, heads, _, dim = like.shape
        zeros = like.new_zeros(batch, heads, 0, dim)
        return cls(zeros, zeros.clone(), torch.zeros(batch, dtype=torch.long, device=like.device))

    def append(self, k: torch.Tensor, v: torch.Tensor, take: torch.Tensor) -> None:
        """Append the tokens of k, v (B, H_kv, T, D) where take (B, T) is True, per row, in order."""
        counts = take.sum(1)
        new_lengths = self.lengths + counts
        need = int(new_lengths.max()) if new_lengths.numel() else 0
        capacity = self.keys.shape[2]
        if need > capacity:  # grow geometrically: decode appends one token at a time
            extra = max(need, 2 * capacity) - capacity
            pad = self.keys.new_zeros(*self.keys.shape[:2], extra, self.keys.shape[3])
            self.keys = torch.cat([self.keys, pad], dim=2)
            self.values = torch.cat([self.values, pad.clone()], dim=2)
        rows, cols = take.nonzero(as_tuple=True)
        slots = (self.lengths[:, None] + take.long().cumsum(1) - 1)[rows, cols]
        self.keys[rows, :, slots] = k[rows, :, cols].to(self.keys.dtype)
        self.values[rows, :, slots] = v[rows, :, cols].to(self.values.dtype)
        self.lengths = new_lengths

    def view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, values) trimmed to the longest row, and the per-row lengths."""
        width = int(self.lengths.max()) if self.lengths.numel() else 0
        return self.keys[:, :, :width], self.values[:, :, :width], self.lengths

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep / reorder / repeat rows (beam search)."""
        index = index.to(self.lengths.device)
        self.keys, self.values, self.lengths = self.keys[index], self.values[index], self.lengths[index]


@dataclass
class PackedSegments:
    """One segment per row that has routed queries: queries (N_q, H, D), keys and values (N_k, H_kv, D),
    cumulative segment lengths (int32, as flash-attn wants them) and the longest segment of each."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int


def pack_routed(q: torch.Tensor, take: torch.Tensor, store: RoutedKV) -> PackedSegments:
    """q (B, H, T, D) of the chunk, take (B, T) its routed tokens, `store` the rows' routed K/V with the
    chunk's routed tokens already appended (so each row's queries are the last entries of its keys)."""
    counts = take.sum(1)
    rows = counts > 0
    keys, values, lengths = store.view()
    valid = (torch.arange(keys.shape[2], device=take.device)[None, :] < lengths[:, None]) & rows[:, None]
    cu_q = F.pad(counts[rows].cumsum(0), (1, 0)).to(torch.int32)
    cu_k = F.pad(lengths[rows].cumsum(0), (1, 0)).to(torch.int32)
    return PackedSegments(
        q=q.transpose(1, 2)[take], k=keys.transpose(1, 2)[valid], v=values.transpose(1, 2)[valid],
        cu_q=cu_q, cu_k=cu_k, max_q=int(counts.max()) if counts.numel() else 0,
        max_k=int(lengths[rows].max()) if bool(rows.any()) else 0)


def unpack_routed(out: torch.Tensor, take: torch.Tensor, bypass: torch.Tensor) -> torch.Tensor:
    """Scatter the packed outputs (N_q, H, D) back to (B, T, H, D); tokens not taken keep `bypass`."""
    full = bypass.clone()
    full[take] = out.to(full.dtype)
    return full


def varlen_attention_torch(seg: PackedSegments, scale: float) -> torch.Tensor:
    """Causal attention inside each segment, queries aligned to the END of their keys (query a of a
    segment with L_q queries and L_k keys sees keys 0 .. L_k - L_q + a), one SDPA call per segment."""
    group = seg.q.shape[1] // seg.k.shape[1]
    cu_q, cu_k = seg.cu_q.tolist(), seg.cu_k.tolist()
    outs = []
    for s in range(len(cu_q) - 1):
        q = seg.q[cu_q[s]:cu_q[s + 1]].transpose(0, 1)  # (H, L_q, D)
        k = seg.k[cu_k[s]:cu_k[s + 1]].transpose(0, 1).repeat_interleave(group, dim=0)
        v = seg.v[cu_k[s]:cu_k[s + 1]].transpose(0, 1).repeat_interleave(group, dim=0)
        n_q, n_k = q.shape[1], k.shape[1]
        allowed = (torch.arange(n_k, device=q.device)[None, :]
                   <= (n_k - n_q) + torch.arange(n_q, device=q.device)[:, None])
        outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale).transpose(0, 1))
    return torch.cat(outs) if outs else seg.q.new_zeros(seg.q.shape)


def varlen_attention_flash(seg: PackedSegments, scale: float) -> torch.Tensor:
    """The same segments through flash-attn's `flash_attn_varlen_func` (CUDA, fp16/bf16). Its causal
    mask is bottom-right aligned when L_q != L_k (flash-attn >= 2.1), as `varlen_attention_torch`."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as err:  # the only path FlashAttention offers here: say so instead of falling back
        raise ImportError("the flash_attention_2 path of routed attention needs the `flash_attn` package") from err
    if seg.q.shape[0] == 0:
        return seg.q.new_zeros(seg.q.shape)
    return flash_attn_varlen_func(seg.q, seg.k, seg.v, seg.cu_q, seg.cu_k, seg.max_q, seg.max_k,
                                  softmax_scale=scale, causal=True)
