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
from reft_kernels.pot.quantize import bits_per_weight
from reft_kernels.pot.reference import (
    int_dequantize,
    int_quantize_rtn,
    pot_dequantize,
    pot_exponents,
    pot_quantize,
    round_exponent,
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


def test_rounding_rules_pick_the_documented_levels():
    r = torch.tensor([0.0, 0.3, 1.0, 1.40, 1.45, 1.5, 2.9, 3.0, 5.9, 6.0, 11.0, 12.0, 100.0])
    s = torch.ones_like(r)
    # log2: thresholds at sqrt(2) * 2**E (1.414, 2.83, 5.66); linear: at 1.5 * 2**E (1.5, 3, 6)
    assert pot_exponents(r, s, 3, "log2").tolist() == [0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 3, 3]
    assert pot_exponents(r, s, 3, "linear").tolist() == [0, 0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 3]
    assert pot_exponents(r, s, 4, "linear").tolist() == [0, 0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 7]
    assert round_exponent(torch.tensor([0.74, 0.75, 3.0 * 2.0 ** -20]), "linear").tolist() == [-1, 0, -18]
    with pytest.raises(ValueError, match="rounding must be one of .* got 'floor'"):
        pot_exponents(r, s, 3, "floor")


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_linear_rounding_is_the_nearest_level_and_on_grid_weights_keep_their_codes(bits):
    torch.manual_seed(bits)
    w = torch.randn(8, 96) * 0.05
    s = grid_search_scales(w, bits, 32)
    levels = s.float().repeat_interleave(32, 1)[..., None] * 2.0 ** torch.arange(max_exponent(bits) + 1)
    nearest = (w.abs()[..., None] - levels).abs().amin(-1)
    lin = pot_dequantize(pot_quantize(w, s, bits, 32, "linear")).float()
    log = pot_dequantize(pot_quantize(w, s, bits, 32, "log2")).float()
    torch.testing.assert_close((lin - w).abs(), nearest, rtol=0, atol=1e-7)
    assert ((lin - w) ** 2).sum() < ((log - w) ** 2).sum()
    for rounding in ("log2", "linear"):  # a weight already on the grid is stored as it is
        q = pot_quantize(w, s, bits, 32, rounding)
        again = pot_quantize(pot_dequantize(q).float(), s, bits, 32, "linear" if rounding == "log2" else "log2")
        assert torch.equal(again.packed, q.packed)


@pytest.mark.parametrize("bits", [2, 3])
def test_grid_search_with_linear_rounding_matches_brute_force_and_beats_log2(bits):
    torch.manual_seed(10 + bits)
    w = torch.randn(5, 64) * 0.02
    s = grid_search_scales(w, bits, 64, rounding="linear")
    s0 = w.abs().amax(-1) / 2 ** max_exponent(bits)
    for row in range(5):
        errs = [((pot_dequantize(pot_quantize(w[row:row + 1], clamp_pot_scales(s0[row] * i * 0.01, bits)
                                              .reshape(1, 1), bits, 64, "linear")).float() - w[row]) ** 2).sum()
                for i in range(1, 201)]
        got = ((pot_dequantize(pot_quantize(w[row:row + 1], s[row:row + 1], bits, 64, "linear")).float()
                - w[row]) ** 2).sum()
        assert got.item() == pytest.approx(min(errs).item(), rel=1e-6)
    sse = {r: ((quantize_pot_init(w, bits, 64, rounding=r).dequantize().float() - w) ** 2).sum() for r in ("log2", "linear")}
    assert sse["linear"] <= sse["log2"]


def test_bits_per_weight_counts_scales_zero_points_and_word_padding():
    shapes = [(128, 128), (512, 128)]  # in, out
    pot = bits_per_weight(shapes, 3, 128, zero_points=False)
    intq = bits_per_weight(shapes, 3, 128, zero_points=True)
    assert pot["nominal"] == 3.125 and intq["nominal"] == 3.1875
    # 128 codes -> 13 words, 512 -> 52 words (10 codes per word): 3.25 bits per code in both
    assert pot["stored"] == pytest.approx((128 * (13 * 32 + 16) + 128 * (52 * 32 + 4 * 16)) / (640 * 128))
    assert intq["stored"] - pot["stored"] == pytest.approx(8 / 128)
    assert bits_per_weight([(64, 2)], 4, 32, False) == {"nominal": 4.5, "stored": 4.5}
