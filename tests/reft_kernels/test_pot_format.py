"""PoT / INT formats: packing round trips, code definitions, fp16 scale limits, grid search."""

import math

import pytest
import torch

from reft_kernels.pot.format import (
    clamp_pot_scales,
    codes_per_word,
    max_exponent,
    pack_codes,
    pot_scale_bounds,
    unpack_codes,
)
from reft_kernels.pot.reference import (
    int_dequantize,
    int_quantize_rtn,
    pot_dequantize,
    pot_quantize,
)
from reft_kernels.pot.search import grid_search_scales, quantize_pot_init


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("k", [1, 10, 31, 128, 301])
def test_pack_unpack_round_trip(bits, k):
    g = torch.Generator().manual_seed(bits * 1000 + k)
    codes = torch.randint(0, 2 ** bits, (7, k), generator=g)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (7, math.ceil(k / codes_per_word(bits)))
    assert torch.equal(unpack_codes(packed, bits, k), codes)


def test_pack_layout_first_code_in_lowest_bits():
    codes = torch.tensor([[1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 7]])  # 3 bits: 10 codes per word
    words = pack_codes(codes, 3)
    assert words.tolist() == [[1 | (2 << 3) | (3 << 6), 7]]
    top = pack_codes(torch.full((1, 16), 3), 2)  # all 32 bits set -> -1 as int32
    assert top.tolist() == [[-1]]


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 8\)"):
        pack_codes(torch.tensor([[8]]), 3)


def test_bad_bits_and_shapes_are_named():
    with pytest.raises(ValueError, match="bits must be one of .* got 5"):
        max_exponent(5)
    with pytest.raises(ValueError, match=r"scales of shape \(4, 1\) .* \(expected \(4, 2\)\)"):
        pot_quantize(torch.randn(4, 130), torch.ones(4, 1), 3, 128)
    with pytest.raises(ValueError, match="group_size must be a positive integer, got 0"):
        int_quantize_rtn(torch.randn(4, 8), 3, 0)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pot_dequantize_is_sign_scale_power_of_two(bits):
    s = torch.tensor([[0.5, 0.03125]])  # two groups of 4
    w = torch.tensor([[0.5, -1.0, 0.74, -300.0, 0.0, -0.03125, 0.0625, 1e-9]])
    q = pot_quantize(w, s, bits, group_size=4)
    e_max = max_exponent(bits)
    want = [0.5, -1.0, 0.5 * 2 ** min(round(math.log2(0.74 / 0.5)), e_max), -0.5 * 2 ** e_max,
            0.03125, -0.03125, 0.0625, 0.03125]
    assert pot_dequantize(q).float()[0].tolist() == want


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pot_scale_bounds_keep_the_bit_trick_exact(bits):
    lo, hi = pot_scale_bounds(bits)
    # hi: exponent field + E_max == 30 (the largest finite); lo: smallest normal fp16
    hi_bits = torch.tensor([hi], dtype=torch.float16).view(torch.int16).item()
    assert (hi_bits >> 10) + max_exponent(bits) == 30 and hi_bits & 0x3FF == 0x3FF
    assert lo == 2.0 ** -14
    s = clamp_pot_scales(torch.tensor([0.0, 1e-9, 1e9, float(hi) * 1.0001]), bits)
    assert s.tolist() == [lo, lo, hi, hi]
    w = torch.tensor([[-hi * 2 ** max_exponent(bits), lo]])
    deq = pot_dequantize(pot_quantize(w, torch.tensor([[hi]]), bits, 2)).float()
    assert torch.isfinite(deq).all() and deq[0, 0].item() == -hi * 2 ** max_exponent(bits)


def test_int_rtn_matches_textbook_formula():
    w = torch.tensor([[-1.0, -0.5, 0.0, 0.25, 2.0, 1.0]])
    q = int_quantize_rtn(w, 2, group_size=6)  # levels s*(q-z), q in 0..3
    s = torch.tensor(3.0 / 3, dtype=torch.float16).item()
    z = round(1.0 / s)
    want = [s * (min(max(round(x / s) + z, 0), 3) - z) for x in w[0].tolist()]
    assert q.zeros.tolist() == [[z]] and int_dequantize(q).float()[0].tolist() == want


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_grid_search_beats_plain_max_scale_and_brute_force_agrees(bits):
    torch.manual_seed(bits)
    w = torch.randn(6, 200) * 0.02
    s = grid_search_scales(w, bits, 64)
    assert s.shape == (6, 4) and s.dtype == torch.float16
    err = (pot_dequantize(pot_quantize(w, s, bits, 64)).float() - w) ** 2
    # brute force over the same grid for one (partial) group
    cols = w[2, 192:]
    s0 = cols.abs().max() / 2 ** max_exponent(bits)
    errs = []
    for i in range(1, 201):
        si = clamp_pot_scales(s0 * i * 0.01, bits)
        qi = pot_dequantize(pot_quantize(cols[None], si.reshape(1, 1), bits, 64)).float()
        errs.append(((qi - cols) ** 2).sum().item())
    assert err[2, 192:].sum().item() == pytest.approx(min(errs), rel=1e-6)
    plain = pot_quantize(w, (w.reshape(6, -1).abs().amax(-1, keepdim=True) / 2 ** max_exponent(bits)).expand(6, 4), bits, 64)
    assert err.sum() < ((pot_dequantize(plain).float() - w) ** 2).sum()


def test_pot3_init_beats_int3_rtn_on_gaussian_weights():
    torch.manual_seed(0)
    w = torch.randn(128, 512) * 0.05
    pot = (quantize_pot_init(w, 3, 128).dequantize().float() - w).pow(2).mean()
    int3 = (int_quantize_rtn(w, 3, 128).dequantize().float() - w).pow(2).mean()
    assert pot < int3
