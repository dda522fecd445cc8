"""Resona's retrieval ops (SPEC.md §8), on per-row content positions, the same code for prefill and decode.

A row's real tokens, in order, fill content slots 0, 1, 2, ... (pads never take a slot); chunk c is slots
[cC, (c+1)C) and is complete once the row has seen (c+1)C real tokens. A token at content position p
may read chunk c iff (c+1)C ≤ p (completed before it), plus optionally its own chunk ⌊p/C⌋ up to p.

Tensor widths depend only on how many columns (pads included) the batch has processed, never on a
row's content, so one row's numbers never depend on another's.
"""

from __future__ import annotations

import torch

from reft_kernels.scout_attention import compact_index

# The read gathers (B, H, T, E, D) keys and values; queries are taken in blocks that keep each gather
# under this many elements (long prefills would otherwise gather T·k·C keys at once).
GATHER_ELEMENTS = 1 << 24


def content_positions(valid: torch.Tensor, seen_before: torch.Tensor) -> torch.Tensor:
    """(B, T): the content position of each real token (real tokens seen before it in its row); a pad
    gets the position of the last real token before it (never used)."""
    return (seen_before[:, None] + valid.long().cumsum(dim=1) - 1).clamp(min=0)


def content_slots(old: torch.Tensor | None, new: torch.Tensor, valid: torch.Tensor, seen_before: torch.Tensor,
                  width: int) -> torch.Tensor:
    """(B, H, width, D): slot s holds the vector of the row's real token at content position s; slots at or
    past the row's seen count are 0. `old` (B, H, W_old, D) are the slots before this chunk (or None),
    `new` (B, H, T, D) the chunk's vectors, `valid` (B, T) its real tokens. A new tensor (own storage)."""
    b, h, t, d = new.shape
    w_old = 0 if old is None else old.size(2)
    source = new if old is None else torch.cat([old, new.to(old.dtype)], dim=2)
    order, _ = compact_index(valid, t)  # (B, T): columns of the chunk's real tokens, in order
    s = torch.arange(width, device=new.device)[None, :]
    before, after = seen_before[:, None], (seen_before + valid.sum(dim=1))[:, None]
    from_new = w_old + order.gather(1, (s - before).clamp(0, t - 1))
    filled = s < after
    index = torch.where(s < before, s, from_new).masked_fill(~filled, 0)
    out = source.gather(2, index[:, None, :, None].expand(b, h, width, d))
    return out.masked_fill(~filled[:, None, :, None], 0.0)


