"""phased_sampling: its statistics, and a seconds-long run that writes its report."""

import json
import math

import pytest

from benchmarks import phased_sampling


def test_mean_and_error_and_z_score_numbers():
    m, se = phased_sampling.mean_and_error([0.0, 1.0, 1.0, 0.0])
    assert m == 0.5 and se == pytest.approx(math.sqrt(1 / 3) / 2)  # stdev (n-1) over sqrt(n)
    assert phased_sampling.z_score((1.0, 0.3), (0.5, 0.4)) == pytest.approx(1.0)  # 0.5 / hypot(0.3, 0.4)
    assert phased_sampling.z_score((0.2, 0.1), (0.5, 0.0)) == pytest.approx(-3.0)  # sign: first minus second
    assert phased_sampling.z_score((0.5, 0.0), (0.5, 0.0)) == 0.0
    with pytest.raises(ValueError, match="at least 2"):
        phased_sampling.mean_and_error([1.0])


def test_bad_sizes_fail_before_any_model_loads():
    with pytest.raises(ValueError, match="--prompts must be >= 1, got 0"):
        phased_sampling.main(["--prompts", "0", "--model", "/nonexistent"])


def test_short_run_writes_json_and_markdown(small_model_dir, tmp_path):
    out = phased_sampling.main(["--model", str(small_model_dir), "--prompts", "2", "--samples_per_prompt", "4",
                                "--batch_size", "4", "--compact_every", "2", "--max_new_tokens", "6", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "phased_sampling.json").read_text())
    assert [r["samples"] for r in saved["results"].values()] == [8, 8]
    for r in saved["results"].values():
        assert 1 <= r["length"][0] <= 6 and 0.0 <= r["accuracy"][0] <= 1.0
    assert saved["z"] == out["z"] and all(math.isfinite(v) for v in saved["z"].values())
    md = (tmp_path / "phased_sampling.md").read_text()
    assert "phases of 2" in md and "one generate() call" in md
