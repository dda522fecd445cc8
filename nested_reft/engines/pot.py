"""PoT behavior model: rollouts sampled by a power-of-two-quantized copy of the policy.

A third family of behavior model next to layer skipping (SPEC.md §10): `PoTBehaviorModel` keeps
a deep copy of the policy whose linear layers are `PoTLinear` (init-only grid-searched scales by
default: no calibration, a few ms per layer) and re-quantizes it from the policy's current
weights. `PoTHFEngine` is an `HFEngine` whose sampler is that copy; it always returns behavior
log-probs (of the quantized copy, at the sampling temperature), which the trainer's off-policy
correction needs because they differ from π_old.

Staleness: the trainer calls `load_weights` with the changed tensors after every optimizer step.
Standalone, `auto_sync=True` makes `generate()` re-quantize whenever a policy parameter's version
counter moved (plain in-place updates; fused optimizer kernels do not bump it, so a training loop
must call `load_weights` / `sync()` itself).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from reft_kernels.pot.linear import PoTLinear
from reft_kernels.pot.quantize import quantize_model
from reft_kernels.pot.search import grid_search_scales

from .base import Rollouts, SamplingSpec
from .hf import HFEngine


class PoTBehaviorModel:
    """A PoT-quantized copy of `policy`; `sync()` re-quantizes it from the policy's weights."""

    def __init__(self, policy: nn.Module, bits: int = 4, group_size: int = 128, skip=("lm_head",),
                 backend: str = "auto"):
        self.policy = policy
        self.bits, self.group_size = bits, group_size
        model = copy.deepcopy(policy)
        model.requires_grad_(False)
        self.model = quantize_model(model, bits, group_size, refine=False, skip=skip, backend=backend,
                                    progress=False).eval()
        self.quantized = {n for n, m in self.model.named_modules() if isinstance(m, PoTLinear)}
        self._versions = self._policy_versions()

    def _policy_versions(self) -> tuple[int, ...]:
        return tuple(p._version for p in self.policy.parameters())

    @property
    def stale(self) -> bool:
        """True when a policy parameter was updated in place since the last sync."""
        return self._policy_versions() != self._versions

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Re-quantize / copy from (name, tensor) pairs named as in `policy.named_parameters()`.

        Quantized layers take `<layer>.weight` through grid search; every other tensor (norms,
        embeddings, biases, lm_head) is copied. Returns the number of tensors taken."""
        modules = dict(self.model.named_modules())
        own = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        taken = 0
        for name, tensor in named_tensors:
            layer, _, leaf = name.rpartition(".")
            if layer in self.quantized and leaf == "weight":
                mod = modules[layer]
                w = tensor.detach().to(mod.packed.device, torch.float32)
                mod.set_weight(w, grid_search_scales(w, self.bits, self.group_size, rounding=mod.rounding))
            elif layer in self.quantized and leaf == "bias":
                modules[layer].bias.copy_(tensor.detach())
            elif name in own:
                own[name].copy_(tensor.detach())
            else:
                raise KeyError(f"{name!r} is not a parameter of the behavior model "
                               f"({type(self.model).__name__})")
            taken += 1
        return taken

    def sync(self) -> None:
        """Re-quantize from the policy's current parameters."""
        self.load_weights(self.policy.named_parameters())
        self._versions = self._policy_versions()


class PoTHFEngine(HFEngine):
    """`HFEngine` sampling from a PoT-quantized copy of the policy (optionally also layer-skipped).

    Behavior log-probs are always those of the quantized copy's sampler (`score_logprobs` is forced on).
    The copy has its own weights, so the trainer pushes the changed ones after each optimizer step
    (`load_weights`), as for vLLM: version counters alone are not enough, because fused optimizers
    (transformers' default `adamw_torch_fused`) update parameters without bumping them."""

    shares_policy_weights = False

    def __init__(self, policy: nn.Module, tokenizer, *, bits: int = 4, group_size: int = 128,
                 auto_sync: bool = True, eos_token_ids: Iterable[int] | None = None,
                 batch_size: int = 64, skip=("lm_head",), backend: str = "auto", compact_every: int = 0):
        self.behavior = PoTBehaviorModel(policy, bits, group_size, skip=skip, backend=backend)
        self.auto_sync = auto_sync
        super().__init__(self.behavior.model, tokenizer, eos_token_ids=eos_token_ids,
                         batch_size=batch_size, score_logprobs=True, compact_every=compact_every)

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingSpec, *, ignore_eos: bool = False) -> Rollouts:
        if self.auto_sync and self.behavior.stale:
            self.behavior.sync()
        return super().generate(prompt_token_ids, sampling, ignore_eos=ignore_eos)

    def load_weights(self, named_tensors) -> None:
        """Re-quantize the sampler from (name, tensor) pairs of the policy (after a weight sync)."""
        self.behavior.load_weights(named_tensors)
        self.behavior._versions = self.behavior._policy_versions()

    def sync(self) -> None:
        self.behavior.sync()
