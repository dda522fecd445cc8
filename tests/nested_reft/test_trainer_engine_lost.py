"""A rollout engine whose server is gone for good: the trainer saves the last completed step and
stops with one error naming the server, and the same run resumes from that checkpoint as if
nothing had happened (the failed round's skip-set draw is undone)."""

import json

import pytest
from datasets import Dataset

from nested_reft.config import NestedReFTConfig
from nested_reft.engines import RolloutEngineUnavailable
from nested_reft.trainer import NestedReFTTrainer

URL = "http://10.0.0.7:8000"


def length_reward(completions, **kwargs):
    return [float(len(c[0]["content"] if isinstance(c, list) else c) % 5) for c in completions]


def trainer(model_dir, tokenizer, out, max_steps=3):
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} + {i + 1}?"}]} for i in range(8)]
    args = NestedReFTConfig(output_dir=str(out), per_device_train_batch_size=8, num_generations=4, max_completion_length=8,
                            learning_rate=1e-3, report_to=[], save_strategy="no", logging_steps=1, seed=0, use_cpu=True,
                            skip_ratio=0.34, keep_first=1, keep_last=1, max_steps=max_steps, full_model_probe_every=0,
                            steps_per_generation=1)
    return NestedReFTTrainer(model=model_dir, reward_funcs=length_reward, processing_class=tokenizer,
                             train_dataset=Dataset.from_list(rows), args=args)


def lose_server_at_round(t, failing_round: int) -> None:
    calls, set_skip = [], t.engine.set_skip

    def flaky(layers):
        calls.append(layers)
        if len(calls) > failing_round:
            raise RolloutEngineUnavailable(f"vLLM server at {URL} is unreachable (3 attempts)", URL, every_rank=True)
        set_skip(layers)

    t.engine.set_skip = flaky


@pytest.mark.slow
def test_a_lost_server_saves_the_last_step_and_the_run_resumes_from_it(small_model_dir, chat_tokenizer, tmp_path):
    reference = trainer(small_model_dir, chat_tokenizer, tmp_path / "reference")
    reference.train()
    want = [tuple(s) for s in reference.skip_policy.history]
    assert len(want) == 3 and len(set(want)) > 1  # distinct draws, so an extra draw would show

    lost = trainer(small_model_dir, chat_tokenizer, tmp_path / "run")
    lose_server_at_round(lost, 1)  # after the set for round 1 is drawn
    with pytest.raises(RolloutEngineUnavailable) as e:
        lost.train()
    message = str(e.value)
    assert message.startswith(f"vLLM server at {URL} is unreachable") and message.count(URL) == 1
    folder = tmp_path / "run" / "checkpoint-1"
    assert f"Saved step 1 in {folder}" in message and "rerun the same command to resume" in message
    state = json.loads((folder / "nested_reft_state.json").read_text())
    assert [tuple(s) for s in state["skip_policy"]["history"]] == want[:1]  # the failed draw undone
    assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == 1

    resumed = trainer(small_model_dir, chat_tokenizer, tmp_path / "run")
    resumed.train(resume_from_checkpoint=str(folder))
    assert [tuple(s) for s in resumed.skip_policy.history] == want


def test_nothing_is_saved_before_the_first_step(small_model_dir, chat_tokenizer, tmp_path):
    t = trainer(small_model_dir, chat_tokenizer, tmp_path, max_steps=1)
    lose_server_at_round(t, 0)
    with pytest.raises(RolloutEngineUnavailable, match="No optimizer step had completed: nothing to save"):
        t.train()
    assert not list(tmp_path.glob("checkpoint-*"))
