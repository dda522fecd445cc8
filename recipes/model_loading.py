"""Loading the policy the way a GPU user expects: on the accelerator when there is one, bf16 there
and float32 on CPU unless `--dtype` says otherwise, and a clear message before loading a model
that cannot fit."""

from __future__ import annotations

import logging

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

logger = logging.getLogger(__name__)

# bytes per parameter while training with AdamW: bf16 weights and gradients, two fp32 moments
# (a full fine-tune); with LoRA the frozen base weights dominate.
FULL_TRAINING_BYTES = {torch.bfloat16: 12, torch.float16: 12, torch.float32: 16}


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


def check_fits(n_params: int, dtype: torch.dtype, free_bytes: int, use_peft: bool) -> None:
    """Raise a ValueError naming the sizes and the options when training cannot fit in memory."""
    per_param = torch.tensor([], dtype=dtype).element_size() if use_peft else FULL_TRAINING_BYTES.get(dtype, 16)
    need = n_params * per_param
    if need > free_bytes:
        what = "its weights (LoRA)" if use_peft else "a full fine-tune (weights, gradients, AdamW moments)"
        raise ValueError(
            f"the model has {n_params / 1e9:.2f}B parameters: {what} needs about {need / 2**30:.1f} GiB in "
            f"{str(dtype).removeprefix('torch.')}, and the GPU has {free_bytes / 2**30:.1f} GiB free. Options: "
            "--use_peft true (LoRA), DeepSpeed ZeRO-3 / FSDP through accelerate (recipes/accelerate/), "
            "a smaller model, or more GPUs"
        )


def load_model_and_tokenizer(model_path: str, model_args, use_cpu: bool = False, use_peft: bool = False):
    """The causal LM (on its device, in its dtype) and tokenizer, as the recipes use them."""
    device, dtype = pick_device_and_dtype(model_args, use_cpu)
    if device.type == "cuda":
        check_fits(count_parameters(model_path, model_args.model_revision), dtype,
                   torch.cuda.mem_get_info()[0], use_peft)
    tokenizer = AutoTokenizer.from_pretrained(model_path, revision=model_args.model_revision)
    model = AutoModelForCausalLM.from_pretrained(model_path, revision=model_args.model_revision, dtype=dtype,
                                                 attn_implementation=model_args.attn_implementation)
    logger.info("loaded %s in %s on %s", model_path, str(dtype).removeprefix("torch."), device)
    return model.to(device), tokenizer
