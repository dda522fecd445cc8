"""The power-of-two (PoT) weight format and the uniform-INT baseline format: codes, packing, groups.

PoT with `bits` = n: 1 sign bit + (n - 1) exponent bits, no zero level (SPEC.md §10):

    w~ = s * sign * 2**E,   E in [0, 2**(n-1) - 1],   s > 0 one fp16 scale per group

A code is `(sign << (n - 1)) | E` with sign = 1 for negative weights. Groups are `group_size`
consecutive input columns of a row (a [out, in] weight); the last group of a row may be partial
when `in_features % group_size != 0` (it just has fewer columns; nothing is padded in storage).

Codes are packed along the input dimension into int32 words, `32 // bits` codes per word, the
first code in the lowest bits: 16 per word at 2 bits, 10 at 3 bits (bits 30-31 unused), 8 at 4
bits. A row of K codes takes ceil(K / (32 // bits)) words; rows start on a word boundary.

fp16 limits of the multiply-free dequantization (adding E to the scale's exponent field): the
scale must be a *normal* fp16 number (a subnormal has no implicit leading 1, so adding to its
exponent field does not double it), and s * 2**E_max must stay finite. `clamp_pot_scales`
enforces both, so the bit trick equals `s * 2**E` exactly for every stored scale.
"""

from __future__ import annotations

import math

import torch

SUPPORTED_BITS = (2, 3, 4)
FP16_MIN_NORMAL = 2.0 ** -14
FP16_MAX = 65504.0


def check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return bits


def check_group_size(group_size: int) -> int:
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    return group_size


def max_exponent(bits: int) -> int:
    """Largest PoT exponent E_max = 2**(bits-1) - 1: 1, 3, 7 for 2, 3, 4 bits."""
    return 2 ** (check_bits(bits) - 1) - 1


def codes_per_word(bits: int) -> int:
    return 32 // check_bits(bits)


def num_groups(in_features: int, group_size: int) -> int:
    return math.ceil(in_features / check_group_size(group_size))


def pot_scale_bounds(bits: int) -> tuple[float, float]:
    """[lo, hi] of a PoT scale: normal fp16, and s * 2**E_max no larger than the fp16 maximum.

    hi is the largest fp16 whose exponent field plus E_max is still 30 (31 is inf/NaN)."""
    e_max = max_exponent(bits)
    hi = (2.0 - 2.0 ** -10) * 2.0 ** (15 - e_max)
    return FP16_MIN_NORMAL, hi


def clamp_pot_scales(scales: torch.Tensor, bits: int) -> torch.Tensor:
    """Round scales to fp16 inside `pot_scale_bounds` (a group of all zeros gets the smallest)."""
    lo, hi = pot_scale_bounds(bits)
    return scales.float().clamp(lo, hi).to(torch.float16)  # lo, hi are fp16 numbers: stays inside


def grouped(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> ([N, G, group_size] zero-padded, [1, G, group_size] bool mask of real columns)."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    n, k = w.shape
    g = num_groups(k, group_size)
    pad = g * group_size - k
    wp = torch.nn.functional.pad(w, (0, pad)) if pad else w
    mask = torch.arange(g * group_size, device=w.device) < k
    return wp.reshape(n, g, group_size), mask.reshape(1, g, group_size)


def expand_groups(per_group: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """[N, G] per-group values -> [N, K] per-column values."""
    return per_group.repeat_interleave(group_size, dim=1)[:, :in_features]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[N, K] integer codes in [0, 2**bits) -> [N, ceil(K / (32 // bits))] int32 words."""
    cpw = codes_per_word(bits)
    if codes.dim() != 2:
        raise ValueError(f"expected 2-D codes [out, in], got shape {tuple(codes.shape)}")
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 2 ** bits):
        raise ValueError(f"codes must lie in [0, {2 ** bits}) for {bits} bits, got "
                         f"[{int(c.min())}, {int(c.max())}]")
    n, k = c.shape
    n_words = math.ceil(k / cpw)
    c = torch.nn.functional.pad(c, (0, n_words * cpw - k)).reshape(n, n_words, cpw)
    shifts = torch.arange(cpw, device=c.device, dtype=torch.int64) * bits
    words = (c << shifts).sum(-1)  # < 2**32, exact in int64
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)  # same 32 bits as int32
    return words.to(torch.int32)


def unpack_codes(words: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of `pack_codes`: [N, n_words] int32 -> [N, in_features] int64 codes."""
    cpw = codes_per_word(bits)
    n_words = math.ceil(in_features / cpw)
    if words.dim() != 2 or words.shape[1] != n_words:
        raise ValueError(f"packed words of shape {tuple(words.shape)} do not hold {in_features} "
                         f"codes of {bits} bits per row (expected [N, {n_words}])")
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(cpw, device=w.device, dtype=torch.int64) * bits
    codes = (w.unsqueeze(-1) >> shifts) & (2 ** bits - 1)
    return codes.reshape(words.shape[0], n_words * cpw)[:, :in_features]
