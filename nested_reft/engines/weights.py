"""What a rollout engine with its own copy of the policy must receive after an optimizer step."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

# Projections vLLM stores as one fused parameter (its `packed_modules_mapping` for Llama-style
# models). vLLM reloads a fused layer whole: a member that is not sent is left as uninitialised
# memory (values like 5e37 or NaN), so when one member changes, every member is sent.
FUSED_GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_adapter")


def with_fused_siblings(modules: set[str]) -> set[str]:
    """`modules` (dotted module names) plus the other members of every fused group one belongs to."""
    out = set(modules)
    for module in modules:
        parent, _, leaf = module.rpartition(".")
        for group in FUSED_GROUPS:
            if leaf in group:
                out.update(f"{parent}.{member}" if parent else member for member in group)
    return out


def _checkpoint_name(name: str) -> str:
    """A PEFT parameter name as the base model's checkpoint names it."""
    name = name.removeprefix("base_model.model.").replace(".base_layer", "")
    return name.replace("modules_to_save.default.", "")


@contextlib.contextmanager
def changed_weights(model: nn.Module) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The tensors an optimizer step can change, under their checkpoint (Hugging Face) names,
    with every member of a fused group (`FUSED_GROUPS`) one of whose members changed.

    Plain model: the parameters of the modules with a parameter that requires grad (frozen
    modules never change). PEFT model: the LoRA adapters are merged for the duration of the block
    and the merged weights of the adapted modules (plus any `modules_to_save`) are yielded; the
    adapters are unmerged on exit. The tensors are views of live parameters: send them before
    leaving the block.
    """
    if not _is_peft(model):
        changed = {name.rpartition(".")[0] for name, p in model.named_parameters() if p.requires_grad}
        send = with_fused_siblings(changed)
        yield [(name, p.detach()) for name, p in model.named_parameters() if name.rpartition(".")[0] in send]
        return
    prefix = model.prefix  # "lora_" for LoRA
    params = [(name, p) for name, p in model.named_parameters() if prefix not in name and "original_module" not in name]
    changed = {_checkpoint_name(name).rpartition(".")[0] for name, _ in params
               if ".base_layer." in name or "modules_to_save" in name}
    send = with_fused_siblings(changed)
    model.merge_adapter()
    try:
        yield [(_checkpoint_name(name), p.detach()) for name, p in params
               if _checkpoint_name(name).rpartition(".")[0] in send]
    finally:
        model.unmerge_adapter()
