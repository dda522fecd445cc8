"""A Triton kernel for the chunked GLA forward (key-axis gate), the GPU fast path of `chunked_gla`.

One program per (batch·head, block of value features) walks the chunks in order, holding the state
block h (Dk × BV, float32) in registers: per chunk of BT tokens it forms the cumulative log-gate G,
the inter-chunk term (q ⊙ e^G) h, the intra-chunk scores Σ_d q_td k_sd e^{G_td − G_sd} (s ≤ t, the
pairwise exponent ≤ 0, as in `chunked.py`), and the next state. Matmuls use IEEE float32 (no TF32).

The backward is not a kernel: it recomputes the chunk through the plain-torch `chunked_gla` under
autograd, so gradients are the reference's exactly and cost what the reference costs.

The kernel is jitted on first use in the mode `TRITON_INTERPRET` asks for at that moment, so the
interpreter runs it on CPU tensors (tests) and the compiler on CUDA tensors.
"""

from __future__ import annotations

import torch

from .chunked import chunked_gla
from .recurrent import _check

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is in the dev extra and on GPU machines
    triton = None
    tl = None

constexpr = tl.constexpr if tl is not None else int  # kernel annotations; plain int without triton

BLOCK_T = 16  # tokens per chunk (tl.dot needs at least 16)
# tl.sum / tl.cumsum / tl.zeros / tl.cdiv are jitted when triton is imported, in the mode of that moment, so they
# cannot run under an interpreter switched on later (tests set TRITON_INTERPRET per test): the kernel
# calls tl.reduce / tl.associative_scan, which the interpreter patches, with the sum combiner directly.
_SUM = tl.standard._sum_combine if tl is not None else None


def _chunk_gla_fwd_kernel(q_ptr, k_ptr, v_ptr, g_ptr, h0_ptr, o_ptr, ht_ptr, scale, T,
                          K: constexpr, V: constexpr, BT: constexpr, BK: constexpr, BV: constexpr,
                          HAS_H0: constexpr):
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    p_h = i_bh * K * V + o_k[:, None] * V + o_v[None, :]
    m_h = m_k[:, None] & m_v[None, :]
    if HAS_H0:
        b_h = tl.load(h0_ptr + p_h, mask=m_h, other=0.0)
    else:
        b_h = tl.full([BK, BV], 0.0, tl.float32)
    o_c = tl.arange(0, BT)
    causal = o_c[:, None] >= o_c[None, :]
    for i_t in range(0, (T + BT - 1) // BT):
        o_t = i_t * BT + o_c
        m_t = o_t < T
        p_qk = i_bh * T * K + o_t[:, None] * K + o_k[None, :]
        m_qk = m_t[:, None] & m_k[None, :]
        b_q = tl.load(q_ptr + p_qk, mask=m_qk, other=0.0)
        b_k = tl.load(k_ptr + p_qk, mask=m_qk, other=0.0)
        b_g = tl.load(g_ptr + p_qk, mask=m_qk, other=0.0)  # rows past T: gate 0, so G stays at the chunk's end
        p_v = i_bh * T * V + o_t[:, None] * V + o_v[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_v = tl.load(v_ptr + p_v, mask=m_tv, other=0.0)
        b_G = tl.associative_scan(b_g, 0, _SUM)  # tl.cumsum
        b_o = tl.dot(b_q * tl.exp(b_G), b_h, input_precision="ieee")
        diff = tl.where(causal[:, :, None], b_G[:, None, :] - b_G[None, :, :], float("-inf"))
        b_A = tl.reduce(b_q[:, None, :] * b_k[None, :, :] * tl.exp(diff), 2, _SUM)  # tl.sum(axis=2)
        b_o += tl.dot(b_A, b_v, input_precision="ieee")
        tl.store(o_ptr + p_v, b_o * scale, mask=m_tv)
        b_last = tl.reduce(b_g, 0, _SUM)
        b_kd = b_k * tl.exp(b_last[None, :] - b_G)
        b_h = b_h * tl.exp(b_last)[:, None] + tl.dot(tl.trans(b_kd), b_v, input_precision="ieee")
    tl.store(ht_ptr + p_h, b_h, mask=m_h)


_JITTED: dict[bool, object] = {}


def interpreting() -> bool:
    return triton is not None and bool(triton.knobs.runtime.interpret)


def _kernel():
    if triton is None:
        raise RuntimeError("the Triton GLA kernel needs the `triton` package (pip install triton, or the "
                           "project's dev extra); gla_backend='torch' needs nothing")
    mode = interpreting()
    if mode not in _JITTED:
        _JITTED[mode] = triton.jit(_chunk_gla_fwd_kernel)
    return _JITTED[mode]


def _forward(q, k, v, gk, initial_state, scale):
    if q.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"the Triton GLA kernel runs on CUDA tensors, got a tensor on {q.device}; set "
                           "TRITON_INTERPRET=1 before the first call to run it on CPU with Triton's "
                           "interpreter, or use gla_backend='torch'")
    b, nh, t_len, dk = q.shape
    dv = v.size(-1)
    q, k, v, gk = (x.float().contiguous() for x in (q, k, v, gk))
    o = torch.empty(b, nh, t_len, dv, dtype=torch.float32, device=q.device)
    ht = torch.empty(b, nh, dk, dv, dtype=torch.float32, device=q.device)
    h0 = initial_state.float().contiguous() if initial_state is not None else ht  # unread without HAS_H0
    bk = max(16, triton.next_power_of_2(dk))
    bv = max(16, min(64, triton.next_power_of_2(dv)))
    grid = (triton.cdiv(dv, bv), b * nh)
    _kernel()[grid](q, k, v, gk, h0, o, ht, float(scale), t_len, K=dk, V=dv, BT=BLOCK_T, BK=bk, BV=bv,
                    HAS_H0=initial_state is not None)
    return o, ht


class _TritonChunkGLA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, gk, initial_state, scale):
        o, ht = _forward(q, k, v, gk, initial_state, scale)
        ctx.save_for_backward(q, k, v, gk, initial_state)
        ctx.scale = scale
        return o.to(v.dtype), ht

    @staticmethod
    def backward(ctx, d_o, d_ht):
        saved = ctx.saved_tensors
        wanted = [i for i, x in enumerate(saved) if x is not None and ctx.needs_input_grad[i]]
        grads = [None] * 6
        if not wanted:
            return tuple(grads)
        with torch.enable_grad():
            inputs = [None if x is None else x.detach().requires_grad_(i in wanted) for i, x in enumerate(saved)]
            q, k, v, gk, h0 = inputs
            o, ht = chunked_gla(q, k, v, gk, scale=ctx.scale, initial_state=h0, chunk_size=BLOCK_T)
            outputs = [t for t, g in ((o, d_o), (ht, d_ht)) if g is not None]
            out_grads = [g for g in (d_o, d_ht) if g is not None]
            found = torch.autograd.grad(outputs, [inputs[i] for i in wanted], out_grads, allow_unused=True)
        for i, g in zip(wanted, found):
            grads[i] = g
        return tuple(grads)


def triton_chunked_gla(q, k, v, gk, scale: float | None = None, initial_state=None):
    """`chunked_gla` with a key-axis gate, forward by the Triton kernel (float32 inside). Returns o in
    v's dtype and the final state in float32."""
    _check(q, k, v, gk, None, initial_state)
    if gk is None:
        raise ValueError("the Triton GLA kernel takes a key-axis gate gk; use chunked_gla for gv or no gate")
    scale = q.size(-1) ** -0.5 if scale is None else scale
    return _TritonChunkGLA.apply(q, k, v, gk, initial_state, scale)
