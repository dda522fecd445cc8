"""Loading the policy the way a GPU user expects: on the accelerator when there is one, bf16 there
and float32 on CPU unless `--dtype` says otherwise, and a clear message before loading a model
that cannot fit."""

from __future__ import annotations

import logging
import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

logger = logging.getLogger(__name__)

def pick_device_and_dtype(model_args, use_cpu: bool = False) -> tuple[torch.device, torch.dtype]:
    """CUDA when available (and not `use_cpu`), else CPU; `--dtype auto`/unset: bf16 on the GPU,
    float32 on CPU (bf16 matmuls are slow on most CPUs and the tiny model is float32)."""
    device = torch.device("cuda") if torch.cuda.is_available() and not use_cpu else torch.device("cpu")
    if model_args.dtype not in (None, "auto"):
        return device, getattr(torch, model_args.dtype)
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


def count_parameters(model_path: str, revision: str | None = None) -> int:
    """Parameters of the checkpoint's architecture, counted on the meta device (no weights read)."""
    from accelerate import init_empty_weights

    config = AutoConfig.from_pretrained(model_path, revision=revision)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # tied embeddings are one tensor (the meta build leaves them apart)
    return sum(p.numel() for p in model.parameters())


OPTIMIZER_BYTES = 8  # AdamW: two fp32 moments per parameter
MASTER_BYTES = 4  # the fp32 master copy of a bf16/fp16 parameter (nested_reft/master_weights.py)


def sharding_from_env() -> tuple[int, int]:
    """(processes, ZeRO stage) of an `accelerate launch` run, from the variables it sets; FSDP's
    full sharding counts as stage 3 and SHARD_GRAD_OP as stage 2. (1, 0) for a plain run."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return world, int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0") or 0)
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        strategy = os.environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").upper()
        return world, {"SHARD_GRAD_OP": 2, "2": 2, "NO_SHARD": 0, "3": 0}.get(strategy, 3)
    return world, 0


def training_bytes_per_param(dtype: torch.dtype, use_peft: bool, processes: int = 1, zero_stage: int = 0) -> float:
    """GPU bytes per parameter on one process: the weights (LoRA: the frozen weights dominate), or
    for a full fine-tune weights + gradients (in `dtype`) + AdamW moments + an fp32 master copy when
    `dtype` is half precision (16 bytes per bf16 parameter), of which ZeRO stage 1 shards the
    optimizer state (moments, masters) over the processes, stage 2 the gradients too, stage 3
    everything."""
    w = torch.tensor([], dtype=dtype).element_size()
    if use_peft:
        return w
    n = max(1, processes)
    state = OPTIMIZER_BYTES + (MASTER_BYTES if w < 4 else 0)
    if zero_stage >= 3:
        return (2 * w + state) / n
    if zero_stage == 2:
        return w + (w + state) / n
    if zero_stage == 1:
        return 2 * w + state / n
    return 2 * w + state


def check_fits(n_params: int, dtype: torch.dtype, free_bytes: int, use_peft: bool, processes: int = 1,
               zero_stage: int = 0) -> None:
    """Raise a ValueError naming the sizes and the options when training cannot fit in memory."""
    need = n_params * training_bytes_per_param(dtype, use_peft, processes, zero_stage)
    if need > free_bytes:
        what = "its weights (LoRA)" if use_peft else "a full fine-tune (weights, gradients, AdamW moments, fp32 masters of half-precision weights)"
        sharded = f" per GPU with ZeRO-{zero_stage} over {processes} processes" if zero_stage and not use_peft else ""
        raise ValueError(
            f"the model has {n_params / 1e9:.2f}B parameters: {what} needs about {need / 2**30:.1f} GiB{sharded} in "
            f"{str(dtype).removeprefix('torch.')}, and the GPU has {free_bytes / 2**30:.1f} GiB free. Options: "
            "--use_peft true (LoRA), DeepSpeed ZeRO-2/3 or FSDP through accelerate "
            "(recipes/accelerate/deepspeed_zero2.yaml), a smaller model, or more GPUs"
        )


def load_model_and_tokenizer(model_path: str, model_args, use_cpu: bool = False, use_peft: bool = False):
    """The causal LM (on its device, in its dtype) and tokenizer, as the recipes use them."""
    device, dtype = pick_device_and_dtype(model_args, use_cpu)
    if device.type == "cuda":
        check_fits(count_parameters(model_path, model_args.model_revision), dtype,
                   torch.cuda.mem_get_info()[0], use_peft, *sharding_from_env())
    tokenizer = AutoTokenizer.from_pretrained(model_path, revision=model_args.model_revision)
    model = AutoModelForCausalLM.from_pretrained(model_path, revision=model_args.model_revision, dtype=dtype,
                                                 attn_implementation=model_args.attn_implementation)
    logger.info("loaded %s in %s on %s", model_path, str(dtype).removeprefix("torch."), device)
    return model.to(device), tokenizer
