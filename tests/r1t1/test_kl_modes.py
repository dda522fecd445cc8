"""Both KL modes of R1T1Trainer, checked against log-probs computed here by a plain forward pass."""

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from r1t1.config import R1T1Config
from r1t1.trainer import R1T1Trainer

SHARED = dict(
    per_device_train_batch_size=8, num_generations=4, max_completion_length=10, learning_rate=1e-3,
    report_to=[], save_strategy="no", logging_steps=1, seed=0, use_cpu=True, temperature=1.0,
    top_k=0, top_p=1.0, num_train_epochs=1, bf16=False, skip_ratio=0.0, correction="none", full_model_probe_every=0,
)


def length_reward(completions, **kwargs):
    return [float(len(c[0]["content"] if isinstance(c, list) else c) % 7) for c in completions]


def dataset():
    rows = [{"prompt": [{"role": "user", "content": f"Translate {i} dogs."}]} for i in range(4)]
    return Dataset.from_list(rows)


def make_trainer(model_dir, tokenizer, tmp_path, **kw):
    """The policy starts away from the reference (TRL loads that from `model_dir`), so KL > 0."""
    policy = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return R1T1Trainer(model=policy, reward_funcs=[length_reward], processing_class=tokenizer,
                       train_dataset=dataset(), args=R1T1Config(output_dir=str(tmp_path), **SHARED, **kw))


def prepared(trainer, monkeypatch):
    monkeypatch.setattr("trl.trainer.grpo_trainer.shuffle_sequence_dict", lambda batch: batch)
    trainer.model.train()
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def token_logps(model, prompt, completion):
    """log p(completion_t | prefix) for one unpadded sequence, by a plain forward pass."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(completion)[:, None])[:, 0]


def sequences(inputs):
    out = []
    for p_ids, p_mask, c_ids, c_mask in zip(inputs["prompt_ids"], inputs["prompt_mask"],
                                            inputs["completion_ids"], inputs["completion_mask"]):
        out.append((p_ids[p_mask.bool()].tolist(), c_ids[c_mask.bool()].tolist()))
    return out


def test_reward_mode_subtracts_beta_times_sequence_kl_before_advantages(small_model_dir, chat_tokenizer, tmp_path, monkeypatch):
    beta = 0.5
    trainer = make_trainer(small_model_dir, chat_tokenizer, tmp_path, kl_mode="reward", beta=beta)
    assert trainer.beta == 0.0 and trainer.kl_beta == beta  # no KL term left in the loss
    assert trainer.reward_func_names == ["length_reward", "kl_penalty"]
    inputs = prepared(trainer, monkeypatch)

    seqs = sequences(inputs)
    texts = chat_tokenizer.batch_decode([c for _, c in seqs], skip_special_tokens=True)
    task = torch.tensor(length_reward(texts))
    kl = torch.stack([(token_logps(trainer.model, p, c) - token_logps(trainer.ref_model, p, c)).sum() for p, c in seqs])
    assert kl.abs().max() > 0.05  # the perturbation makes the check meaningful
    reward = (task - beta * kl).view(-1, 4)
    expected = (reward - reward.mean(1, keepdim=True)) / (reward.std(1, keepdim=True) + 1e-4)
    got = inputs["advantages"][:, 0]  # correction 'none': every token of a row has the same value
    torch.testing.assert_close(got, expected.flatten(), rtol=1e-4, atol=1e-4)
    logged = trainer._metrics["train"]["rewards/kl_penalty/mean"][-1]
    assert logged == pytest.approx(float((-beta * kl).mean()), rel=1e-4, abs=1e-5)


def test_reward_mode_with_zero_beta_is_plain_grpo(small_model_dir, chat_tokenizer, tmp_path):
    trainer = make_trainer(small_model_dir, chat_tokenizer, tmp_path, kl_mode="reward", beta=0.0)
    assert trainer.reward_func_names == ["length_reward"] and trainer.ref_model is None


def test_reward_mode_keeps_user_reward_weights(small_model_dir, chat_tokenizer, tmp_path):
    trainer = make_trainer(small_model_dir, chat_tokenizer, tmp_path, kl_mode="reward", beta=0.1, reward_weights=[2.0])
    assert trainer.reward_weights.tolist() == [2.0, 1.0]
    assert trainer.args.reward_weights == [2.0]  # the config is left as the user wrote it


def test_loss_mode_adds_beta_k3_per_token_to_the_loss(small_model_dir, chat_tokenizer, tmp_path, monkeypatch):
    beta = 0.3
    trainer = make_trainer(small_model_dir, chat_tokenizer, tmp_path, kl_mode="loss", beta=beta, loss_type="grpo")
    assert trainer.beta == beta and trainer.reward_func_names == ["length_reward"]
    inputs = prepared(trainer, monkeypatch)
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer.compute_loss(trainer.model, inputs).item()

    # At the first step π_old = π_θ, so the ratio is 1: per-token loss = -A + β·k3,
    # k3 = exp(ref - θ) - (ref - θ) - 1, averaged per sequence, then over sequences ('grpo').
    per_seq = []
    for (p, c), adv in zip(sequences(inputs), inputs["advantages"][:, 0]):
        d = token_logps(trainer.ref_model, p, c) - token_logps(trainer.model, p, c)
        k3 = torch.exp(d) - d - 1
        per_seq.append((-adv + beta * k3).mean())
    expected = torch.stack(per_seq).mean().item()
    assert loss == pytest.approx(expected, rel=1e-4, abs=1e-5)
    kl_only = beta * torch.stack([
        (lambda d: (torch.exp(d) - d - 1).mean())(token_logps(trainer.ref_model, p, c) - token_logps(trainer.model, p, c))
        for p, c in sequences(inputs)]).mean().item()
    assert kl_only > 1e-3  # the KL term is a visible part of the checked loss


def test_config_rejects_bad_values(tmp_path):
    with pytest.raises(ValueError, match="kl_mode must be one of"):
        R1T1Config(output_dir=str(tmp_path), kl_mode="both")
    with pytest.raises(ValueError, match="unknown template 'poem'"):
        R1T1Config(output_dir=str(tmp_path), template="poem")
    with pytest.raises(ValueError, match="comet_model"):
        R1T1Config(output_dir=str(tmp_path), reward_metric="comet")
    with pytest.raises(ValueError, match="sum_then_normalize"):
        R1T1Config(output_dir=str(tmp_path), kl_mode="reward", multi_objective_aggregation="normalize_then_sum")


def test_positional_arguments_mean_what_they_mean_for_grpo_trainer(small_model_dir, chat_tokenizer, tmp_path):
    # GRPOTrainer(model, reward_funcs, args, train_dataset, eval_dataset, processing_class)
    config = R1T1Config(output_dir=str(tmp_path), **SHARED, kl_mode="reward", beta=0.1)
    trainer = R1T1Trainer(AutoModelForCausalLM.from_pretrained(small_model_dir), [length_reward], config, dataset(),
                          None, chat_tokenizer)
    assert trainer.kl_in_reward and trainer.kl_beta == pytest.approx(0.1) and trainer.beta == 0.0
    assert trainer.reward_func_names == ["length_reward", "kl_penalty"]
    with pytest.raises(TypeError, match="R1T1Config"):
        R1T1Trainer(AutoModelForCausalLM.from_pretrained(small_model_dir), [length_reward], None, dataset())
