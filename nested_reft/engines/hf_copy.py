"""`OwnWeightsHFEngine`: the in-process Hugging Face engine on its own copy of the policy.

The asynchronous producer (`nested_reft/async_rollouts.py`) samples round n+1 while the trainer
updates the policy on round n, so it cannot sample from the policy's own parameters: it samples
from a copy that receives the weights of the step each round was submitted at, like the vLLM
engines. A PEFT policy is copied merged (plain base-model names, as `changed_weights` sends them).
Samples are drawn with the engine's own generator (`private_rng`), so the trainer's thread and the
producer's never share a random stream. `autocast_dtype`: the mixed precision the trainer's forward
runs under (accelerate wraps the policy's forward in autocast, and autocast is per thread), so the
copy samples with the arithmetic the trainer's π_old uses.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from .hf import HFEngine, completion_logprobs


class OwnWeightsHFEngine(HFEngine):
    shares_policy_weights = False

    def __init__(self, policy: nn.Module, tokenizer, *, autocast_dtype: torch.dtype | None = None, **kwargs):
        model = copy.deepcopy(policy)
        # Instance-level forward wrappers (TRL's fused LM head, accelerate's autocast) are closures
        # over the *original* module, which deepcopy does not rebind: the copy would run the policy.
        # (The autocast they add is restored by `autocast_dtype`.)
        for module in model.modules():
            module.__dict__.pop("forward", None)
        if hasattr(model, "merge_and_unload"):  # PEFT: the merged weights under checkpoint names
            model = model.merge_and_unload()
        model.requires_grad_(False)
        super().__init__(model.eval(), tokenizer, private_rng=True, **kwargs)
        self._params = dict(model.named_parameters())
        self.autocast_dtype = autocast_dtype

    def generate(self, *args, **kwargs):
        if self.autocast_dtype is None:
            return super().generate(*args, **kwargs)
        device = next(self.model.parameters()).device
        with torch.autocast(device.type, dtype=self.autocast_dtype):
            return super().generate(*args, **kwargs)

    def full_model_logprobs(self, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                            temperature: float) -> list[list[float]]:
        """log softmax(logits / T) of the samples under this copy with nothing skipped (the stale policy
        of the log-ratio split), teacher-forced, with the sampler's arithmetic."""
        device = next(self.model.parameters()).device
        with torch.autocast(device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None):
            return completion_logprobs(self.model.eval(), prompt_ids, completion_ids, temperature, self.pad_id,
                                       self.batch_size)

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        unknown = []
        with torch.no_grad():
            for name, tensor in named_tensors:
                param = self._params.get(name)
                if param is None:
                    unknown.append(name)
                    continue
                param.copy_(tensor)
        if unknown:
            raise KeyError(f"{len(unknown)} tensors sent to the engine's copy have no parameter of that name, "
                           f"e.g. {unknown[:3]}")
