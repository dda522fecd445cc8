"""Balcony exits as Nested-ReFT behavior models: μ is the exit's own sampler, the exit is distilled
before the first round and (optionally) after each policy update, and the trainer corrects for it."""

import copy

import pytest
import torch
from datasets import Dataset

from archs.balcony import build_exits, exit_logits, save_exits
from nested_reft.config import NestedReFTConfig
from nested_reft.engines import SamplingSpec
from nested_reft.engines.balcony import BalconyHFEngine, distillation_batch
from nested_reft.engines.hf import completion_logprobs
from nested_reft.trainer import NestedReFTTrainer


def _prompts(tok, n=5):
    return [tok(f"What is {i} + {2 * i}?")["input_ids"][: 3 + i] for i in range(n)]


@torch.no_grad()
def exit_completion_logprobs(policy, exits, k, prompts, completions):
    """log p_exit of each completion token from `exit_logits` (one teacher forward, the exit applied to
    hidden_states[k]), one unpadded row at a time: independent of the sampler, its cache and phases."""
    out = []
    for p, c in zip(prompts, completions):
        ids = torch.tensor([p + c])
        _, by_exit = exit_logits(policy, ids, None, exits, depths=[k])
        logps = torch.log_softmax(by_exit[k][0, len(p) - 1:-1].double(), -1)
        out.append(logps.gather(-1, torch.tensor(c).unsqueeze(-1)).squeeze(-1))
    return out


@pytest.mark.parametrize("compact_every", [0, 3])
def test_mu_is_the_exits_own_distribution(small_qwen2, chat_tokenizer, compact_every):
    """The engine's μ equals an independent forward through exit 3 to 1e-5 (float32), with and without
    phased sampling; it is not the full policy's distribution. Catches: μ recorded outside the exit
    (full model), the exit's cache slot colliding with a base layer's, a stale exit norm."""
    policy = small_qwen2.eval()
    engine = BalconyHFEngine(policy, chat_tokenizer, exit=3, batch_size=3, compact_every=compact_every)
    prompts = _prompts(chat_tokenizer)
    r = engine.generate(prompts, SamplingSpec(max_new_tokens=8, temperature=1.0, seed=0))
    assert len(r.completion_ids) == 5 and all(1 <= len(c) <= 8 for c in r.completion_ids)
    want = exit_completion_logprobs(policy, engine.exits, 3, prompts, r.completion_ids)
    for got, w in zip(r.logprobs, want):
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), w, atol=1e-5, rtol=0)
    full = completion_logprobs(policy, prompts, r.completion_ids, 1.0, chat_tokenizer.pad_token_id)
    assert max(abs(a - b) for g, f in zip(r.logprobs, full) for a, b in zip(g, f)) > 1e-2
    assert len(policy.model.layers) == 6 and policy.config.num_hidden_layers == 6  # restored after sampling


def test_distillation_batch_marks_the_positions_that_predict_completion_tokens():
    ids, mask, kl = distillation_batch([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=0, device="cpu")
    assert ids.tolist() == [[5, 6, 7, 1, 2, 0], [0, 0, 8, 3, 4, 9]]
    assert mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert kl.tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0]]  # the last prompt token predicts the first


def test_warmup_distils_the_exit_toward_the_policy_and_leaves_the_policy_alone(small_qwen2, chat_tokenizer):
    policy = small_qwen2.eval()
    before = {n: p.clone() for n, p in policy.named_parameters()}
    engine = BalconyHFEngine(policy, chat_tokenizer, exit=3, warmup_steps=25, lr=3e-3, distill_batch_size=4)
    initial = copy.deepcopy(engine.exits[3].state_dict())
    engine.generate(_prompts(chat_tokenizer, 8), SamplingSpec(max_new_tokens=10, seed=0))
    (row,) = engine.distill_history
    assert row["phase"] == "warmup" and row["steps"] == 25 and row["kl_last"] < 0.8 * row["kl_first"]
    assert any(not torch.equal(v, engine.exits[3].state_dict()[n]) for n, v in initial.items())
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in policy.named_parameters())
    engine.generate(_prompts(chat_tokenizer, 2), SamplingSpec(max_new_tokens=4, seed=1))
    assert len(engine.distill_history) == 1  # the warm-up runs once


