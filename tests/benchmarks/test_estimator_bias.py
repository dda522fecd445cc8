"""The exact bias/variance benchmark on a small setting: the JSON it writes and what it must show."""

import json

import pytest

from benchmarks import estimator_bias as eb


def test_small_run_writes_the_json(tmp_path, capsys):
    out = tmp_path / "bias.json"
    eb.main(["--vocab", "3", "--length", "2", "--sweep", "1", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["setting"]["completions"] == 9
    assert [m["name"] for m in result["mismatches"]] == ["mild", "strong"]
    assert [m["skip"] for m in result["mismatches"]] == [[2], [2, 3, 4]]
    for m in result["mismatches"]:
        assert m["kl_behavior_per_sequence"] > 0 and m["on_policy_variance"] > 0
        rows = {r["label"]: r for r in m["methods"]}
        assert list(rows) == [eb.label(name, kw) for name, kw in eb.METHOD_GRID]
        assert rows["seq_is C=∞"]["clip"] == "inf"
        assert rows["seq_is C=∞"]["bias"] < 1e-6  # the only unbiased one
        for biased in ("none", "tis C=2", "tis C=∞", "retrace λ=1", "retrace λ=0.9", "seq_tis C=2", "seq_mask C=2"):
            assert rows[biased]["bias"] > 5e-3, biased
        for r in rows.values():
            assert r["variance"] > 0 and 0 < r["ess"] <= 1 + 1e-9
        assert rows["none"]["ess"] == pytest.approx(1.0)
    # at T = 1 the per-token ratio is the sequence ratio: untruncated tis is unbiased there, not at T = 2
    (t1, t2) = result["sweep"]
    assert (t1["length"], t2["length"]) == (1, 2) and t2["mismatches"] == result["mismatches"]
    for m1, m2 in zip(t1["mismatches"], t2["mismatches"]):
        tis1 = next(r for r in m1["methods"] if r["label"] == "tis C=∞")
        tis2 = next(r for r in m2["methods"] if r["label"] == "tis C=∞")
        assert tis1["bias"] < 1e-6 < 5e-3 < tis2["bias"]
    printed = capsys.readouterr().out
    assert "| strong (skip [2, 3, 4]) |" in printed and "seq_is C=∞: ESS" in printed


def test_bad_settings_name_the_value(tmp_path):
    with pytest.raises(ValueError, match=r"\[7\]"):
        eb.main(["--strong", "2", "7", "--out", str(tmp_path / "x.json")])
    with pytest.raises(ValueError, match="got 1 and"):
        eb.main(["--vocab", "1", "--out", str(tmp_path / "x.json")])
