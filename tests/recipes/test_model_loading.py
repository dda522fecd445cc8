"""Device, dtype and the fits-in-memory check of the recipes' model loading."""

from types import SimpleNamespace

import pytest
import torch

from recipes.model_loading import (
    check_fits,
    count_parameters,
    load_model_and_tokenizer,
    pick_device_and_dtype,
    sharding_from_env,
)


def test_dtype_defaults_to_float32_on_cpu_and_follows_an_explicit_choice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device_and_dtype(SimpleNamespace(dtype="auto")) == (torch.device("cpu"), torch.float32)
    assert pick_device_and_dtype(SimpleNamespace(dtype="bfloat16"))[1] == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device_and_dtype(SimpleNamespace(dtype=None)) == (torch.device("cuda"), torch.bfloat16)
    assert pick_device_and_dtype(SimpleNamespace(dtype=None), use_cpu=True)[0] == torch.device("cpu")


def test_a_model_that_cannot_fit_names_its_size_and_the_options():
    seven_b = 7_615_616_512  # Qwen2.5-7B
    # bf16 full fine-tune: 2 (weights) + 2 (gradients) + 8 (AdamW moments) + 4 (fp32 masters) bytes each
    with pytest.raises(ValueError, match=r"7\.62B parameters.*113\.5 GiB.*80\.0 GiB free.*use_peft"):
        check_fits(seven_b, torch.bfloat16, 80 * 2**30, use_peft=False)
    check_fits(seven_b, torch.bfloat16, 80 * 2**30, use_peft=True)  # LoRA: 14.2 GiB of weights fit


def test_zero_and_fsdp_sharding_shrink_the_per_gpu_need(monkeypatch):
    seven_b = 7_615_616_512
    # ZeRO-2 over 8 GPUs: bf16 weights whole (14.2 GiB) + gradients, moments and masters / 8 (12.4 GiB): 26.6 GiB
    check_fits(seven_b, torch.bfloat16, 27 * 2**30, use_peft=False, processes=8, zero_stage=2)
    with pytest.raises(ValueError, match=r"26\.6 GiB per GPU with ZeRO-2 over 8 processes"):
        check_fits(seven_b, torch.bfloat16, 25 * 2**30, use_peft=False, processes=8, zero_stage=2)
    check_fits(seven_b, torch.bfloat16, 15 * 2**30, use_peft=False, processes=8, zero_stage=3)  # 14.2 GiB
    check_fits(seven_b, torch.float32, 114 * 2**30, use_peft=False)  # float32: no masters, 16 bytes too (113.5 GiB)
    for var in ("WORLD_SIZE", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_USE_FSDP",
                "FSDP_SHARDING_STRATEGY"):
        monkeypatch.delenv(var, raising=False)
    assert sharding_from_env() == (1, 0)
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert sharding_from_env() == (8, 0)  # plain DDP replicates everything
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert sharding_from_env() == (8, 2)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert sharding_from_env() == (8, 3)
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "SHARD_GRAD_OP")
    assert sharding_from_env() == (8, 2)


def test_loads_on_cpu_in_float32_and_counts_parameters_without_weights(small_model_dir):
    args = SimpleNamespace(dtype="auto", model_revision=None, attn_implementation=None)
    model, tokenizer = load_model_and_tokenizer(small_model_dir, args, use_cpu=True)
    assert next(model.parameters()).dtype == torch.float32 and tokenizer.pad_token_id is not None
    assert count_parameters(small_model_dir) == sum(p.numel() for p in model.parameters())
