"""Off-policy correction weights and diagnostics, checked on hand-computed numbers (SPEC §1)."""

import math

import pytest
import torch

from nested_reft.corrections import METHODS, correction_weights, diagnostics, effective_sample_size

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


def test_retrace_is_lambda_times_min_one_ratio():
    close(w("retrace", lam=1.0), [[1.0, 1.0, 1 / E, 0], [1.0, 1.0, 0, 0]])
    close(w("retrace", lam=0.5), [[0.5, 0.5, 0.5 / E, 0], [0.5, 0.5, 0, 0]])


def test_sequence_methods_use_the_geometric_mean_ratio():
    # sequence 0: mean d = 0 -> ratio 1; sequence 1: mean d = ln 3 -> ratio 3
    close(w("seq_tis", clip=2.0), [[1, 1, 1, 0], [2, 2, 0, 0]])
    close(w("seq_tis", clip=4.0), [[1, 1, 1, 0], [3, 3, 0, 0]])
    close(w("seq_mask", clip=2.0), [[1, 1, 1, 0], [0, 0, 0, 0]])
    close(w("seq_mask", clip=3.5), [[1, 1, 1, 0], [1, 1, 0, 0]])


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


def test_effective_sample_size():
    m = torch.ones(1, 4)
    assert effective_sample_size(torch.ones(1, 4), m) == pytest.approx(1.0)
    assert effective_sample_size(torch.tensor([[1.0, 0, 0, 0]]), m) == pytest.approx(0.25)
    assert effective_sample_size(torch.tensor([[2.0, 1.0, 0, 9.0]]), torch.tensor([[1, 1, 0, 0]])) == pytest.approx(9 / 10)
