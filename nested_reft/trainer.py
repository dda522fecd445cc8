"""`NestedReFTTrainer`: TRL's GRPOTrainer with layer-skipped behavior rollouts (SPEC §1).

Per generation round: draw the skip set, sample through the rollout engine (which also returns
the behavior log-probs), let TRL score and compute group advantages, compute π_old with the full
model, and fold the correction weights w_t into per-token advantages. Because w_t >= 0,
`-min(ρ A w, clip(ρ) A w) = w · -min(ρ A, clip(ρ) A)`: this is exactly the SPEC's weighted
per-token loss, through TRL's own support for (B, T) advantages, with every loss type, the KL
term (unweighted, as in TRL), logging, checkpoints and PEFT left to TRL.
"""

from __future__ import annotations

import json
import logging
import os
import time

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing

from .config import NestedReFTConfig
from .controller import AdaptiveSkipController
from .corrections import correction_weights, diagnostics
from .engines import RolloutEngine, SamplingSpec
from .engines.factory import build_engine
from .engines.weights import changed_weights
from .skipping import LayerSkipPolicy, num_decoder_layers, skip_layers

logger = logging.getLogger(__name__)


class NestedReFTTrainer(GRPOTrainer):
    """GRPO with rollouts from a layer-skipped copy of the policy, corrected off-policy.

    Takes every argument of `trl.GRPOTrainer`; `args` is a `NestedReFTConfig`. `engine` may be
    any `RolloutEngine`; by default the one `args.engine` names (`hf`: an in-process `HFEngine`
    sharing the policy's weights; `vllm` / `vllm_server`: an engine with its own copy of the
    weights, synced before the first generation after each optimizer step, as TRL does).
    """

    def __init__(self, *args, engine: RolloutEngine | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, NestedReFTConfig):
            raise TypeError(f"NestedReFTTrainer needs a NestedReFTConfig, got {type(self.args).__name__}")
        a = self.args
        policy = self.accelerator.unwrap_model(self.model)
        k_range = (a.skip_k_min, a.skip_k_max) if a.skip_k_min is not None else None
        self.skip_policy = LayerSkipPolicy(
            num_decoder_layers(policy), skip_ratio=a.skip_ratio, keep_first=a.keep_first,
            keep_last=a.keep_last, mode=a.skip_mode, layers=a.skip_layers, k_range=k_range,
            seed=a.seed if a.skip_seed is None else a.skip_seed,
        )
        self.skip_controller = None
        if a.correction == "ess_adaptive":
            self.skip_controller = AdaptiveSkipController(
                a.skip_ratio, a.ess_target, a.ess_band, a.skip_ratio_min, a.skip_ratio_max, a.skip_ratio_step
            )
        truncating = bool(self.top_k) or (self.top_p is not None and self.top_p < 1.0)
        self.engine = engine or build_engine(a, policy, self._tokenizer, self.eos_token_ids, truncating)
        self._synced_step: int | None = None
        self._round = 0
        self._round_skip: tuple[int, ...] = ()
        self._full_tokens_per_s: float | None = None

    # ------------------------------------------------------------------ generation

    def _sampling(self) -> SamplingSpec:
        seed = self.args.seed * 1_000_003 + self._round * 101 + self.accelerator.process_index
        return SamplingSpec(max_new_tokens=self.max_completion_length, temperature=self.temperature,
                            top_k=self.top_k or 0, top_p=self.top_p if self.top_p is not None else 1.0,
                            seed=seed)

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if images is not None and any(img is not None for img in images) or multimodal_fields:
            raise ValueError("Nested-ReFT rollout engines generate text only; this batch has images")
        mode = "train" if self.model.training else "eval"
        self._sync_engine_weights(mode)
        skip = self.skip_policy.draw() if mode == "train" else ()  # evaluation uses the target model
        self.engine.set_skip(skip)
        self._round_skip = skip
        sampling = self._sampling()
        rollouts = self.engine.generate(prompt_ids, sampling)
        metrics = self._metrics[mode]
        metrics["rollout/skipped_layers"].append(float(len(skip)))
        metrics["rollout/behavior_tokens_per_s"].append(rollouts.tokens_per_s)
        metrics["rollout/generate_seconds"].append(rollouts.generate_seconds)
        metrics["rollout/logprob_seconds"].append(rollouts.logprob_seconds)
        if mode == "train":
            every = self.args.full_model_probe_every
            if not skip:
                self._full_tokens_per_s = rollouts.tokens_per_s
            elif every and self._round % every == 0:
                self._full_tokens_per_s = self._probe_full_model(prompt_ids, sampling)
            if self._full_tokens_per_s is not None:
                metrics["rollout/full_tokens_per_s"].append(self._full_tokens_per_s)
            logger.info("round %d: skipped layers %s, %d tokens at %.0f tokens/s", self._round,
                        list(skip), rollouts.num_tokens, rollouts.tokens_per_s)
            self._round += 1
        return rollouts.completion_ids, rollouts.logprobs

    def _sync_engine_weights(self, mode: str) -> None:
        """Push what the optimizer changed to an engine with its own weights, once per global step
        (the first generation after an optimizer step; also once before the first round)."""
        if self.engine.shares_policy_weights or self._synced_step == self.state.global_step:
            return
        start = time.perf_counter()
        with changed_weights(self.accelerator.unwrap_model(self.model)) as named:
            self.engine.load_weights(named)
            count = len(named)
        seconds = time.perf_counter() - start
        self._synced_step = self.state.global_step
        self._metrics[mode]["rollout/weight_sync_seconds"].append(seconds)
        logger.info("step %d: synced %d tensors to the %s engine in %.3f s", self.state.global_step, count,
                    type(self.engine).__name__, seconds)

    def _probe_full_model(self, prompt_ids, sampling: SamplingSpec) -> float:
        """Time the full model on the same prompts (samples discarded) for the tokens/s comparison."""
        skip = self.engine.skip
        self.engine.set_skip(())
        try:
            return self.engine.generate(prompt_ids, sampling).tokens_per_s
        finally:
            self.engine.set_skip(skip)

    # ------------------------------------------------------------------ correction

    @torch.no_grad()
    def _policy_logps(self, output: dict) -> torch.Tensor:
        """Per-token log-probs of the completions under `self.model` as it is now (TRL's forward)."""
        ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            logps, _, _ = self._get_per_token_logps_and_entropies(
                self.model, ids, mask, output["completion_ids"].size(1),
                batch_size=self.args.per_device_train_batch_size,
            )
        return logps

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if not self.model.training:
            return output
        start = time.perf_counter()
        mask = output["completion_mask"]
        if "tool_mask" in output:
            mask = mask * output["tool_mask"]
        old = output.get("old_per_token_logps")
        behavior = output.get("sampling_per_token_logps")
        if old is None and behavior is None and not self._round_skip:
            # μ is π_old itself (same weights, nothing skipped): d_t = 0 exactly, no forward needed
            old = behavior = torch.zeros_like(mask, dtype=torch.float32)
        if old is None:  # TRL skips it when π_old equals the policy at loss time; we need it for w_t
            old = self._policy_logps(output)
        if behavior is None:  # an engine that shares our weights: score with the same forward as π_old
            if self._round_skip:
                with skip_layers(self.model, self._round_skip):
                    behavior = self._policy_logps(output)
            else:
                behavior = old
        a = self.args
        weights = correction_weights(old, behavior, mask, a.correction, clip=a.clip, lam=a.lam)
        stats = diagnostics(old, behavior, mask, weights, a.correction, clip=a.clip)
        advantages = output["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        output["advantages"] = advantages * weights.to(advantages.dtype)
        metrics = self._metrics["train"]
        for key, value in stats.items():
            metrics[f"correction/{key}"].append(value)
        metrics["correction/seconds"].append(time.perf_counter() - start)
        metrics["rollout/skip_ratio"].append(self.skip_policy.k_range[1] / self.skip_policy.num_layers)
        if self.skip_controller is not None:
            self.skip_policy.set_skip_ratio(self.skip_controller.update(stats["ess"]))
        return output

    # ------------------------------------------------------------------ checkpoints

    SKIP_STATE_FILE = "nested_reft_state.json"

    def _save_checkpoint(self, model, trial):
        """Also save the skip policy (RNG and history), round counter and controller, so a resumed
        run draws the same skip sets as an uninterrupted one."""
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            state = {"skip_policy": self.skip_policy.state_dict(), "round": self._round,
                     "skip_ratio": self.skip_controller.ratio if self.skip_controller else None}
            with open(os.path.join(folder, self.SKIP_STATE_FILE), "w") as f:
                json.dump(state, f)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, self.SKIP_STATE_FILE) if checkpoint else None
        if path and os.path.exists(path):
            with open(path) as f:
                state = json.load(f)
            self.skip_policy.load_state_dict(state["skip_policy"])
            self._round = state["round"]
            if self.skip_controller is not None and state["skip_ratio"] is not None:
                self.skip_controller.ratio = state["skip_ratio"]
                self.skip_policy.set_skip_ratio(state["skip_ratio"])
