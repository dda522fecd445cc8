"""Gated linear attention as a plain loop over time (the reference) and as one decode step.

Layout as flash-linear-attention's GLA, heads first: q, k (B, H, T, Dk), v (B, H, T, Dv), log-gates
gk (B, H, T, Dk) on the key axis and/or gv (B, H, T, Dv) on the value axis, all ≤ 0. The state is
h (B, H, Dk, Dv), accumulated in float32 (float64 for float64 inputs):

    h_t = diag(exp gk_t) · h_{t−1} · diag(exp gv_t) + k_t v_tᵀ,      o_t = scale · q_tᵀ h_t

`scale` defaults to Dk^-½, as fla's.
"""

from __future__ import annotations

import torch


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 when the inputs are float64."""
    return torch.promote_types(dtype, torch.float32)


def _check(q, k, v, gk, gv, initial_state) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape[:3] != v.shape[:3]:
        raise ValueError(f"q, k must be (B, H, T, Dk) and v (B, H, T, Dv); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if gk is not None and gk.shape != k.shape:
        raise ValueError(f"gk must have k's shape {tuple(k.shape)}, got {tuple(gk.shape)}")
    if gv is not None and gv.shape != v.shape:
        raise ValueError(f"gv must have v's shape {tuple(v.shape)}, got {tuple(gv.shape)}")
    want = (*q.shape[:2], q.size(-1), v.size(-1))
    if initial_state is not None and tuple(initial_state.shape) != want:
        raise ValueError(f"initial_state must be (B, H, Dk, Dv) = {want}, got {tuple(initial_state.shape)}")


def recurrent_gla(q, k, v, gk=None, gv=None, scale: float | None = None, initial_state=None):
    """The reference: one step at a time. Returns o (B, H, T, Dv) in v's dtype and the final state."""
    _check(q, k, v, gk, gv, initial_state)
    acc = accumulator_dtype(q.dtype)
    b, h_, t_len, dk = q.shape
    dv = v.size(-1)
    scale = dk**-0.5 if scale is None else scale
    out_dtype = v.dtype
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    h = q.new_zeros(b, h_, dk, dv) if initial_state is None else initial_state.to(acc)
    outs = []
    for t in range(t_len):
        if gk is not None:
            h = h * gk[:, :, t].to(acc).exp()[..., :, None]
        if gv is not None:
            h = h * gv[:, :, t].to(acc).exp()[..., None, :]
        h = h + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(scale * (q[:, :, t, :, None] * h).sum(-2))
    o = torch.stack(outs, dim=2) if outs else v.new_zeros(b, h_, 0, dv)
    return o.to(out_dtype), h


def decode_gla(q, k, v, gk=None, gv=None, scale: float | None = None, state=None):
    """One decode step: q, k (B, H, Dk), v (B, H, Dv), gk/gv like k/v, state (B, H, Dk, Dv) or None.
    Returns o (B, H, Dv) in v's dtype and the new state."""
    _check(q[:, :, None], k[:, :, None], v[:, :, None], None if gk is None else gk[:, :, None],
           None if gv is None else gv[:, :, None], state)
    acc = accumulator_dtype(q.dtype)
    scale = q.size(-1) ** -0.5 if scale is None else scale
    out_dtype = v.dtype
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    h = q.new_zeros(*q.shape[:2], q.size(-1), v.size(-1)) if state is None else state.to(acc)
    if gk is not None:
        h = h * gk.to(acc).exp()[..., :, None]
    if gv is not None:
        h = h * gv.to(acc).exp()[..., None, :]
    h = h + k[..., :, None] * v[..., None, :]
    o = scale * torch.einsum("bhk,bhkv->bhv", q, h)
    return o.to(out_dtype), h
