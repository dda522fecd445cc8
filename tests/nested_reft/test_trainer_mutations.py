"""Tests aimed at wrong trainers that used to pass the whole suite: each names the mutation it
catches. Numbers are computed independently of the trainer (plain forwards, one row at a time)."""

import pytest
import torch
from test_skipping import rebuilt_without
from test_trainer import first_inputs, loss_and_grads
from test_trainer_correction import (
    capture_generation_batches,
    make_trainer,
    row_logps,
    trl_loss_with_weighted_advantages,
)
from transformers import AutoModelForCausalLM

from nested_reft.controller import AdaptiveSkipController
from nested_reft.corrections import correction_weights


@pytest.fixture(autouse=True)
def keep_row_order(monkeypatch):
    monkeypatch.setattr("trl.trainer.grpo_trainer.shuffle_sequence_dict", lambda batch: batch)


def expected_weights(model_dir, out, skip, method="tis", clip=2.0, temperature=1.0, top_k=0):
    full = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    old = row_logps(full, out, temperature)
    behavior = rebuilt_without(full, skip) if skip else full
    mu = row_logps(behavior, out, temperature, top_k)
    return correction_weights(old, mu, out["completion_mask"], method, clip=clip)


def test_rescored_mu_uses_the_rounds_skip_set(small_model_dir, chat_tokenizer, tmp_path, monkeypatch):
    """behavior_logprobs='rescore': μ is the trainer's forward under exactly the round's skip set.
    Catches μ re-scored under a skip set shifted by one layer."""
    skip = (2, 3)
    trainer = make_trainer(small_model_dir, chat_tokenizer, tmp_path, skip_mode="fixed", skip_layers=list(skip),
                           behavior_logprobs="rescore", correction="tis", clip=2.0)
    captured = capture_generation_batches(trainer, monkeypatch)
    first_inputs(trainer)
    out = captured["ours"]
    w = expected_weights(small_model_dir, out, skip)
    shifted = expected_weights(small_model_dir, out, (3, 4))
    adv = captured["trl_advantages"].unsqueeze(1)
    torch.testing.assert_close(out["advantages"], adv * w, atol=1e-5, rtol=1e-4)
    assert (adv * shifted - adv * w).abs().max() > 1e-3  # the shifted set would be told apart


def test_every_optimizer_step_of_a_round_trains_on_weighted_advantages(small_model_dir, chat_tokenizer, tmp_path, monkeypatch):
    """steps_per_generation = 2: both optimizer steps' batches carry A·w, not only the round's first.
    Catches weights applied on the first step of a round only."""
    skip = (1, 4)
    trainer = make_trainer(small_model_dir, chat_tokenizer, tmp_path, skip_mode="fixed", skip_layers=list(skip),
                           correction="tis", clip=2.0, steps_per_generation=2)
    captured = capture_generation_batches(trainer, monkeypatch)
    batch, first = first_inputs(trainer)
    trainer._step += 1  # the next micro-step of the round: served from the round's buffer
    second = trainer._prepare_inputs(batch)
    out = captured["ours"]
    expected = captured["trl_advantages"].unsqueeze(1) * expected_weights(small_model_dir, out, skip)
    assert (expected.abs() > 0).any() and len(trainer.skip_policy.history) == 1
    for half, got in enumerate((first, second)):
        rows = slice(8 * half, 8 * (half + 1))
        width = got["advantages"].size(1)
        torch.testing.assert_close(got["advantages"], expected[rows, :width], atol=1e-5, rtol=1e-4)
        assert torch.equal(got["completion_ids"], out["completion_ids"][rows, :width])


def test_the_kl_term_is_not_weighted(small_model_dir, chat_tokenizer, tmp_path, monkeypatch):
    """β > 0 with skipping: the loss is TRL's with weighted advantages and an unweighted KL term.
    Catches the KL term multiplied by the correction weights."""
    skip, beta = (1, 4), 0.5
    ours = make_trainer(small_model_dir, chat_tokenizer, tmp_path / "ours", skip_mode="fixed", skip_layers=list(skip),
                        correction="tis", clip=2.0, beta=beta)
    captured = capture_generation_batches(ours, monkeypatch)
    batch, inputs = first_inputs(ours)
    with torch.no_grad():  # move the policy off the reference, so the KL term is not zero
        for p in ours.model.parameters():
            p.add_(0.01 * torch.randn_like(p, generator=None))
    out = captured["ours"]
    w = expected_weights(small_model_dir, out, skip)
    mask = out["completion_mask"]
    loss_a, grads_a = loss_and_grads(ours, inputs)
    torch.manual_seed(0)
    theirs_loss, _ = trl_loss_with_weighted_advantages(
        small_model_dir, chat_tokenizer, tmp_path, batch, [c[m.bool()].tolist() for c, m in zip(out["completion_ids"], mask)],
        w, beta=beta, model_state=ours.model.state_dict())
    torch.testing.assert_close(loss_a, theirs_loss, rtol=1e-5, atol=1e-5)
    assert ours._metrics["train"]["kl"][-1] > 1e-4  # the KL term was really there


