"""step_time's pure parts: config names, run order, timing summary and table (runs are not started)."""

import pytest

from benchmarks import step_time


def test_parse_config_name():
    assert step_time.parse_config_name("skip0") == (0.0, "sampler", None)
    assert step_time.parse_config_name("skip0.125:rescore") == (0.125, "rescore", None)
    assert step_time.parse_config_name("skip0.25:compact0") == (0.25, "sampler", 0)
    assert step_time.parse_config_name("skip0.125:rescore:compact16") == (0.125, "rescore", 16)
    assert step_time.parse_config_name("skip0.25:fixed") == (0.25, "sampler", None)
    assert step_time.fixed_length("skip0.25:fixed") and not step_time.fixed_length("skip0.25")
    for bad in ("skip1", "0.25", "skipx", "skip0.25:twice", "skip0:compactx"):
        with pytest.raises(ValueError, match="expected skip"):
            step_time.parse_config_name(bad)


def test_run_order_alternates_passes():
    assert step_time.run_order(["a", "b", "c"], 3) == [(0, "a"), (0, "b"), (0, "c"), (1, "c"), (1, "b"), (1, "a"),
                                                        (2, "a"), (2, "b"), (2, "c")]


def fake_run(round_log=None):
    """2 rounds of 2 steps: the round's first step costs 3 s, the other 1 s; round 0 is warm-up."""
    ends = [3.0, 4.0, 7.0, 8.0]
    logs = [{"step": 1, "rollout/generate_seconds": 9.0, "rollout/behavior_tokens_per_s": 100.0},
            {"step": 2, "loss": 0.1},
            {"step": 3, "rollout/generate_seconds": 2.0, "rollout/behavior_tokens_per_s": 500.0, "rollout/logprob_seconds": 0.0,
             "correction/seconds": 0.4, "rollout/skipped_layers": 1.0, "completions/mean_length": 40.0,
             "completions/clipped_ratio": 0.25, "completions/max_length": 96, **(round_log or {})},
            {"step": 4, "loss": 0.1}]
    return ends, logs


def test_summarise_times_only_after_warmup():
    ends, logs = fake_run()
    s = step_time.summarise(ends, 0.0, logs, steps_per_round=2, warmup_rounds=1, cpu_ends=[1.0, 1.5, 3.0, 3.5], cpu0=0.0)
    assert s["timed_steps"] == 2 and s["timed_rounds"] == 1
    assert s["seconds_per_step"] == pytest.approx(2.0)  # (8 - 4) / 2
    assert s["cpu_seconds_per_step"] == pytest.approx(1.0)  # (3.5 - 1.5) / 2
    assert s["generate_seconds_per_step"] == pytest.approx(1.0)
    assert s["correction_seconds_per_step"] == pytest.approx(0.2)
    assert s["generation_step_seconds"] == pytest.approx(3.0) and s["other_step_seconds"] == pytest.approx(1.0)
    assert s["tokens_per_round"] == pytest.approx(1000.0)
    assert s["skipped_layers"] == [1.0] and s["max_length_ratio"] == 0.25
    assert s["rounds"] == [{"skipped_layers": 1.0, "max_length": 96, "mean_length": 40.0, "generate_seconds": 2.0,
                            "first_step_seconds": 3.0, "other_steps_seconds": 1.0}]
    assert s["generate_ms_per_decode_step"] == pytest.approx(1000 * 2.0 / 96)
    assert "| skip0 | 1 | 1 | 96 | 40.0 | 2.00 | 20.8 | 3.00 | 1.00 | 10.4 |" in step_time.rounds_table([{"pass": 0, "config": "skip0", **s}])
    with pytest.raises(ValueError, match="warm-up"):
        step_time.summarise(ends[:2], 0.0, logs, steps_per_round=2, warmup_rounds=1)


def test_aggregate_and_table():
    ends, logs = fake_run()
    base = step_time.summarise(ends, 0.0, logs, 2, 1, [1.0, 1.5, 3.0, 3.5])
    runs = [{"pass": 0, "config": "skip0", **base, "seconds_per_step": 2.0},
            {"pass": 0, "config": "skip0.125", **base, "seconds_per_step": 1.0, "cpu_seconds_per_step": 0.5},
            {"pass": 1, "config": "skip0.125", **base, "seconds_per_step": 3.0},
            {"pass": 1, "config": "skip0", **base, "seconds_per_step": 4.0}]
    rows = step_time.aggregate(runs, ["skip0", "skip0.125"])
    assert [r["seconds_per_step"] for r in rows] == [3.0, 2.0]  # medians over passes
    assert rows[1]["ratio_to_first_each_pass"] == [0.5, 0.75]  # within each pass, not of the medians
    assert rows[1]["ratio_to_first"] == pytest.approx(0.625)
    assert rows[1]["cpu_ratio_to_first_each_pass"] == [0.5, 1.0]
    md = step_time.table(rows).splitlines()
    assert md[0].startswith("| config | k drawn | s/step (each pass) | × skip0, same pass | CPU s/step |")
    assert md[3].startswith("| skip0.125 | 1 | 2.00 (1.00, 3.00) | 0.62 (0.50, 0.75) | 0.75 | 0.75 (0.50, 1.00) | 1.00 | 20.8 | 0.20 | "
                            "3.00 | 1.00 | 500 | 1000 | 40.0 | 25% |")
    with pytest.raises(ValueError, match="no run"):
        step_time.aggregate(runs, ["skip0.25"])
