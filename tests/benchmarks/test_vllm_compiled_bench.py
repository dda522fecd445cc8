"""benchmarks/vllm_compiled.py's pure parts: skip sets, rotation, within-repeat ratios, table."""

import random

import pytest

from benchmarks import vllm_compiled as vc


def test_skip_sets_keep_the_first_and_last_layer():
    rng = random.Random(0)
    for k in (1, 3, 6):
        skip = vc.skip_set(12, k, rng)
        assert len(set(skip)) == k and 0 not in skip and 11 not in skip and list(skip) == sorted(skip)
    assert vc.skip_set(12, 0, rng) == ()


def test_rotation_puts_each_engine_first_in_turn():
    names = ["compiled", "eager", "stock"]
    assert [vc.rotation(r, names)[0] for r in range(4)] == ["compiled", "eager", "stock", "compiled"]
    assert sorted(vc.rotation(1, names)) == sorted(names)


def test_ratios_are_taken_within_each_repeat():
    # repeat 1 runs on a machine twice as slow: the within-repeat ratios do not see it
    m = []
    for repeat, scale in ((0, 1.0), (1, 0.5), (2, 1.0)):
        m += [{"repeat": repeat, "batch_size": 8, "k": 0, "engine": "compiled", "tokens_per_s": 1200.0 * scale},
              {"repeat": repeat, "batch_size": 8, "k": 0, "engine": "eager", "tokens_per_s": 1000.0 * scale},
              {"repeat": repeat, "batch_size": 8, "k": 0, "engine": "stock", "tokens_per_s": 1250.0 * scale},
              {"repeat": repeat, "batch_size": 8, "k": 3, "engine": "compiled", "tokens_per_s": 1800.0 * scale},
              {"repeat": repeat, "batch_size": 8, "k": 3, "engine": "eager", "tokens_per_s": 1200.0 * scale}]
    rows = vc.summarise(m)
    assert [(r["batch_size"], r["k"]) for r in rows] == [(8, 0), (8, 3)]
    assert rows[0]["compiled_over_eager"] == pytest.approx(1.2) and rows[0]["compiled_over_stock"] == pytest.approx(0.96)
    assert rows[1]["compiled_over_eager"] == pytest.approx(1.5) and "compiled_over_stock" not in rows[1]
    assert rows[0]["compiled_tokens_per_s"] == 1200.0  # the median over repeats, not the mean
    md = vc.table(rows, [{"k": 3, "moved_layers": 2.0, "new_skip_seconds": 0.01, "sync_tensors": 80,
                          "sync_seconds": 0.02, "generate_seconds": 1.5, "batch_size": 8, "new_tokens": 64}], 12)
    assert "| 8 | 0/12 | 1200 | 1000 | 1.20 | 1250 | 0.960 |" in md
    assert "| 8 | 3/12 | 1800 | 1200 | 1.50 |  |  |" in md
    assert "| 3/12 | 2.0 | 0.0100 | 80 | 0.0200 | 1.500 (8, 64) |" in md
