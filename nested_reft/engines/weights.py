"""What a rollout engine with its own copy of the policy must receive after an optimizer step."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_adapter")


@contextlib.contextmanager
def changed_weights(model: nn.Module) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The tensors an optimizer step can change, under their checkpoint (Hugging Face) names.

    Plain model: the parameters that require grad (frozen ones never change). PEFT model: the
    LoRA adapters are merged for the duration of the block and the merged weights of the adapted
    modules (plus any `modules_to_save`) are yielded; the adapters are unmerged on exit. The
    tensors are views of live parameters: send them before leaving the block.
    """
    if not _is_peft(model):
        yield [(name, p.detach()) for name, p in model.named_parameters() if p.requires_grad]
        return
    prefix = model.prefix  # "lora_" for LoRA
    adapted = {name.rsplit(".base_layer", 1)[0] for name, _ in model.named_parameters() if ".base_layer." in name}
    model.merge_adapter()
    try:
        out = []
        for name, p in model.named_parameters():
            if prefix in name or "original_module" in name:
                continue
            module = name.rsplit(".", 1)[0].replace(".base_layer", "")
            to_save = "modules_to_save" in name
            if module not in adapted and not to_save:
                continue
            clean = name.removeprefix("base_model.model.").replace(".base_layer", "")
            clean = clean.replace("modules_to_save.default.", "")
            out.append((clean, p.detach()))
        yield out
    finally:
        model.unmerge_adapter()
