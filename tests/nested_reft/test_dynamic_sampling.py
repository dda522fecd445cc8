"""Dynamic sampling (`filter_groups`): groups whose rewards are all equal are dropped and replaced by
groups sampled from more prompts; the joined round trains like TRL on those rows."""

import math
import re

import pytest
import torch
from datasets import Dataset
from test_trainer_correction import FP32

from nested_reft.config import NestedReFTConfig
from nested_reft.dynamic_sampling import (
    concat_outputs,
    informative_groups,
    refill_prompts,
    refill_size,
    select_groups,
)
from nested_reft.trainer import NestedReFTTrainer, trim_completion_padding

NAN = math.nan


def test_informative_groups_are_those_whose_finite_rewards_differ():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0,   # all equal: no signal
                            0.0, 1.0, 0.0, 0.0,   # one differs
                            NAN, 1.0, 1.0, 1.0,   # the scored ones equal
                            NAN, NAN, NAN, 1.0,   # one scored reward: no group
                            NAN, 0.0, 1.0, NAN,   # two scored, different
                            1.1, 1.1, 1.1, 1.1])  # equal floats stay equal
    assert informative_groups(rewards, 4).tolist() == [False, True, False, False, True, False]
    assert informative_groups(torch.tensor([0.3, 0.1 + 0.2]), 2).tolist() == [False]  # isclose, as TRL's zero-std test
    with pytest.raises(ValueError, match="6 rewards do not split into groups of 4"):
        informative_groups(torch.zeros(6), 4)


def test_refill_draws_enough_prompts_at_the_rate_seen_and_the_same_ones_on_resume():
    assert refill_size(missing=2, kept=6, generated=8, round_prompts=8) == 3  # 2 / 0.75
    assert refill_size(missing=8, kept=0, generated=8, round_prompts=8) == 8  # capped at a round's prompts
    assert refill_size(missing=1, kept=8, generated=8, round_prompts=8) == 1
    first = refill_prompts(100, 5, seed=3, round_index=7)
    assert first == refill_prompts(100, 5, seed=3, round_index=7) and len(set(first)) == 5
    assert first != refill_prompts(100, 5, seed=3, round_index=8)
    assert sorted(refill_prompts(3, 5, seed=0, round_index=0)) == [0, 1, 2]


def test_outputs_join_with_prompts_padded_left_completions_right_and_tokens_recounted():
    a = {"prompt_ids": torch.tensor([[5, 6], [7, 8]]), "prompt_mask": torch.ones(2, 2, dtype=torch.long),
         "completion_ids": torch.tensor([[1, 2, 3], [4, 0, 0]]), "completion_mask": torch.tensor([[1, 1, 1], [1, 0, 0]]),
         "advantages": torch.tensor([[0.5, 0.5, 0.5], [-0.5, 0, 0]]), "num_items_in_batch": torch.tensor(4)}
    b = {"prompt_ids": torch.tensor([[9, 9, 9]]), "prompt_mask": torch.ones(1, 3, dtype=torch.long),
         "completion_ids": torch.tensor([[3]]), "completion_mask": torch.tensor([[1]]),
         "advantages": torch.tensor([[2.0]]), "num_items_in_batch": torch.tensor(1)}
    out = concat_outputs([select_groups(a, torch.tensor([1]), 1), b], pad_token_id=0)
    assert out["prompt_ids"].tolist() == [[0, 7, 8], [9, 9, 9]]
    assert out["prompt_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]
    assert out["completion_ids"].tolist() == [[4, 0, 0], [3, 0, 0]]
    assert out["completion_mask"].tolist() == [[1, 0, 0], [1, 0, 0]]
    assert out["advantages"].tolist() == [[-0.5, 0, 0], [2.0, 0, 0]]
    assert int(out["num_items_in_batch"]) == 2


def prompts_with_signal():
    """Prompts 0..7; only the even ones get rewards that vary within their group."""
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} + {i + 1}?"}]} for i in range(8)]
    return Dataset.from_list(rows)


def prompt_number(prompt) -> int:
    return int(re.search(r"What is (\d+)", prompt[-1]["content"] if isinstance(prompt, list) else prompt)[1])


def even_prompts_vary(prompts, completions, **kwargs):
    return [float(len(c[-1]["content"]) % 5) if prompt_number(p) % 2 == 0 else 1.0
            for p, c in zip(prompts, completions)]


