"""Plain-torch reference of PoT and uniform-INT quantization and dequantization.

These are the definitions the Triton kernels are tested against, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .format import (
    check_bits,
    check_group_size,
    clamp_pot_scales,
    expand_groups,
    grouped,
    max_exponent,
    num_groups,
    pack_codes,
    unpack_codes,
)


@dataclass
class PoTWeight:
    """A PoT-quantized [out_features, in_features] weight: packed codes + one fp16 scale per group."""

    packed: torch.Tensor  # int32 [out, ceil(in / (32 // bits))]
    scales: torch.Tensor  # fp16 [out, ceil(in / group_size)]
    bits: int
    group_size: int
    in_features: int

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    def dequantize(self) -> torch.Tensor:
        return pot_dequantize(self)


@dataclass
class IntWeight:
    """A uniform-INT (asymmetric, round-to-nearest) weight: packed codes, fp16 scales, zero points."""

    packed: torch.Tensor  # int32 [out, ceil(in / (32 // bits))]
    scales: torch.Tensor  # fp16 [out, G]
    zeros: torch.Tensor  # uint8 [out, G], integer zero points in [0, 2**bits)
    bits: int
    group_size: int
    in_features: int

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    def dequantize(self) -> torch.Tensor:
        return int_dequantize(self)


# --------------------------------------------------------------------------- PoT


ROUNDINGS = ("log2", "linear")


def check_rounding(rounding: str) -> str:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    return rounding


def round_exponent(ratio: torch.Tensor, rounding: str = "log2") -> torch.Tensor:
    """Unclamped float exponent of |w| / s (ratio >= 0) under the encoder's rounding rule.

    "log2" (SPEC.md §10): round(log2(r)), i.e. level 2**E is chosen for r in
    [2**(E - 1/2), 2**(E + 1/2)), thresholds at sqrt(2) * 2**E.
    "linear" [ours]: the level nearest to r in value, thresholds at the midpoints 1.5 * 2**E:
    with r = m * 2**e exactly (frexp, m in [0.5, 1)), E = e if m >= 0.75 else e - 1.
    Only which code is chosen differs; the format and the dequantization are the same.
    r = 0 gives -inf ("log2") or -1 ("linear"); both clamp to E = 0.
    """
    if check_rounding(rounding) == "log2":
        return torch.round(torch.log2(ratio))
    m, e = torch.frexp(ratio)
    return (e - (m < 0.75).to(e.dtype)).to(ratio.dtype)


def pot_exponents(w: torch.Tensor, scales_per_col: torch.Tensor, bits: int,
                  rounding: str = "log2") -> torch.Tensor:
    """E = clamp(rounded log2(|w| / s), 0, E_max) (a zero weight gets E = 0); see `round_exponent`."""
    ratio = w.abs().float() / scales_per_col.float()
    return round_exponent(ratio, rounding).clamp(0, max_exponent(bits))


def pot_codes(w: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
              rounding: str = "log2") -> torch.Tensor:
    """[N, K] weight + [N, G] scales -> [N, K] codes `(sign << (bits-1)) | E`."""
    s = expand_groups(scales, w.shape[1], group_size)
    e = pot_exponents(w, s, bits, rounding).to(torch.int64)
    sign = (w < 0).to(torch.int64)
    return (sign << (bits - 1)) | e


def pot_fake_quant(w: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
                   rounding: str = "log2") -> torch.Tensor:
    """s * sign(w) * 2**E in fp32, scales used as given (the quantizer's error model)."""
    s = expand_groups(scales.float(), w.shape[1], group_size)
    e = pot_exponents(w, s, bits, rounding)
    sign = torch.where(w < 0, -1.0, 1.0)
    return s * sign * torch.exp2(e)


def pot_quantize(w: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int = 128,
                 rounding: str = "log2") -> PoTWeight:
    """Quantize a [out, in] weight with the given per-group scales (clamped into fp16's range).

    A weight already on the grid (w = s16 * ±2**E, E in range) gets exactly that code under
    either rounding, so a weight chosen by another encoder can be stored through this function."""
    check_bits(bits)
    check_group_size(group_size)
    expected = (w.shape[0], num_groups(w.shape[1], group_size))
    if tuple(scales.shape) != expected:
        raise ValueError(f"scales of shape {tuple(scales.shape)} do not match weight "
                         f"{tuple(w.shape)} with group_size {group_size} (expected {expected})")
    s16 = clamp_pot_scales(scales, bits)
    codes = pot_codes(w, s16, bits, group_size, rounding)
    return PoTWeight(pack_codes(codes, bits), s16, bits, group_size, w.shape[1])


def pot_dequantize(q: PoTWeight) -> torch.Tensor:
    """fp16 [out, in]: s * (-1)**sign * 2**E, computed in fp32 (exact) and rounded to fp16."""
    codes = unpack_codes(q.packed, q.bits, q.in_features)
    e = (codes & (2 ** (q.bits - 1) - 1)).float()
    sign = torch.where((codes >> (q.bits - 1)) == 1, -1.0, 1.0)
    s = expand_groups(q.scales.float(), q.in_features, q.group_size)
    return (s * sign * torch.exp2(e)).to(torch.float16)


# --------------------------------------------------------------------------- uniform INT


def int_quantize_rtn(w: torch.Tensor, bits: int, group_size: int = 128) -> IntWeight:
    """Asymmetric min-max round-to-nearest per group: w ~ s * (q - z), q in [0, 2**bits)."""
    check_bits(bits)
    check_group_size(group_size)
    qmax = 2 ** bits - 1
    wg, mask = grouped(w.float(), group_size)
    lo = torch.where(mask, wg, torch.inf).amin(-1).clamp(max=0.0)  # the range includes 0
    hi = torch.where(mask, wg, -torch.inf).amax(-1).clamp(min=0.0)
    scales = ((hi - lo) / qmax).clamp(min=2.0 ** -24).to(torch.float16)  # smallest fp16 > 0
    s = scales.float()
    zeros = torch.round(-lo / s).clamp(0, qmax)
    s_col = expand_groups(s, w.shape[1], group_size)
    z_col = expand_groups(zeros, w.shape[1], group_size)
    codes = (torch.round(w.float() / s_col) + z_col).clamp(0, qmax).to(torch.int64)
    return IntWeight(pack_codes(codes, bits), scales, zeros.to(torch.uint8), bits, group_size, w.shape[1])


def int_dequantize(q: IntWeight) -> torch.Tensor:
    """fp16 [out, in]: s * (q - z) (the product of two fp16 numbers is exact in fp32)."""
    codes = unpack_codes(q.packed, q.bits, q.in_features).float()
    s = expand_groups(q.scales.float(), q.in_features, q.group_size)
    z = expand_groups(q.zeros.float(), q.in_features, q.group_size)
    return (s * (codes - z)).to(torch.float16)
