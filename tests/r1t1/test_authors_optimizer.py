"""R1-T1's optimizer as the authors ran it (verl): a constant learning rate and AdamW weight decay
0.01, by default and in the shipped GRPO configs, checked on the optimizer and scheduler the
trainer builds (not on the config fields alone)."""

import warnings
from pathlib import Path

import pytest
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import ModelConfig, get_peft_config

from r1t1.config import R1T1Config
from r1t1.trainer import R1T1Trainer
from recipes.skeleton import parse
from recipes.translate_r1t1 import TranslateR1T1Arguments

CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "configs"
CPU = ["--use_cpu", "true", "--bf16", "false", "--report_to", "none", "--gradient_checkpointing", "false"]
STEPS = 50


def reward(completions, **kwargs):
    return [0.0] * len(completions)


def built(args: R1T1Config, model_args: ModelConfig, model_dir, tokenizer):
    """The trainer's own optimizer (two reward functions, as the recipe's weights [1, 0] expect) and scheduler for a STEPS-step run, made as `Trainer.train` makes
    them (the scheduler over the accelerate-prepared optimizer)."""
    rows = [{"prompt": [{"role": "user", "content": f"Translate {i}."}]} for i in range(8)]
    trainer = R1T1Trainer(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=[reward, reward], args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                          peft_config=get_peft_config(model_args))
    trainer.create_optimizer()
    trainer.optimizer = trainer.accelerator.prepare(trainer.optimizer)
    return trainer.optimizer, trainer.create_scheduler(num_training_steps=STEPS)


def lrs(scheduler) -> list[float]:
    """The lr of each of the STEPS optimizer steps (the schedule alone: no weights change)."""
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stepping the scheduler without an optimizer step
        for _ in range(STEPS):
            out.append(scheduler.get_last_lr()[0])
            scheduler.step()
    return out


def parsed(config: str | None, tmp_path) -> tuple[R1T1Config, ModelConfig]:
    argv = (["--config", str(CONFIGS / config)] if config else []) + ["--output_dir", str(tmp_path)] + CPU
    _, args, model_args = parse((TranslateR1T1Arguments, R1T1Config, ModelConfig), argv)
    return args, model_args


@pytest.mark.parametrize("config", [None, "r1t1_grpo_qwen2.5_7b.yaml", "r1t1_grpo_qwen2.5_7b_lora.yaml"])
def test_grpo_lr_is_constant_and_weight_decay_reaches_adamw(config, small_model_dir, chat_tokenizer, tmp_path):
    args, model_args = parsed(config, tmp_path)
    optimizer, scheduler = built(args, model_args, small_model_dir, chat_tokenizer)
    seen = lrs(scheduler)
    # the authors' verl schedule: no warm-up, no decay (a linear decay to 0 halves the mean lr)
    assert seen[0] == seen[-1] == args.learning_rate and min(seen) == max(seen)
    decays = {g["weight_decay"] for g in optimizer.param_groups if g["params"]}
    assert 0.01 in decays  # transformers exempts biases and norms (weight decay 0 there), as verl's AdamW does not
    decayed = sum(p.numel() for g in optimizer.param_groups if g["weight_decay"] == 0.01 for p in g["params"])
    trainable = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert decayed > 0.5 * trainable  # the weight matrices (or the LoRA matrices) carry it


def test_the_toy_config_keeps_the_schedule_its_numbers_were_measured_with(tmp_path):
    args, _ = parsed("translate_r1t1_toy.yaml", tmp_path)
    assert (args.lr_scheduler_type.value, args.warmup_steps, args.weight_decay) == ("constant_with_warmup", 3, 0.0)


def test_schedule_and_weight_decay_are_options(small_model_dir, chat_tokenizer, tmp_path):
    argv = ["--output_dir", str(tmp_path), "--lr_scheduler_type", "linear", "--weight_decay", "0.0", *CPU]
    _, args, model_args = parse((TranslateR1T1Arguments, R1T1Config, ModelConfig), argv)
    optimizer, scheduler = built(args, model_args, small_model_dir, chat_tokenizer)
    seen = lrs(scheduler)
    assert seen[0] == args.learning_rate and seen[-1] == pytest.approx(args.learning_rate / STEPS)
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0}
