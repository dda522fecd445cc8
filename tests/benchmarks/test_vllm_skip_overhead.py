"""vllm_skip_overhead's pure parts: alternating order, within-repeat ratios, spread and table."""

import pytest

from benchmarks import vllm_skip_overhead as ov


def test_pair_order_alternates():
    assert [ov.pair_order(r) for r in range(3)] == [("skip-aware", "stock"), ("stock", "skip-aware"), ("skip-aware", "stock")]


def test_spread():
    s = ov.spread([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (s["median"], s["min"], s["max"], s["q1"], s["q3"], s["n"]) == (3.0, 1.0, 5.0, 2.0, 4.0, 5)
    assert ov.spread([0.9])["q1"] == 0.9


def test_ratios_are_taken_within_each_repeat():
    # the machine gets twice as slow in repeat 1: the within-repeat ratio does not see it
    m = [{"repeat": 0, "batch_size": 8, "engine": "skip-aware", "tokens_per_s": 900.0},
         {"repeat": 0, "batch_size": 8, "engine": "stock", "tokens_per_s": 1000.0},
         {"repeat": 1, "batch_size": 8, "engine": "stock", "tokens_per_s": 500.0},
         {"repeat": 1, "batch_size": 8, "engine": "skip-aware", "tokens_per_s": 450.0},
         {"repeat": 2, "batch_size": 8, "engine": "skip-aware", "tokens_per_s": 1000.0},  # its pair is missing
         {"repeat": 0, "batch_size": 32, "engine": "skip-aware", "tokens_per_s": 2000.0},
         {"repeat": 0, "batch_size": 32, "engine": "stock", "tokens_per_s": 2000.0}]
    rows = ov.summarise(m)
    assert [r["batch_size"] for r in rows] == [8, 32]
    assert rows[0]["ratios"] == [pytest.approx(0.9), pytest.approx(0.9)]
    assert rows[0]["stock_tokens_per_s"]["median"] == 750.0
    md = ov.table(rows).splitlines()
    assert md[2] == "| 8 | 2 | 675 | 750 | 0.900 | 0.900–0.900 | 0.900–0.900 |"
    with pytest.raises(ValueError, match="no repeat"):
        ov.summarise([m[4]])
