"""A reward that raises, hangs or miscounts costs the samples it fails on (score 0, counted), not the run."""

import time

import pytest
from test_trainer import SHARED, dataset, first_inputs

from nested_reft.config import NestedReFTConfig
from nested_reft.reward_guard import GuardedReward
from nested_reft.trainer import NestedReFTTrainer


def picky(prompts, completions, completion_ids=None, bad=("boom",), hang=("hang",), **kwargs):
    """Length of each completion; raises on 'boom', never returns on 'hang' (within the test)."""
    for c in completions:
        if c in bad:
            raise RuntimeError(f"cannot parse {c!r}")
        if c in hang:
            time.sleep(30)
    return [float(len(c)) for c in completions]


def test_a_failing_sample_scores_zero_and_the_others_keep_their_scores():
    guard = GuardedReward(picky, timeout_s=0.5)
    completions = ["ab", "boom", "abcd", "hang", "a"]
    start = time.perf_counter()
    scores = guard(prompts=["p"] * 5, completions=completions, completion_ids=[[1]] * 5, solution=list("vwxyz"),
                   trainer_state=None)
    assert scores == [2.0, 0.0, 4.0, 0.0, 1.0]
    assert guard.pop_failures() == 2 and guard.pop_failures() == 0
    assert time.perf_counter() - start < 5  # the hang cost its time limit (the batch's and its own), not 30 s
    assert guard.__name__ == "picky"  # TRL names the metric after it
    assert guard(prompts=["p"] * 2, completions=["x", "yy"], completion_ids=None) == [1.0, 2.0]
    assert guard.pop_failures() == 0


def test_a_wrong_number_of_scores_falls_back_to_one_sample_at_a_time():
    def short(prompts, completions, **kwargs):
        return [1.0] if len(completions) > 1 else [float(len(completions[0]))]

    guard = GuardedReward(short, timeout_s=5)
    assert guard(prompts=["p"] * 3, completions=["a", "bb", "ccc"]) == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="timeout must be > 0"):
        GuardedReward(short, timeout_s=0)


def test_training_survives_a_reward_that_raises_and_logs_the_failures(small_model_dir, chat_tokenizer, tmp_path):
    calls = []

    def flaky(completions, **kwargs):  # fails on the first sample of every batch
        calls.append(len(completions))
        if len(completions) > 1 or len(calls) == 2:
            raise KeyError("no answer field")
        return [1.0]

    trainer = NestedReFTTrainer(model=small_model_dir, reward_funcs=flaky, processing_class=chat_tokenizer,
                                train_dataset=dataset(), args=NestedReFTConfig(output_dir=str(tmp_path), skip_ratio=0.0,
                                                                               full_model_probe_every=0, **SHARED))
    _, inputs = first_inputs(trainer)
    assert trainer._metrics["train"]["rewards/flaky/failed"] == [1.0]  # only the sample that failed alone
    assert calls[0] == 8 and calls[1:] == [1] * 8
    assert inputs["advantages"].abs().sum() > 0  # one zero among ones: a real signal, the run goes on


def test_the_time_outs_of_a_wrapped_reward_are_passed_on_exactly_and_apart_from_failures():
    from rewards.math import accuracy_reward

    guard = GuardedReward(accuracy_reward, timeout_s=120)
    completions = ["\\boxed{1}", "\\boxed{10^{10^{10}}}", "\\boxed{3}", "\\boxed{9^{9^{9^{9}}}}", "\\boxed{5}",
                   "\\boxed{2^{2^{2^{2^{2^{2}}}}}}"]
    solution = ["1", "1", "3", "1", "6", "1"]
    # each power tower is cut off at its 2 s limit; a plain check takes milliseconds
    scores = guard(prompts=["p"] * 6, completions=completions, solution=solution, timeout=2.0, num_workers=2)
    assert scores == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert guard.pop_timeouts() == 3 and guard.pop_timeouts() == 0
    assert guard.pop_failures() == 0  # cut off at its limit is not a failure of the reward
    assert guard(prompts=["p"], completions=["\\boxed{7}"], solution=["7"], timeout=2.0, num_workers=2) == [1.0]
    assert guard.pop_timeouts() == 0
    assert GuardedReward(picky).pop_timeouts() is None  # a reward that keeps no such count
