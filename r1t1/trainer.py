"""`R1T1Trainer`: the Nested-ReFT trainer (TRL GRPO underneath) with R1-T1's two KL modes.

kl_mode='loss' is TRL's own KL term (`beta` · k3 per token, in the loss). kl_mode='reward' moves
the KL into the reward: each sequence's reward gets `-beta · Σ_t (log π_θ(y_t) − log π_ref(y_t))`
(k1, summed over its completion tokens) before TRL computes group advantages. It is added as one
more reward function, `kl_penalty`, with weight 1: TRL sums weighted reward columns before it
normalises per group, so this is exactly "subtract from the reward before advantages", and TRL
logs it as `rewards/kl_penalty/mean`. TRL's own KL term is switched off in that mode (its `beta`
is set to 0 after TRL has built the reference model). Log-probs are TRL's: at the sampling
temperature, from the full (never layer-skipped) model.
"""

from __future__ import annotations

import inspect

import torch
from trl import GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import pad, use_adapter

from nested_reft.trainer import NestedReFTTrainer

from .config import R1T1Config


class R1T1Trainer(NestedReFTTrainer):
    """Takes every argument of `NestedReFTTrainer` (GRPOTrainer's, positional or by keyword); `args` is an `R1T1Config`."""

    def __init__(self, *args, **kwargs):
        # Bind to GRPOTrainer's signature so positional and keyword calls mean the same thing
        # (GRPOTrainer(model, reward_funcs, args, train_dataset, ...)).
        engine = kwargs.pop("engine", None)  # NestedReFTTrainer's own keyword
        kwargs = dict(inspect.signature(GRPOTrainer.__init__).bind(None, *args, **kwargs).arguments)
        kwargs.pop("self")
        config = kwargs.get("args")
        if not isinstance(config, R1T1Config):
            raise TypeError(f"R1T1Trainer needs an R1T1Config, got {type(config).__name__}")
        self.kl_in_reward = config.kl_mode == "reward" and config.beta > 0
        saved_weights = config.reward_weights
        if self.kl_in_reward:
            funcs = kwargs["reward_funcs"]
            kwargs["reward_funcs"] = (list(funcs) if isinstance(funcs, (list, tuple)) else [funcs]) + [self._kl_penalty_func()]
            if kwargs.get("reward_processing_classes") is not None:
                kwargs["reward_processing_classes"] = list(kwargs["reward_processing_classes"]) + [None]
            if saved_weights is not None:
                config.reward_weights = list(saved_weights) + [1.0]
        try:
            super().__init__(engine=engine, **kwargs)
        finally:
            config.reward_weights = saved_weights
        self._kl_prompt_ids: list[list[int]] | None = None
        if self.kl_in_reward:
            self.kl_beta = self.beta
            self.beta = 0.0  # TRL built the reference model; now keep its KL out of the loss

    # --------------------------------------------------------------------- KL in the reward

    def _generate(self, prompts):
        out = super()._generate(prompts)
        self._kl_prompt_ids = out[0]  # the token ids the completions continue, for the KL forward
        return out

    def _kl_penalty_func(self):
        def kl_penalty(completion_ids, **kwargs) -> list[float]:
            kl = self.sequence_kl(self._kl_prompt_ids, completion_ids)
            return (-self.kl_beta * kl).tolist()

        return kl_penalty

    @torch.no_grad()
    def sequence_kl(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> torch.Tensor:
        """Σ_t (log π_θ(y_t) − log π_ref(y_t)) over each completion's tokens, shape (B,)."""
        if prompt_ids is None or len(prompt_ids) != len(completion_ids):
            raise RuntimeError("kl_penalty is computed from the prompts of the current generation round; "
                               "none matching these completions were recorded")
        device = self.accelerator.device
        tok = self._tokenizer
        p_ids = pad([torch.tensor(x) for x in prompt_ids], padding_value=tok.pad_token_id, padding_side="left").to(device)
        p_mask = pad([torch.ones(len(x), dtype=torch.long) for x in prompt_ids], padding_value=0, padding_side="left").to(device)
        c_ids = pad([torch.tensor(x, dtype=torch.long) for x in completion_ids], padding_value=tok.pad_token_id, padding_side="right").to(device)
        c_mask = pad([torch.ones(len(x), dtype=torch.long) for x in completion_ids], padding_value=0, padding_side="right").to(device)
        ids, mask = torch.cat([p_ids, c_ids], 1), torch.cat([p_mask, c_mask], 1)
        keep, batch = c_ids.size(1), self.args.per_device_train_batch_size
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            policy, _, _ = self._get_per_token_logps_and_entropies(self.model, ids, mask, keep, batch_size=batch)
            if self.ref_model is not None:
                ref, _, _ = self._get_per_token_logps_and_entropies(self.ref_model, ids, mask, keep, batch_size=batch)
            else:  # PEFT: the reference is the base model (adapters off), as in TRL
                model = self.accelerator.unwrap_model(self.model)
                with use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None):
                    ref, _, _ = self._get_per_token_logps_and_entropies(self.model, ids, mask, keep, batch_size=batch)
        kl = ((policy - ref) * c_mask).sum(dim=1)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["kl_reward/sequence_kl"].append(kl.mean().item())
        return kl
