"""Auxiliary losses a model family computes in its backbone, added where TRL's trainers drop them.

TRL's GRPO and SFT trainers score tokens through their fused LM head, which calls the backbone
(`model.base_model`) directly and adds an auxiliary loss only for Mixture-of-Experts configs
(`output_router_logits`, Mixtral's load-balancing loss). DTRNet's router loss (SPEC §5) comes out
of its backbone as `router_loss` and would never reach the optimizer: the router would then learn
from the language-model loss alone. `BackboneAuxLossMixin` catches it with a forward hook on the
backbone during `compute_loss` and adds `coefficient · router_loss`, scaled for gradient
accumulation the way TRL scales its own MoE loss.

A backbone declares its loss with two class attributes: `auxiliary_loss_output` (the output field)
and `auxiliary_loss_coef` (the config field holding its coefficient).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def captured_auxiliary_losses(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Coefficient-weighted auxiliary losses of every backbone forward (with gradient) in the block."""
    found: list[torch.Tensor] = []
    handles = []
    for module in model.modules():
        field = getattr(type(module), "auxiliary_loss_output", None)
        if field is None:
            continue
        coef = float(getattr(module.config, type(module).auxiliary_loss_coef))

        def hook(mod, args, output, field=field, coef=coef):
            loss = getattr(output, field, None)
            if loss is not None and loss.requires_grad and coef != 0.0:
                found.append(coef * loss)

        handles.append(module.register_forward_hook(hook))
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


def has_auxiliary_loss(model: nn.Module) -> bool:
    return any(getattr(type(m), "auxiliary_loss_output", None) for m in model.modules())


class BackboneAuxLossMixin:
    """Adds the backbone's auxiliary loss to a TRL trainer's `compute_loss` (training only), and
    logs it as `aux_loss/backbone` (already weighted by its coefficient)."""

    def _auxiliary_loss_normalizer(self, model: nn.Module, num_items_in_batch) -> float:
        raise NotImplementedError

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with captured_auxiliary_losses(model) as found:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
        if not found or not model.training:
            return result
        aux = torch.stack(found).mean()  # one value per micro-chunk forward, as TRL averages its MoE loss
        self._metrics["train"]["aux_loss/backbone"].append(float(aux.detach()))
        extra = aux / self._auxiliary_loss_normalizer(model, num_items_in_batch)
        if return_outputs:
            loss, outputs = result
            return loss + extra.to(loss.dtype), outputs
        return result + extra.to(result.dtype)


class GRPOAuxLossMixin(BackboneAuxLossMixin):
    def _auxiliary_loss_normalizer(self, model, num_items_in_batch) -> float:
        # GRPO's policy loss is already divided by the accumulation steps (TRL turns HF's scaling off)
        return float(self.current_gradient_accumulation_steps)
