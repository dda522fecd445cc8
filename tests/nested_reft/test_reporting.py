"""Run records: the held-out evaluation callback and the JSONL writer see the same log row."""

import json

import pytest
from transformers import TrainerControl, TrainerState

from nested_reft.reporting import HeldOutEvalCallback, JsonlMetricsCallback, read_jsonl


def test_heldout_eval_runs_every_n_steps_and_lands_in_the_jsonl_row(tmp_path):
    calls = []
    evaluate = lambda: calls.append(1) or 0.25 * len(calls)  # noqa: E731
    held_out, writer = HeldOutEvalCallback(evaluate, every=2), JsonlMetricsCallback(tmp_path / "m.jsonl")
    state, control = TrainerState(max_steps=6), TrainerControl()
    for step in range(1, 7):
        state.global_step = step
        held_out.on_step_end(None, state, control)
        logs = {"loss": 0.5}
        for cb in (held_out, writer):  # the order the recipe registers them in
            cb.on_log(None, state, control, logs=logs)
    rows = read_jsonl(tmp_path / "m.jsonl")
    assert [(r["step"], r.get("heldout/accuracy")) for r in rows] == [
        (1, None), (2, 0.25), (3, None), (4, 0.5), (5, None), (6, None)]  # the last step: the final eval covers it
    assert len(calls) == 2 and json.loads((tmp_path / "m.jsonl").read_text().splitlines()[1])["loss"] == 0.5


def test_heldout_eval_rejects_a_non_positive_period():
    with pytest.raises(ValueError, match="eval_every.*0"):
        HeldOutEvalCallback(lambda: 0.0, every=0)
