"""Triton PoT and INT dequantization == the torch reference, bit for bit (interpreter on CPU)."""

import pytest
import torch

from reft_kernels.pot.format import pot_scale_bounds
from reft_kernels.pot.reference import (
    int_dequantize,
    int_quantize_rtn,
    pot_dequantize,
    pot_quantize,
)
from reft_kernels.pot.search import grid_search_scales
from reft_kernels.pot.triton_dequant import int_dequantize_triton, pot_dequantize_triton

# (out, in, group): divisible, partial last group, in < group, odd rows, in not a word multiple
SHAPES = [(16, 256, 128), (5, 300, 128), (3, 70, 128), (9, 96, 32), (1, 33, 16)]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype == torch.float16 and torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape", SHAPES)
def test_pot_kernel_equals_reference(kernel_device, bits, shape):
    n, k, g = shape
    torch.manual_seed(n * k + bits)
    w = torch.randn(n, k) * torch.logspace(-3, 1, n).unsqueeze(1)  # rows of very different sizes
    q = pot_quantize(w, grid_search_scales(w, bits, g), bits, g)
    want = pot_dequantize(q)
    q.packed, q.scales = q.packed.to(kernel_device), q.scales.to(kernel_device)
    got = pot_dequantize_triton(q).cpu()
    assert same_bits(got, want)
    assert (got.float() != 0).all()  # no zero level


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pot_kernel_at_fp16_scale_limits(kernel_device, bits):
    """Smallest normal and largest allowed scales, every code: still exact, never inf."""
    lo, hi = pot_scale_bounds(bits)
    n_codes = 2 ** bits
    scales = torch.tensor([[lo], [hi], [1.0], [0.0999]])
    mags = 2.0 ** torch.arange(n_codes // 2, dtype=torch.float32)
    w = torch.cat([mags, -mags]).unsqueeze(0) * scales  # hits every (sign, E)
    q = pot_quantize(w, scales, bits, n_codes)
    want = pot_dequantize(q)
    assert torch.isfinite(want.float()).all()
    q.packed, q.scales = q.packed.to(kernel_device), q.scales.to(kernel_device)
    assert same_bits(pot_dequantize_triton(q).cpu(), want)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape", SHAPES)
def test_int_kernel_equals_reference(kernel_device, bits, shape):
    n, k, g = shape
    torch.manual_seed(n * k + bits + 7)
    w = torch.randn(n, k) * torch.logspace(-3, 1, n).unsqueeze(1)
    q = int_quantize_rtn(w, bits, g)
    want = int_dequantize(q)
    for name in ("packed", "scales", "zeros"):
        setattr(q, name, getattr(q, name).to(kernel_device))
    assert same_bits(int_dequantize_triton(q).cpu(), want)


def test_kernel_block_shapes_do_not_change_results(kernel_device):
    torch.manual_seed(1)
    w = torch.randn(20, 200)
    q = pot_quantize(w, grid_search_scales(w, 3, 64), 3, 64)
    want = pot_dequantize(q)
    q.packed, q.scales = q.packed.to(kernel_device), q.scales.to(kernel_device)
    for bn, bk in [(1, 16), (8, 64), (32, 256)]:
        assert same_bits(pot_dequantize_triton(q, block_n=bn, block_k=bk).cpu(), want)


def test_cpu_tensor_without_interpreter_is_a_clear_error(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU message")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = pot_quantize(torch.randn(2, 8), torch.ones(2, 1), 3, 8)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        pot_dequantize_triton(q)
