"""fp32 master weights for half-precision parameters (bf16/fp16 full fine-tunes).

AdamW stepping bf16 parameters directly keeps bf16 moments and rounds every update to the weight's
bf16 resolution (about 2⁻⁸ of its magnitude): at RL learning rates (1e-6) an update is 10-100×
smaller than that, so about 2% of the weights change in a step and a fifth of the intended update
lands. `MasterWeightAdamW` keeps an fp32 copy of each half-precision parameter, steps AdamW on the
copies (fp32 moments, fp32 gradients) and writes the copy back rounded to the parameter's dtype:
the model still computes in bf16 (the sampler and the trainer see the same weights), and every
update accumulates in fp32 until it moves the bf16 value. This is what DeepSpeed's and Megatron's
bf16 optimizers do; with DeepSpeed the engine's own optimizer already does it and this is not used.

Memory per half-precision parameter: 2 (weight) + 2 (gradient) + 4 (master) + 8 (moments) = 16 bytes.
"""

from __future__ import annotations

import torch

HALF = (torch.bfloat16, torch.float16)


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW over fp32 masters of the half-precision parameters in `param_groups` (fp32
    parameters are stepped as they are). Hyperparameters, param groups (so LR schedulers) and the
    state dict behave as AdamW's; the state dict also holds the masters, so a resumed run keeps
    the updates the half-precision copy has not shown yet."""

    def __init__(self, param_groups, **defaults):
        self.model_params: list[torch.nn.Parameter] = []
        self.masters: list[torch.Tensor] = []
        groups = []
        for group in param_groups:
            masters = []
            for p in group["params"]:
                if p.dtype in HALF:
                    master = p.detach().clone().float().requires_grad_(p.requires_grad)
                    self.model_params.append(p)
                    self.masters.append(master)
                    masters.append(master)
                else:
                    masters.append(p)
            groups.append({**group, "params": masters})
        super().__init__(groups, **defaults)

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer) -> MasterWeightAdamW:
        """The same param groups and hyperparameters as `optimizer` (an AdamW), with fp32 masters."""
        if type(optimizer) is not torch.optim.AdamW:
            raise TypeError(f"half-precision parameters need fp32 master weights, which are provided for torch.optim.AdamW "
                            f"only, not {type(optimizer).__name__}: use optim='adamw_torch', load the model in float32 "
                            "(--dtype float32 with --bf16 true), LoRA, or DeepSpeed (its bf16 optimizer keeps fp32 masters)")
        keys = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable",
                "differentiable", "fused")
        defaults = {k: optimizer.defaults[k] for k in keys if k in optimizer.defaults}
        return cls(optimizer.param_groups, **defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for p, master in zip(self.model_params, self.masters):
            master.grad = None if p.grad is None else p.grad.float()
        loss = super().step(closure)
        for p, master in zip(self.model_params, self.masters):
            p.copy_(master)  # rounded to the parameter's dtype
            master.grad = None  # the trainer zeroes the model's gradients, not these
        return loss

    def zero_grad(self, set_to_none: bool = True):
        super().zero_grad(set_to_none)
        for p in self.model_params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_dict(self):
        state = super().state_dict()
        state["master_weights"] = [m.detach().clone() for m in self.masters]
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        saved = state_dict.pop("master_weights", None)
        if saved is not None and len(saved) != len(self.masters):
            raise ValueError(f"the checkpoint's optimizer holds {len(saved)} master weights, this model "
                             f"{len(self.masters)}: it was saved for another model or trainable set")
        super().load_state_dict(state_dict)
        with torch.no_grad():
            if saved is None:  # a checkpoint of a plain optimizer: the masters start from the weights
                for p, master in zip(self.model_params, self.masters):
                    master.copy_(p.float())
                return
            for master, value in zip(self.masters, saved):
                master.copy_(value)


def needs_master_weights(model: torch.nn.Module) -> bool:
    """Whether any trainable parameter is bf16/fp16."""
    return any(p.requires_grad and p.dtype in HALF for p in model.parameters())


class MasterWeightsMixin:
    """A TRL/transformers trainer whose optimizer keeps fp32 masters of half-precision trainable
    parameters (not with DeepSpeed, whose bf16 optimizer already does, nor FSDP)."""

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or not needs_master_weights(self.model):
            return optimizer
        if not isinstance(optimizer, MasterWeightAdamW):
            self.optimizer = optimizer = MasterWeightAdamW.from_optimizer(optimizer)
        return optimizer
