"""GLA ops (reft_kernels/gla): the recurrent reference, the chunked form and the decode step agree in
float64 forward and backward across chunk boundaries; the Triton kernel (interpreter on CPU) and fla's
kernels agree with them; fla's own naive recurrence is the outside oracle."""

import pytest
import torch
import torch.nn.functional as F

from reft_kernels.gla import (
    chunked_gla,
    decode_gla,
    fla_chunked_gla,
    recurrent_gla,
    triton_chunked_gla,
)

C = 4  # chunk size of the torch chunked form here
LENGTHS = [1, 2, C - 1, C, C + 1, 2 * C + 1]
GATES = ["key", "value", "both", "none"]


def inputs(t_len, gates="key", dk=5, dv=6, dtype=torch.float64, seed=0, strength=1.0):
    g = torch.Generator().manual_seed(seed)
    shape = (2, 3, t_len)

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=dtype)

    q, k, v = rnd(*shape, dk), rnd(*shape, dk), rnd(*shape, dv)
    gk = strength * F.logsigmoid(rnd(*shape, dk) + 1) if gates in ("key", "both") else None
    gv = strength * F.logsigmoid(rnd(*shape, dv) + 1) if gates in ("value", "both") else None
    h0 = rnd(2, 3, dk, dv)
    return q, k, v, gk, gv, h0


def decode_loop(q, k, v, gk=None, gv=None, scale=None, initial_state=None):
    """The sampler's form: one `decode_gla` step per token."""
    state, outs = initial_state, []
    for t in range(q.size(2)):
        o, state = decode_gla(q[:, :, t], k[:, :, t], v[:, :, t], None if gk is None else gk[:, :, t],
                              None if gv is None else gv[:, :, t], scale=scale, state=state)
        outs.append(o)
    return torch.stack(outs, 2), state


FORMS = {
    "recurrent": recurrent_gla,
    "chunked": lambda *a, **kw: chunked_gla(*a, **kw, chunk_size=C),
    "decode": decode_loop,
}