def update_summaries(keys: torch.Tensor, old: torch.Tensor | None, seen_before: torch.Tensor,
                     seen_after: torch.Tensor, chunk_size: int, new_columns: int, reduce: str) -> torch.Tensor:
    """(B, H, W // C, D): the summaries of completed chunks (0 for the others). Only the chunks that
    complete in this call are computed (from their slots in `keys` (B, H, W, D)); earlier ones come from
    `old` unchanged. `reduce`: "mean" or "max" over the chunk's C keys."""
    b, h, w, d = keys.shape
    c = chunk_size
    n = w // c
    # a call of T columns completes at most T // C + 1 chunks of a row: its candidates, from its first open one
    m = new_columns // c + 1
    candidates = (seen_before // c)[:, None] + torch.arange(m, device=keys.device)  # (B, m)
    completed = (candidates + 1) * c <= seen_after[:, None]
    slots = (candidates[..., None] * c + torch.arange(c, device=keys.device)).clamp(max=w - 1)
    chunk_keys = keys.gather(2, slots.view(b, 1, m * c, 1).expand(b, h, m * c, d)).view(b, h, m, c, d)
    summary = chunk_keys.mean(dim=-2) if reduce == "mean" else chunk_keys.amax(dim=-2)
    kept = 0 if old is None else old.size(2)
    base = keys.new_zeros(b, h, n + 1 - kept, d)
    base = base if old is None else torch.cat([old.to(keys.dtype), base], dim=2)
    # candidates that did not complete are written to the spare slot n, which is dropped
    target = torch.where(completed, candidates, n)
    base = base.scatter(2, target.view(b, 1, m, 1).expand(b, h, m, d), summary)
    return base[:, :, :n].contiguous()


def select_chunks(r: torch.Tensor, summaries: torch.Tensor, positions: torch.Tensor, query_valid: torch.Tensor,
                  chunk_size: int, top_k: int | None, scale: float):
    """Top-k chunks per token and head by the scaled dot product r_t · summary_c · scale, among the chunks
    completed before the token ((c+1)·C ≤ p_t). r (B, H, T, D); summaries (B, H, n, D).

    Returns chunk indices, whether each pick is a real chunk (a token with fewer than k completed chunks
    gets fewer), and the picks' scores (0 where not real): each (B, H, T, k), k = min(top_k, n)."""
    n = summaries.size(2)
    k = n if top_k is None else min(top_k, n)
    scores = torch.einsum("bhtd,bhnd->bhtn", r, summaries) * scale
    chunk = torch.arange(n, device=r.device)
    available = ((chunk + 1) * chunk_size <= positions[:, :, None]) & query_valid[:, :, None]  # (B, T, n)
    scores = scores.masked_fill(~available[:, None], float("-inf"))
    top, index = scores.topk(k, dim=-1)
    real = torch.isfinite(top)
    return index, real, torch.where(real, top, torch.zeros_like(top))


def read_entries(index, real, score, positions, query_valid, chunk_size: int, own_chunk: bool, score_bias: bool):
    """The slots each token reads, as (slot index, visible, logit bias), each (B, H, T, E): the C slots of
    each picked chunk (bias: its score, when `score_bias`), then, with `own_chunk`, the C slots of the
    token's own chunk visible up to its own position (bias 0)."""
    c = chunk_size
    offsets = torch.arange(c, device=positions.device)
    b, h, t, k = index.shape
    slots = (index[..., None] * c + offsets).flatten(-2)
    visible = real[..., None].expand(b, h, t, k, c).flatten(-2)
    bias = (score if score_bias else torch.zeros_like(score))[..., None].expand(b, h, t, k, c).flatten(-2)
    if own_chunk:
        own = ((positions // c) * c)[..., None] + offsets  # (B, T, C)
        own_visible = (own <= positions[..., None]) & query_valid[..., None]
        slots = torch.cat([slots, own[:, None].expand(b, h, t, c)], dim=-1)
        visible = torch.cat([visible, own_visible[:, None].expand(b, h, t, c)], dim=-1)
        bias = torch.cat([bias, bias.new_zeros(b, h, t, c)], dim=-1)
    return slots, visible, bias


def gathered_read(q, keys, values, slots, visible, bias, scale: float) -> torch.Tensor:
    """softmax(q · K_gᵀ · scale + bias) V_g over each token's visible gathered slots (one softmax in q's
    dtype); a token that sees nothing reads 0. q (B, H, T, D); keys, values (B, H, W, D) content slots;
    slots, visible, bias (B, H, T, E). Returns (B, H, T, D)."""
    b, h, t, d = q.shape
    e = slots.size(-1)
    if e == 0:  # no chunk slot exists yet (fewer than C columns) and no own chunk
        return q.new_zeros(b, h, t, d)
    slots = slots.clamp(max=keys.size(2) - 1)  # an own chunk's unfilled tail (invisible) may point past the end
    block = max(1, GATHER_ELEMENTS // max(1, b * h * e * d))
    parts = []
    for lo in range(0, t, block):
        hi = min(t, lo + block)
        index = slots[:, :, lo:hi].reshape(b, h, -1, 1).expand(-1, -1, -1, d)
        kg = keys.gather(2, index).view(b, h, hi - lo, e, d).to(q.dtype)
        vg = values.gather(2, index).view(b, h, hi - lo, e, d).to(q.dtype)
        logits = torch.einsum("bhtd,bhted->bhte", q[:, :, lo:hi], kg) * scale + bias[:, :, lo:hi]
        logits = logits.masked_fill(~visible[:, :, lo:hi], float("-inf"))
        top = logits.amax(dim=-1, keepdim=True).detach()  # the softmax is shift-invariant
        weights = (logits - torch.where(torch.isfinite(top), top, torch.zeros_like(top))).exp()
        total = weights.sum(dim=-1, keepdim=True)
        read = torch.einsum("bhte,bhted->bhtd", weights, vg)
        parts.append(read / torch.where(total > 0, total, torch.ones_like(total)))
    return torch.cat(parts, dim=2)