def constant_reward(completions, **kwargs):
    return [1.0] * len(completions)


def make(model_dir, tokenizer, tmp_path, reward, **kwargs):
    settings = {**FP32, "skip_ratio": 0.0, "num_generations": 4, "per_device_train_batch_size": 16,
                "max_completion_length": 8, "filter_groups": True, **kwargs}
    args = NestedReFTConfig(output_dir=str(tmp_path), full_model_probe_every=0, **settings)
    return NestedReFTTrainer(model=model_dir, reward_funcs=reward, processing_class=tokenizer,
                             train_dataset=prompts_with_signal(), args=args)


def scored_round(trainer):
    """One round as ours returns it, and the metrics it logged."""
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    return batch, trainer._generate_and_score_completions(batch), trainer._metrics["train"]


def test_a_round_keeps_only_groups_with_signal_and_is_filled_from_more_prompts(small_model_dir, chat_tokenizer, tmp_path):
    trainer = make(small_model_dir, chat_tokenizer, tmp_path, even_prompts_vary)
    batch, out, metrics = scored_round(trainer)
    n = len(batch)
    assert out["completion_ids"].size(0) == n == out["prompt_ids"].size(0) == out["advantages"].size(0)
    prompts = chat_tokenizer.batch_decode(out["prompt_ids"], skip_special_tokens=True)
    numbers = [prompt_number(p) for p in prompts]
    first_round = [prompt_number(r["prompt"]) for r in batch]
    assert any(i % 2 for i in first_round)  # the first draw had groups with no signal ...
    assert all(i % 2 == 0 for i in numbers)  # ... and none of them is left
    for g in range(n // 4):  # whole groups of one prompt, each with non-zero advantages
        assert len(set(numbers[4 * g: 4 * g + 4])) == 1
        assert out["advantages"][4 * g: 4 * g + 4].abs().sum() > 0
    assert metrics["dynamic_sampling/extra_calls"][-1] >= 1
    assert metrics["dynamic_sampling/unfilled_groups"][-1] == 0
    assert metrics["dynamic_sampling/informative_fraction"][-1] == pytest.approx(
        sum(i % 2 == 0 for i in first_round[::4]) / (n // 4))
    assert int(out["num_items_in_batch"]) == int(out["completion_mask"].sum())


def test_the_extra_calls_are_capped_and_the_round_filled_with_its_own_groups(small_model_dir, chat_tokenizer, tmp_path):
    trainer = make(small_model_dir, chat_tokenizer, tmp_path, constant_reward, filter_groups_max_calls=2)
    rounds_before = trainer._round
    batch, out, metrics = scored_round(trainer)
    assert metrics["dynamic_sampling/extra_calls"][-1] == 2 and trainer._round == rounds_before + 3
    assert metrics["dynamic_sampling/unfilled_groups"][-1] == len(batch) // 4
    assert [prompt_number(p) for p in chat_tokenizer.batch_decode(out["prompt_ids"], skip_special_tokens=True)] == \
        [prompt_number(r["prompt"]) for r in batch]


def test_the_joined_round_trains_as_trl_would_on_its_rows(small_model_dir, chat_tokenizer, tmp_path):
    """Padding added by the join changes no number: the loss and gradients of the joined round
    equal those of each part trained alone, weighted by its tokens (loss_type dapo: a token mean)."""
    trainer = make(small_model_dir, chat_tokenizer, tmp_path, even_prompts_vary, loss_type="dapo")
    _, out, _ = scored_round(trainer)
    trainer.current_gradient_accumulation_steps = 1
    whole = trainer.compute_loss(trainer.model, out)
    half = out["completion_ids"].size(0) // 2
    parts = []
    for rows in (slice(0, half), slice(half, None)):
        part = {k: (v[rows] if torch.is_tensor(v) and v.dim() >= 1 else v) for k, v in out.items()}
        part = trim_completion_padding(part)  # as if never padded to the other part's width
        parts.append(trainer.compute_loss(trainer.model, part))
    assert whole.item() == pytest.approx((parts[0] + parts[1]).item(), rel=1e-5, abs=1e-7)


def test_filter_groups_needs_a_positive_cap():
    with pytest.raises(ValueError, match="filter_groups_max_calls must be >= 1, got 0"):
        NestedReFTConfig(output_dir="/tmp/unused", filter_groups=True, filter_groups_max_calls=0)