def test_exit_is_frozen_by_default_and_redistilled_after_policy_updates(small_qwen2, chat_tokenizer):
    """load_weights is the trainer's "the policy changed" call: with redistill_steps=0 nothing moves;
    with redistill_steps=4 the exit is distilled on the latest round toward the updated policy."""
    policy = small_qwen2.eval()
    prompts, spec = _prompts(chat_tokenizer, 6), SamplingSpec(max_new_tokens=8, seed=0)
    frozen = BalconyHFEngine(policy, chat_tokenizer, exit=2)
    frozen.generate(prompts, spec)
    state = copy.deepcopy(frozen.exits.state_dict())
    frozen.load_weights(policy.named_parameters())
    assert all(torch.equal(v, frozen.exits.state_dict()[n]) for n, v in state.items()) and not frozen.distill_history

    engine = BalconyHFEngine(policy, chat_tokenizer, exit=2, redistill_steps=4, lr=3e-3)
    engine.load_weights(policy.named_parameters())  # before any round: nothing to distil on
    assert not engine.distill_history
    engine.generate(prompts, spec)
    with torch.no_grad():  # an optimizer step of the policy
        policy.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    engine.load_weights(policy.named_parameters())
    (row,) = engine.distill_history
    assert row["phase"] == "redistill" and row["steps"] == 4 and row["kl_last"] < row["kl_first"]
    assert all(p.grad is None for p in policy.parameters())


def test_engine_refusals(small_qwen2, chat_tokenizer, tmp_path):
    engine = BalconyHFEngine(small_qwen2, chat_tokenizer)  # default exit: round(15/32 * 6) = 3
    assert engine.exit == 3
    with pytest.raises(ValueError, match=r"does not also skip layers \(got \[2\]\)"):
        engine.set_skip([2])
    engine.set_skip([])
    with pytest.raises(ValueError, match="balcony_exit=6 does not fit a 6-layer policy"):
        BalconyHFEngine(small_qwen2, chat_tokenizer, exit=6)
    save_exits(build_exits(small_qwen2, [2, 4]), tmp_path / "exits")
    assert BalconyHFEngine(small_qwen2, chat_tokenizer, exits_path=str(tmp_path / "exits")).exit == 2
    with pytest.raises(ValueError, match=r"balcony_exit=3 is not one of the exits .* \[2, 4\]"):
        BalconyHFEngine(small_qwen2, chat_tokenizer, exit=3, exits_path=str(tmp_path / "exits"))


def test_peft_policy_is_refused(small_qwen2, chat_tokenizer):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(small_qwen2, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="with PEFT"):
        BalconyHFEngine(peft_model, chat_tokenizer)