def run_with_grads(form, tensors, scale=0.7):
    """Output, final state and the gradients of a fixed random functional of both w.r.t. every input."""
    leaves = [None if t is None else t.clone().requires_grad_(True) for t in tensors]
    q, k, v, gk, gv, h0 = leaves
    o, h = FORMS[form](q, k, v, gk, gv, scale=scale, initial_state=h0)
    g = torch.Generator().manual_seed(9)
    loss = (o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() + (h * torch.randn(h.shape, generator=g,
                                                                                         dtype=h.dtype)).sum()
    loss.backward()
    return o.detach(), h.detach(), [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("gates", GATES)
@pytest.mark.parametrize("t_len", LENGTHS)
def test_three_forms_agree_in_float64_forward_and_backward(t_len, gates):
    """recurrent = chunked = decode steps to 1e-10 in o, the final state and every gradient (q, k, v,
    gk, gv, initial state), for T around the chunk size (1, 2, C−1, C, C+1, 2C+1). Catches an exclusive
    instead of inclusive in-chunk cumsum, a state not carried or not decayed across chunks, the gate
    applied after the new k vᵀ instead of before, and a dropped initial state."""
    tensors = inputs(t_len, gates)
    ref = run_with_grads("recurrent", tensors)
    for form in ("chunked", "decode"):
        got = run_with_grads(form, tensors)
        torch.testing.assert_close(got[0], ref[0], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(got[1], ref[1], atol=1e-10, rtol=1e-10)
        for a, b in zip(got[2], ref[2]):
            if b is not None:
                torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_chunked_form_stays_finite_under_gates_that_sum_past_float32_range():
    """Log-gates of −40 per token sum to −1280 over a chunk of 32: e^{G_t}·e^{−G_s} would overflow to
    inf·0 = NaN in float32; the pairwise exponent (≤ 0) keeps the chunked form equal to the recurrence."""
    q, k, v, _, _, h0 = inputs(70, "none", dtype=torch.float32)
    gk = torch.full_like(q, -40.0)
    gk[:, :, ::7] = 0.0  # some steps keep the state, so the output is not just the newest token
    ref_o, ref_h = recurrent_gla(q, k, v, gk, initial_state=h0)
    o, h = chunked_gla(q, k, v, gk, initial_state=h0, chunk_size=32)
    assert torch.isfinite(o).all() and torch.isfinite(h).all()
    torch.testing.assert_close(o, ref_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, ref_h, atol=1e-5, rtol=1e-5)


def test_default_scale_and_missing_initial_state_follow_fla():
    """scale defaults to Dk^-½ and no initial state means zeros (fla's conventions)."""
    q, k, v, gk, _, _ = inputs(5)
    o, h = recurrent_gla(q, k, v, gk)
    o2, h2 = recurrent_gla(q, k, v, gk, scale=q.size(-1) ** -0.5, initial_state=torch.zeros_like(h))
    assert torch.equal(o, o2) and torch.equal(h, h2)


def test_bad_shapes_are_rejected():
    q, k, v, gk, gv, h0 = inputs(3, "both")
    with pytest.raises(ValueError, match="gk"):
        recurrent_gla(q, k, v, gv)
    with pytest.raises(ValueError, match="initial_state"):
        chunked_gla(q, k, v, gk, initial_state=h0[..., :2])
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_gla(q, k, v, gk, chunk_size=0)


# --------------------------------------------------------------------------- flash-linear-attention oracle


def test_recurrent_reference_equals_fla_naive_recurrent_gla():
    """fla's `naive_recurrent_gla` ((B, T, H, D) layout, scale Dk^-½, float32 inside) with an initial
    state: our reference matches it to float32 rounding, output and final state."""
    naive = pytest.importorskip("fla.ops.gla.naive", reason="flash-linear-attention (dev extra: fla-core) "
                                "is not importable here").naive_recurrent_gla
    q, k, v, gk, _, h0 = inputs(11, "key", dtype=torch.float32, strength=2.0)
    o, h = recurrent_gla(q, k, v, gk, initial_state=h0)
    their_o, their_h = naive(*(x.transpose(1, 2) for x in (q, k, v, gk)), initial_state=h0, output_final_state=True)
    torch.testing.assert_close(o, their_o.transpose(1, 2), atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(h, their_h, atol=2e-6, rtol=2e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's chunk_gla is a CUDA kernel")
def test_fla_chunk_kernel_equals_the_chunked_reference_on_gpu():
    """fla's `chunk_gla` behind our layout, forward and backward, against `chunked_gla` in float64."""
    pytest.importorskip("fla.ops.gla", reason="flash-linear-attention is not installed")
    tensors = inputs(200, "key", dk=32, dv=32, dtype=torch.float32)
    cuda = [t.detach().cuda().clone().requires_grad_(True) for t in (tensors[0], tensors[1], tensors[2], tensors[3], tensors[5])]
    o, h = fla_chunked_gla(*cuda[:4], scale=0.3, initial_state=cuda[4])
    (o.square().sum() + h.sum()).backward()
    ref = [t.detach().double().cpu().requires_grad_(True) for t in cuda]
    ro, rh = chunked_gla(*ref[:4], scale=0.3, initial_state=ref[4])
    (ro.square().sum() + rh.sum()).backward()
    torch.testing.assert_close(o.double().cpu(), ro, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(h.double().cpu(), rh, atol=2e-3, rtol=2e-3)
    for a, b in zip(cuda, ref):
        torch.testing.assert_close(a.grad.double().cpu(), b.grad, atol=5e-3, rtol=5e-3)


# --------------------------------------------------------------------------- Triton kernel


@pytest.mark.parametrize("t_len", [1, 15, 16, 17, 33])
def test_triton_kernel_equals_the_reference(t_len, kernel_device):
    """The kernel (BT = 16) in float32 against the float64 recurrence: T around its chunk, Dk and Dv not
    powers of two (masked lanes), an initial state. Catches a G read one row off, padded rows that
    leak gate or key into the state, and a state not decayed by the chunk's total gate."""
    q, k, v, gk, _, h0 = inputs(t_len, "key", dk=5, dv=12, strength=2.0)
    ref_o, ref_h = recurrent_gla(q, k, v, gk, scale=0.4, initial_state=h0)
    dev = [x.float().to(kernel_device) for x in (q, k, v, gk, h0)]
    o, h = triton_chunked_gla(*dev[:4], scale=0.4, initial_state=dev[4])
    torch.testing.assert_close(o.double().cpu(), ref_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.double().cpu(), ref_h, atol=1e-5, rtol=1e-5)
    o0, h0_ = triton_chunked_gla(*dev[:4], scale=0.4)
    ref_o0, ref_h0 = recurrent_gla(q, k, v, gk, scale=0.4)
    torch.testing.assert_close(o0.double().cpu(), ref_o0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h0_.double().cpu(), ref_h0, atol=1e-5, rtol=1e-5)


def test_triton_kernel_gradients_equal_the_reference(kernel_device):
    """The backward recomputes through `chunked_gla`: gradients of q, k, v, gk and the initial state
    equal the reference's (float32)."""
    q, k, v, gk, _, h0 = inputs(19, "key", dk=5, dv=7, dtype=torch.float32)
    dev = [x.detach().to(kernel_device).clone().requires_grad_(True) for x in (q, k, v, gk, h0)]
    o, h = triton_chunked_gla(*dev[:4], scale=0.4, initial_state=dev[4])
    (o.sin().sum() + h.square().sum()).backward()
    ref = [x.clone().requires_grad_(True) for x in (q, k, v, gk, h0)]
    ro, rh = recurrent_gla(*ref[:4], scale=0.4, initial_state=ref[4])
    (ro.sin().sum() + rh.square().sum()).backward()
    for a, b in zip(dev, ref):
        torch.testing.assert_close(a.grad.cpu(), b.grad, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="key-axis"):
        triton_chunked_gla(*dev[:3], None)
