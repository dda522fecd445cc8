"""Gated linear attention in chunks: parallel inside a chunk of C tokens, recurrent across chunks.
The training form; equal to `recurrent_gla` (same layout, same formulas) up to rounding.

Inside a chunk, with G the cumulative log-gate from the chunk's start (inclusive) and h the state
entering the chunk:

    o_t = scale · [ (q_t ⊙ e^{Gk_t})ᵀ h ⊙ e^{Gv_t}  +  Σ_{s≤t} Σ_d q_td k_sd e^{Gk_td − Gk_sd} · v_s ⊙ e^{Gv_t − Gv_s} ]
    h'  = diag(e^{Gk_C}) h diag(e^{Gv_C}) + Σ_s (k_s ⊙ e^{Gk_C − Gk_s}) (v_s ⊙ e^{Gv_C − Gv_s})ᵀ

Every exponent is a sum of log-gates over a later-minus-earlier span, hence ≤ 0: the pairwise
decay is formed per (t, s) pair (C × C × D per chunk) rather than as e^{G_t}·e^{−G_s}, which would
overflow once a chunk's gates sum past about −88 in float32.
"""

from __future__ import annotations

import torch

from .recurrent import _check, accumulator_dtype

DEFAULT_CHUNK_SIZE = 16


def _pairwise_decay(G: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
    """exp(G_t − G_s) for s ≤ t, 0 above the diagonal: (B, H, L, L, D)."""
    diff = G[:, :, :, None, :] - G[:, :, None, :, :]
    return diff.masked_fill(~causal[:, :, None], float("-inf")).exp()


def chunked_gla(q, k, v, gk=None, gv=None, scale: float | None = None, initial_state=None,
                chunk_size: int = DEFAULT_CHUNK_SIZE):
    """Returns o (B, H, T, Dv) in v's dtype and the final state (B, H, Dk, Dv) in float32/64."""
    _check(q, k, v, gk, gv, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    acc = accumulator_dtype(q.dtype)
    b, nh, t_len, dk = q.shape
    dv = v.size(-1)
    scale = dk**-0.5 if scale is None else scale
    out_dtype = v.dtype
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    gk = None if gk is None else gk.to(acc)
    gv = None if gv is None else gv.to(acc)
    h = q.new_zeros(b, nh, dk, dv) if initial_state is None else initial_state.to(acc)
    outs = []
    for lo in range(0, t_len, chunk_size):
        hi = min(lo + chunk_size, t_len)
        qc, kc, vc = q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi]
        causal = torch.ones(hi - lo, hi - lo, dtype=torch.bool, device=q.device).tril()
        # scores of the chunk's own pairs, key-axis decay inside
        if gk is not None:
            Gk = gk[:, :, lo:hi].cumsum(dim=2)
            scores = torch.einsum("bhtd,bhsd,bhtsd->bhts", qc, kc, _pairwise_decay(Gk, causal))
            q_in, k_out = qc * Gk.exp(), kc * (Gk[:, :, -1:] - Gk).exp()
        else:
            scores = torch.einsum("bhtd,bhsd->bhts", qc, kc).masked_fill(~causal, 0.0)
            q_in, k_out = qc, kc
        if gv is not None:
            Gv = gv[:, :, lo:hi].cumsum(dim=2)
            intra = torch.einsum("bhts,bhsv,bhtsv->bhtv", scores, vc, _pairwise_decay(Gv, causal))
            inter = torch.einsum("bhtk,bhkv->bhtv", q_in, h) * Gv.exp()
            v_out = vc * (Gv[:, :, -1:] - Gv).exp()
        else:
            intra = scores @ vc
            inter = q_in @ h
            v_out = vc
        outs.append(scale * (inter + intra))
        # state leaving the chunk
        if gk is not None:
            h = h * Gk[:, :, -1, :, None].exp()
        if gv is not None:
            h = h * Gv[:, :, -1, None, :].exp()
        h = h + k_out.transpose(-1, -2) @ v_out
    o = torch.cat(outs, dim=2) if outs else v.new_zeros(b, nh, 0, dv)
    return o.to(out_dtype), h
