"""Exact enumeration with a stale and skipped sampler (asynchronous rollouts): seq_is stays unbiased
when μ is the policy of one or two SGD steps ago with a layer skipped; ignoring the staleness part of
μ makes it biased; the log-ratio splits into its staleness and skipping parts."""

import json

import pytest

from benchmarks import staleness_bias as sb


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("stale") / "stale.json"
    r = sb.main(["--vocab", "4", "--length", "2", "--stale", "0", "1", "2", "--skip", "2", "--out", str(out)])
    assert json.loads(out.read_text())["settings"][1]["stale_steps"] == 1
    return r


def rows(setting):
    return {r["label"]: r for r in setting["methods"]}


def test_seq_is_is_unbiased_under_staleness_and_skipping(result):
    for setting in result["settings"]:
        assert rows(setting)["seq_is C=∞"]["bias"] < 1e-6, setting["stale_steps"]


def test_ignoring_the_staleness_of_mu_biases_seq_is(result):
    fresh, one, two = result["settings"]
    # with nothing stale the control divides by the right μ; one and two steps stale it does not
    assert fresh["control_seq_is_ignoring_staleness"]["bias"] < 1e-6
    assert one["control_seq_is_ignoring_staleness"]["bias"] > 1e-2
    assert two["control_seq_is_ignoring_staleness"]["bias"] > one["control_seq_is_ignoring_staleness"]["bias"]


def test_the_log_ratio_splits_into_staleness_and_skipping(result):
    fresh, one, two = result["settings"]
    assert fresh["kl_staleness"] == pytest.approx(0.0, abs=1e-12) and fresh["kl_skipping"] > 1e-3
    # the sampler is the same stale, skipped model in every setting: its skipping part does not change
    assert one["kl_skipping"] == pytest.approx(fresh["kl_skipping"]) == pytest.approx(two["kl_skipping"])
    assert 1e-3 < one["kl_staleness"] < two["kl_staleness"]
    # a mismatch the other methods pay for: the truncated and per-token ones are biased here
    for setting in (one, two):
        r = rows(setting)
        assert r["tis C=∞"]["bias"] > 5e-3 and r["none"]["bias"] > 5e-3
        assert r["seq_is C=∞"]["variance"] > setting["on_policy_variance"] > 0


def test_bad_settings_name_the_value():
    with pytest.raises(ValueError, match=r"\[9\]"):
        sb.main(["--skip", "9"])
    with pytest.raises(ValueError, match="--lr > 0"):
        sb.main(["--lr", "0"])