def test_the_ess_controller_steers_the_next_round(small_model_dir, chat_tokenizer, tmp_path, monkeypatch):
    """ess_adaptive: after a round the skip ratio is the controller's answer to that round's ESS.
    Catches the controller's update removed from the trainer."""
    trainer = make_trainer(small_model_dir, chat_tokenizer, tmp_path, correction="ess_adaptive", skip_ratio=0.25,
                           ess_target=0.99, ess_band=0.0, skip_ratio_step=0.1)
    initial = trainer.skip_controller.ratio  # k = round(0.25 · 6) = 2 layers: 1/3
    first_inputs(trainer)
    ess = trainer._metrics["train"]["correction/ess"][-1]
    reference = AdaptiveSkipController(initial, 0.99, 0.0, 0.0, 0.5, 0.1)
    expected = reference.update(ess)
    assert expected != initial  # this round's ESS moves the ratio
    assert trainer.skip_controller.ratio == pytest.approx(expected)
    assert trainer.skip_policy.skip_ratio == pytest.approx(expected)  # the next draw uses it


def test_truncated_sampling_is_corrected_even_with_nothing_skipped(small_model_dir, chat_tokenizer, tmp_path, monkeypatch):
    """top_k on, nothing skipped, the HF engine on the policy's own weights: μ is the truncated
    distribution, not π_old, so w = min(π_old/μ_topk, C) < 1. Catches the μ = π_old shortcut taken
    whatever the processors."""
    trainer = make_trainer(small_model_dir, chat_tokenizer, tmp_path, skip_ratio=0.0, top_k=5, correction="tis",
                           clip=2.0)
    captured = capture_generation_batches(trainer, monkeypatch)
    first_inputs(trainer)
    out = captured["ours"]
    w = expected_weights(small_model_dir, out, (), top_k=5)
    mask = out["completion_mask"].bool()
    assert (w[mask] < 0.99).float().mean() > 0.5  # truncation really removes probability
    torch.testing.assert_close(out["advantages"], captured["trl_advantages"].unsqueeze(1) * w, atol=1e-5, rtol=1e-4)


def add(a: int, b: int) -> int:
    """Adds two integers.

    Args:
        a: the first integer
        b: the second integer
    """
    return a + b


def last_message_length(completions, **kwargs):
    """Varied within a group: the length of the turn after the tool's result."""
    return [float(len(c[-1]["content"]) % 5) for c in completions]


TOOL_CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call><|im_end|>'


@pytest.mark.slow
def test_tool_result_tokens_are_left_out_of_the_correction(small_model_dir, chat_tokenizer, tmp_path, monkeypatch):
    """TRL's own tool loop (a real tool, `tools=[add]`): the first turn calls the tool, TRL appends
    its result (tool_mask 0: not sampled, no μ) and samples a second turn from our engine. With a
    sequence-level correction, w must come from the model's own tokens only. Catches the tool_mask
    factor dropped from the correction's mask."""
    import copy

    from test_trainer import dataset
    from test_trainer_correction import FP32
    from trl.chat_template_utils import qwen2_5_chat_template

    from archs.skipping import skip_layers
    from nested_reft.config import NestedReFTConfig
    from nested_reft.engines import HFEngine
    from nested_reft.engines.base import Rollouts
    from nested_reft.engines.hf import completion_logprobs
    from nested_reft.trainer import NestedReFTTrainer

    tokenizer = copy.deepcopy(chat_tokenizer)
    tokenizer.chat_template = qwen2_5_chat_template  # a template TRL knows how to parse tool calls from
    call_ids = tokenizer(TOOL_CALL, add_special_tokens=False)["input_ids"]
    skip = (1, 4)

    class ToolCallingEngine(HFEngine):
        """Turn 0 calls the tool (scripted tokens, μ = the skipped model's log-probs of them); later
        turns sample for real."""

        def generate(self, prompt_token_ids, sampling, *, ignore_eos=False):
            if sampling.seed != trainer._sampling(0).seed:
                return super().generate(prompt_token_ids, sampling, ignore_eos=ignore_eos)
            completions = [list(call_ids) for _ in prompt_token_ids]
            with skip_layers(self.model, self.skip):
                mu = completion_logprobs(self.model, prompt_token_ids, completions, sampling.temperature, self.pad_id)
            return Rollouts(completions, mu, tuple(self.skip))

    args = NestedReFTConfig(output_dir=str(tmp_path), full_model_probe_every=0, skip_mode="fixed", skip_layers=list(skip),
                            correction="seq_tis", clip=1e6, max_tool_calling_iterations=1,
                            **{**FP32, "max_completion_length": 110})
    trainer = NestedReFTTrainer(model=small_model_dir, reward_funcs=last_message_length, processing_class=tokenizer,
                                train_dataset=dataset(), args=args, tools=[add])
    trainer.engine = ToolCallingEngine(trainer.model, tokenizer, eos_token_ids=[tokenizer.convert_tokens_to_ids("<|im_end|>")])
    captured = capture_generation_batches(trainer, monkeypatch)
    first_inputs(trainer)
    out = captured["ours"]
    tool_mask = out["tool_mask"]
    mask = out["completion_mask"]
    assert ((tool_mask == 0) & (mask == 1)).any()  # the tool's result is in the completions
    assert out["completion_ids"][0, : len(call_ids)].tolist() == call_ids
    full = AutoModelForCausalLM.from_pretrained(small_model_dir).eval()
    old = row_logps(full, out, 1.0)
    mu = row_logps(rebuilt_without(full, skip), out, 1.0)
    expected = correction_weights(old, mu, mask * tool_mask, "seq_tis", clip=1e6)
    adv = captured["trl_advantages"].unsqueeze(1)
    assert adv.abs().sum() > 0
    torch.testing.assert_close(out["advantages"] * tool_mask, adv * expected * tool_mask, atol=1e-5, rtol=1e-4)