@pytest.mark.parametrize("kwargs, message", [
    (dict(behavior="balcony", engine="vllm_server"), r"needs engine='hf', got 'vllm_server'"),
    (dict(behavior="balcony", skip_ratio=0.25), r"not a skip set: set skip_ratio=0 \(got 0.25\)"),
    (dict(behavior="balcony", skip_ratio=0.0, balcony_exit=0), r"balcony_exit must be >= 1 .*, got 0"),
    (dict(behavior="balcony", skip_ratio=0.0, balcony_redistill_steps=-1), r"got 50, -1"),
    (dict(behavior="balcony", skip_ratio=0.0, balcony_kl_reduction="sum"), r"one of \('token_mean', 'batchmean'\), got 'sum'"),
    (dict(behavior="balcony", skip_ratio=0.0, behavior_logprobs="rescore"), r"behavior='balcony'"),
    (dict(balcony_exits_path="exits/"), r"only with behavior='balcony', got behavior='skip'"),
])
def test_bad_balcony_configs_fail_before_any_model_loads(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        NestedReFTConfig(output_dir=str(tmp_path), report_to=[], **kwargs)


SHARED = dict(
    per_device_train_batch_size=8, num_generations=4, max_completion_length=12, learning_rate=1e-3,
    report_to=[], save_strategy="no", logging_steps=1, seed=0, use_cpu=True, temperature=1.0,
    top_k=0, top_p=1.0, num_train_epochs=1, full_model_probe_every=0, skip_ratio=0.0, bf16=False,
)


def _length_reward(completions, **kwargs):
    return [float(len(c[0]["content"] if isinstance(c, list) else c) % 5) for c in completions]


def test_an_exit_equal_to_the_full_model_gives_weights_of_exactly_one(small_model_dir, chat_tokenizer, tmp_path):
    """Exit L − 1 of a fresh model is the full model itself (its layer is a copy of the last layer, fed the
    last layer's input; its norm, layers[L−1].input_layernorm, equals the final norm: both ones). Through
    the whole correction path every ratio π_old/μ is then 1 to float error. Catches: μ shifted by one
    token, μ of another position or row, π_old taken from the exit."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(small_model_dir)
    assert torch.equal(base.model.layers[5].input_layernorm.weight, base.model.norm.weight)
    prompts = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + {i + 1}?"}]} for i in range(4)])
    trainer = NestedReFTTrainer(
        model=small_model_dir, reward_funcs=_length_reward, processing_class=chat_tokenizer, train_dataset=prompts,
        args=NestedReFTConfig(output_dir=str(tmp_path), behavior="balcony", balcony_exit=5, balcony_warmup_steps=0,
                              correction="tis", **SHARED),
    )
    trainer.model.train()
    trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    m = trainer._metrics["train"]
    assert abs(m["correction/ratio_min"][0] - 1) < 1e-4 and abs(m["correction/ratio_max"][0] - 1) < 1e-4, (
        m["correction/ratio_min"], m["correction/ratio_max"])


@pytest.mark.slow
def test_nested_reft_steps_with_a_balcony_behavior_model(small_model_dir, chat_tokenizer, tmp_path):
    """Two optimizer steps sampled through trained exit 3 (loaded from disk), re-distilled after each
    update: the correction weights are finite and spread around 1 (ESS < 1), and the μ the trainer
    received equals an independent forward through the exit as it was when it sampled."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(small_model_dir)
    exits = build_exits(base, [2, 3])
    with torch.no_grad():
        for p in exits.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    save_exits(exits, tmp_path / "exits")
    prompts = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + {i + 1}?"}]} for i in range(4)])
    trainer = NestedReFTTrainer(
        model=small_model_dir, reward_funcs=_length_reward, processing_class=chat_tokenizer, train_dataset=prompts,
        args=NestedReFTConfig(output_dir=str(tmp_path / "run"), behavior="balcony", balcony_exit=3,
                              balcony_exits_path=str(tmp_path / "exits"), balcony_warmup_steps=0,
                              balcony_redistill_steps=2, correction="tis", max_steps=2, **SHARED),
    )
    engine = trainer.engine
    assert isinstance(engine, BalconyHFEngine) and engine.exit == 3 and not engine.shares_policy_weights
    assert torch.equal(engine.exits[3].layer.mlp.up_proj.weight, exits[3].layer.mlp.up_proj.weight)
    checked = []
    generate = engine.generate

    def generate_and_check(prompt_ids, sampling, **kw):
        out = generate(prompt_ids, sampling, **kw)
        want = exit_completion_logprobs(engine.model, engine.exits, 3, prompt_ids, out.completion_ids)
        checked.append(max(float((torch.tensor(g, dtype=torch.float64) - w).abs().max())
                           for g, w in zip(out.logprobs, want)))
        return out

    engine.generate = generate_and_check
    trainer.train()
    logs = [row for row in trainer.state.log_history if "correction/ess" in row]
    assert len(logs) == 2 and len(checked) == 2 and max(checked) < 1e-5, checked
    assert all(torch.isfinite(torch.tensor([r["loss"], r["correction/ess"], r["correction/kl_behavior"]])).all()
               for r in logs)
    assert all(r["correction/ratio_min"] < 1 < r["correction/ratio_max"] and r["correction/ess"] < 1 for r in logs)
    assert [r["phase"] for r in engine.distill_history] == ["redistill"]  # after step 1, before round 2
    assert all(r["rollout/weight_sync_seconds"] >= 0 for r in logs)
