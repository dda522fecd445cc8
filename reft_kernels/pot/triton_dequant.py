"""Triton dequantization kernels: PoT (integer adds on the fp16 bit pattern) and uniform INT.

PoT: the fp16 bits of `s * (-1)**sign * 2**E` are `bits(s) + (E << 10)`, with the sign bit
flipped by XOR when the weight is negative: no multiply, no pow, no float arithmetic at all. This
equals the reference exactly because stored scales are normal fp16 numbers with
`exponent(s) + E_max <= 30` (see `format.clamp_pot_scales`): the sum never carries into the
sign bit and never produces inf, and a normal scale doubles when its exponent field grows by one.
The kernel reads the scales and writes the output as int16 bit patterns (views of fp16 tensors).

INT (the baseline, same bit-width, same packing): `s * (q - z)` with one fp16 multiply.

The kernels are jitted on first use, in the mode `TRITON_INTERPRET` asks for at that moment,
so the interpreter can run them on CPU tensors (tests) and the compiler on CUDA tensors.
"""

from __future__ import annotations

import torch

from .format import codes_per_word, num_groups
from .reference import IntWeight, PoTWeight

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is in the dev extra and on GPU machines
    triton = None
    tl = None

constexpr = tl.constexpr if tl is not None else int  # kernel annotations; plain int without triton

DEFAULT_BLOCK_N = 16
DEFAULT_BLOCK_K = 128


def _pot_dequant_kernel(words_ptr, scale_bits_ptr, out_ptr, N, K, n_words, n_groups,
                        BITS: constexpr, CPW: constexpr, GROUP: constexpr,
                        BLOCK_N: constexpr, BLOCK_K: constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    r = rows[:, None].to(tl.int64)
    word = tl.load(words_ptr + r * n_words + cols[None, :] // CPW, mask=mask, other=0)
    code = (word >> ((cols[None, :] % CPW) * BITS)) & ((1 << BITS) - 1)
    s_bits = tl.load(scale_bits_ptr + r * n_groups + cols[None, :] // GROUP, mask=mask, other=0)
    e = code & ((1 << (BITS - 1)) - 1)
    sign = code >> (BITS - 1)
    out = (s_bits.to(tl.int32) + (e << 10)) ^ (sign << 15)  # 16 meaningful bits
    tl.store(out_ptr + r * K + cols[None, :], out.to(tl.int16), mask=mask)


def _int_dequant_kernel(words_ptr, scales_ptr, zeros_ptr, out_ptr, N, K, n_words, n_groups,
                        BITS: constexpr, CPW: constexpr, GROUP: constexpr,
                        BLOCK_N: constexpr, BLOCK_K: constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    r = rows[:, None].to(tl.int64)
    word = tl.load(words_ptr + r * n_words + cols[None, :] // CPW, mask=mask, other=0)
    code = (word >> ((cols[None, :] % CPW) * BITS)) & ((1 << BITS) - 1)
    g = r * n_groups + cols[None, :] // GROUP
    s = tl.load(scales_ptr + g, mask=mask, other=0.0)
    z = tl.load(zeros_ptr + g, mask=mask, other=0).to(tl.int32)
    out = (code - z).to(tl.float16) * s
    tl.store(out_ptr + r * K + cols[None, :], out, mask=mask)


_JITTED: dict[tuple[str, bool], object] = {}


def interpreting() -> bool:
    return triton is not None and bool(triton.knobs.runtime.interpret)


def _kernel(fn):
    if triton is None:
        raise RuntimeError("the Triton dequantization kernels need the `triton` package "
                           "(pip install triton, or the project's dev extra)")
    key = (fn.__name__, interpreting())
    if key not in _JITTED:
        _JITTED[key] = triton.jit(fn)
    return _JITTED[key]


def _check_device(t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"Triton kernels run on CUDA tensors, got a tensor on {t.device}; "
                           "set TRITON_INTERPRET=1 before the first kernel call to run them on CPU "
                           "with Triton's interpreter, or use the torch reference")


def _check_packed(q, n_words_expected: int) -> None:
    if q.packed.dtype != torch.int32 or q.packed.shape[1] != n_words_expected:
        raise ValueError(f"packed codes must be int32 [N, {n_words_expected}], got "
                         f"{q.packed.dtype} {tuple(q.packed.shape)}")


def _launch_args(q, block_n: int, block_k: int):
    n, k = q.out_features, q.in_features
    cpw = codes_per_word(q.bits)
    n_words = -(-k // cpw)
    n_groups = num_groups(k, q.group_size)
    _check_packed(q, n_words)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    meta = dict(BITS=q.bits, CPW=cpw, GROUP=q.group_size, BLOCK_N=block_n, BLOCK_K=block_k)
    return n, k, n_words, n_groups, grid, meta


def pot_dequantize_triton(q: PoTWeight, out: torch.Tensor | None = None,
                          block_n: int = DEFAULT_BLOCK_N, block_k: int = DEFAULT_BLOCK_K) -> torch.Tensor:
    """fp16 [out, in] from a PoTWeight, equal bit for bit to `reference.pot_dequantize`."""
    kernel = _kernel(_pot_dequant_kernel)
    _check_device(q.packed)
    n, k, n_words, n_groups, grid, meta = _launch_args(q, block_n, block_k)
    if q.scales.dtype != torch.float16:
        raise ValueError(f"PoT scales must be fp16, got {q.scales.dtype}")
    if out is None:
        out = torch.empty((n, k), dtype=torch.float16, device=q.packed.device)
    kernel[grid](q.packed.contiguous(), q.scales.contiguous().view(torch.int16),
                 out.view(torch.int16), n, k, n_words, n_groups, **meta)
    return out


def int_dequantize_triton(q: IntWeight, out: torch.Tensor | None = None,
                          block_n: int = DEFAULT_BLOCK_N, block_k: int = DEFAULT_BLOCK_K) -> torch.Tensor:
    """fp16 [out, in] from an IntWeight, equal bit for bit to `reference.int_dequantize`."""
    kernel = _kernel(_int_dequant_kernel)
    _check_device(q.packed)
    n, k, n_words, n_groups, grid, meta = _launch_args(q, block_n, block_k)
    if q.scales.dtype != torch.float16:
        raise ValueError(f"INT scales must be fp16, got {q.scales.dtype}")
    if out is None:
        out = torch.empty((n, k), dtype=torch.float16, device=q.packed.device)
    kernel[grid](q.packed.contiguous(), q.scales.contiguous(), q.zeros.contiguous(), out,
                 n, k, n_words, n_groups, **meta)
    return out
