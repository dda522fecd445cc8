"""Off-policy correction weights and diagnostics, checked on hand-computed numbers (SPEC §1)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nested_reft.corrections import (
    LOG_WEIGHT_MAX,
    METHODS,
    correction_weights,
    diagnostics,
    effective_sample_size,
)

E = math.e
# d = target - behavior = [1, 0, -1, (masked)] and [ln 3, ln 3, (masked), (masked)]
TARGET = torch.tensor([[0.0, -1.0, -2.0, 0.5], [math.log(3) - 2, math.log(3) - 2, 9.0, 9.0]])
BEHAVIOR = torch.tensor([[-1.0, -1.0, -1.0, -1.0], [-2.0, -2.0, -50.0, -50.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])


def w(method, **kw):
    return correction_weights(TARGET, BEHAVIOR, MASK, method, **kw)


def close(a, b):
    torch.testing.assert_close(a, torch.tensor(b, dtype=torch.float32), rtol=1e-6, atol=1e-6)


def test_none_is_the_mask():
    close(w("none"), [[1, 1, 1, 0], [1, 1, 0, 0]])


def test_tis_truncates_the_token_ratio_at_c():
    close(w("tis", clip=2.0), [[2.0, 1.0, 1 / E, 0], [2.0, 2.0, 0, 0]])
    close(w("tis", clip=5.0), [[E, 1.0, 1 / E, 0], [3.0, 3.0, 0, 0]])
    close(w("ess_adaptive", clip=2.0), w("tis", clip=2.0).tolist())


# Retrace example: d row 0 = [-ln 2, 1, -ln 4, -ln 2]; row 1 = [ln 3, -ln 2, (masked: -5), -ln 5]
R_TARGET = torch.tensor([[-math.log(2), 1.0, -math.log(4), -math.log(2)],
                         [math.log(3), -math.log(2), -5.0, -math.log(5)]]) - 1.0
R_BEHAVIOR = torch.full((2, 4), -1.0)
R_MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 1]])


def test_retrace_is_the_prefix_product_of_lambda_min_one_ratio():
    # c_s = λ min(1, ρ_s): row 0 [.5, 1, .25, .5], row 1 [1, .5, (masked: factor 1), .2].
    # A per-token c_t would give [.5, 1, .25, .5]; the reversed ratio μ/π would give [1, 1/e, 1/e, 1/e].
    out = correction_weights(R_TARGET, R_BEHAVIOR, R_MASK, "retrace", lam=1.0)
    close(out, [[0.5, 0.5, 0.125, 0.0625], [1.0, 0.5, 0.0, 0.1]])
    lam = 0.9  # λ enters once per unmasked token of the prefix
    out = correction_weights(R_TARGET, R_BEHAVIOR, R_MASK, "retrace", lam=lam)
    close(out, [[lam * 0.5, lam**2 * 0.5, lam**3 * 0.125, lam**4 * 0.0625],
                [lam, lam**2 * 0.5, 0.0, lam**3 * 0.1]])
    # on the shared example λ compounds along the prefix even where every ρ_s >= 1
    close(w("retrace", lam=0.5), [[0.5, 0.25, 0.125 / E, 0], [0.5, 0.25, 0, 0]])


def test_retrace_lambda_zero_is_zero_and_finite():
    out = correction_weights(R_TARGET, R_BEHAVIOR, R_MASK, "retrace", lam=0.0)
    assert torch.equal(out, torch.zeros(2, 4))


def test_sequence_methods_use_the_geometric_mean_ratio():
    # sequence 0: mean d = 0 -> ratio 1; sequence 1: mean d = ln 3 -> ratio 3
    close(w("seq_tis", clip=2.0), [[1, 1, 1, 0], [2, 2, 0, 0]])
    close(w("seq_tis", clip=4.0), [[1, 1, 1, 0], [3, 3, 0, 0]])
    close(w("seq_mask", clip=2.0), [[1, 1, 1, 0], [0, 0, 0, 0]])
    close(w("seq_mask", clip=3.5), [[1, 1, 1, 0], [1, 1, 0, 0]])


def test_seq_is_uses_the_product_ratio():
    # sequence 0: Σd = 0 -> ratio 1; sequence 1: Σd = 2 ln 3 -> ratio 9 (the geometric mean would be 3,
    # the reversed ratio 1/9)
    close(w("seq_is", clip=10.0), [[1, 1, 1, 0], [9, 9, 0, 0]])
    close(w("seq_is", clip=4.0), [[1, 1, 1, 0], [4, 4, 0, 0]])
    close(w("seq_is", clip=math.inf), [[1, 1, 1, 0], [9, 9, 0, 0]])
    t = torch.tensor([[3.0, 2.0, -0.5], [1.0, 0.0, 9.0]])
    out = correction_weights(t, torch.zeros_like(t), torch.tensor([[1, 1, 1], [1, 1, 0]]), "seq_is", clip=math.inf)
    close(out, [[math.exp(4.5)] * 3, [E, E, 0.0]])


def test_seq_is_at_infinite_clip_caps_the_log_weight():
    t = torch.tensor([[30.0, 30.0, 25.0]])  # ratio e^85 > e^80 = the cap
    out = correction_weights(t, torch.zeros_like(t), torch.ones_like(t), "seq_is", clip=math.inf)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.full((1, 3), math.exp(LOG_WEIGHT_MAX)), rtol=1e-6, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_huge_log_ratios_give_finite_weights(method):
    t = torch.tensor([[1e4, -1e4, 0.0, float("-inf")]])
    b = torch.zeros_like(t)
    m = torch.ones_like(t)
    out = correction_weights(t, b, m, method, clip=2.0)
    assert torch.isfinite(out).all() and (out >= 0).all()
    if method in ("tis", "ess_adaptive"):
        close(out, [[2.0, 0.0, 1.0, 0.0]])
    # garbage at masked positions never leaks
    t2 = torch.tensor([[0.0, float("nan")]])
    out2 = correction_weights(t2, torch.zeros_like(t2), torch.tensor([[1, 0]]), method)
    assert torch.isfinite(out2).all() and out2[0, 1] == 0


def test_opposite_infinities_in_one_sequence_give_zero_not_nan():
    # π_old gives the first token probability 0 and μ the second: the sequence has π_old(y) = 0
    t = torch.tensor([[-math.inf, 0.0, 0.0], [0.0, 1.0, 0.0]])
    b = torch.tensor([[0.0, -math.inf, 0.0], [0.0, 0.0, 0.0]])
    m = torch.ones(2, 3)
    close(correction_weights(t, b, m, "seq_tis", clip=2.0), [[0, 0, 0], [math.exp(1 / 3)] * 3])
    close(correction_weights(t, b, m, "seq_is", clip=math.inf), [[0, 0, 0], [E] * 3])
    close(correction_weights(t, b, m, "seq_mask", clip=2.0), [[0, 0, 0], [1, 1, 1]])


# log-probs from anywhere: ordinary values, huge ones, infinities and NaN
LOGP = st.one_of(st.floats(-50, 5, width=32), st.floats(width=32),
                 st.sampled_from([math.inf, -math.inf, math.nan, 1e30, -1e30, 0.0]))


@st.composite
def batches(draw):
    b, t = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    def grid(elements):
        return draw(st.lists(elements, min_size=b * t, max_size=b * t))
    return (torch.tensor(grid(LOGP)).view(b, t), torch.tensor(grid(LOGP)).view(b, t),
            torch.tensor(grid(st.booleans())).view(b, t))


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=150, deadline=None)
@given(batch=batches(), clip=st.sampled_from([1.0, 2.0, 10.0, math.inf]), lam=st.sampled_from([0.0, 0.9, 1.0]))
def test_weights_are_finite_nonnegative_and_masked_for_any_input(method, batch, clip, lam):
    target, behavior, mask = batch
    out = correction_weights(target, behavior, mask, method, clip=clip, lam=lam)
    assert out.shape == mask.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all() and (out >= 0).all()
    assert (out[~mask] == 0).all()
    assert (out <= min(clip, math.exp(LOG_WEIGHT_MAX)) * (1 + 1e-6)).all()
    if method.startswith("seq_"):  # one weight per sequence
        for row, valid in zip(out, mask):
            assert row[valid].unique().numel() <= 1
    if method == "retrace":  # a product of factors in [0, λ]: non-increasing along the sequence
        for row, valid in zip(out, mask):
            v = row[valid]
            assert (v[1:] <= v[:-1]).all() and (v <= lam).all()
    stats = diagnostics(target, behavior, mask, out, method, clip=clip)
    assert all(not math.isnan(x) for x in stats.values()), stats


@pytest.mark.parametrize("method", METHODS)
def test_on_policy_weights_are_exactly_one(method):
    lp = torch.randn(3, 5)
    m = torch.ones(3, 5)
    out = correction_weights(lp, lp.clone(), m, method)
    assert torch.equal(out, torch.ones(3, 5))


def test_weights_are_detached():
    t = TARGET.clone().requires_grad_(True)
    assert not correction_weights(t, BEHAVIOR, MASK, "tis").requires_grad


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="'ips'"):
        w("ips")
    with pytest.raises(ValueError, match="got 0.5"):
        w("tis", clip=0.5)
    with pytest.raises(ValueError, match="got 1.5"):
        w("retrace", lam=1.5)


def test_diagnostics_numbers():
    weights = w("tis", clip=2.0)
    d = diagnostics(TARGET, BEHAVIOR, MASK, weights, "tis", clip=2.0)
    ratios = [E, 1.0, 1 / E, 3.0, 3.0]
    assert d["ratio_mean"] == pytest.approx(sum(ratios) / 5, rel=1e-6)
    assert d["ratio_min"] == pytest.approx(1 / E, rel=1e-6)
    assert d["ratio_max"] == pytest.approx(3.0, rel=1e-6)
    assert d["clipped_frac"] == pytest.approx(3 / 5)  # e, 3, 3 exceed C = 2
    ws = [2.0, 1.0, 1 / E, 2.0, 2.0]
    assert d["ess"] == pytest.approx(sum(ws) ** 2 / (5 * sum(x * x for x in ws)), rel=1e-6)
    assert d["kl_behavior"] == pytest.approx(-(1 + 0 - 1 + 2 * math.log(3)) / 5, rel=1e-6)
    s = diagnostics(TARGET, BEHAVIOR, MASK, w("seq_mask", clip=2.0), "seq_mask", clip=2.0)
    assert s["clipped_frac"] == pytest.approx(0.5)  # one of two sequences masked
    r = diagnostics(TARGET, BEHAVIOR, MASK, w("retrace"), "retrace")
    assert r["clipped_frac"] == pytest.approx(3 / 5)
    q = diagnostics(TARGET, BEHAVIOR, MASK, w("seq_is", clip=4.0), "seq_is", clip=4.0)
    assert q["clipped_frac"] == pytest.approx(0.5)  # ratio 9 > 4: one of two sequences truncated
    assert diagnostics(TARGET, BEHAVIOR, MASK, w("seq_is", clip=math.inf), "seq_is", clip=math.inf)["clipped_frac"] == 0


def test_effective_sample_size():
    m = torch.ones(1, 4)
    assert effective_sample_size(torch.ones(1, 4), m) == pytest.approx(1.0)
    assert effective_sample_size(torch.tensor([[1.0, 0, 0, 0]]), m) == pytest.approx(0.25)
    assert effective_sample_size(torch.tensor([[2.0, 1.0, 0, 9.0]]), torch.tensor([[1, 1, 0, 0]])) == pytest.approx(9 / 10)
