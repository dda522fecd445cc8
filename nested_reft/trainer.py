"""`NestedReFTTrainer`: TRL's GRPOTrainer with layer-skipped behavior rollouts (SPEC §1).

Per generation round: draw the skip set, sample through the rollout engine (which also returns
the behavior log-probs), let TRL score and compute group advantages, compute π_old with the full
model, and fold the correction weights w_t into per-token advantages. Because w_t >= 0,
`-min(ρ A w, clip(ρ) A w) = w · -min(ρ A, clip(ρ) A)`: this is exactly the SPEC's weighted
per-token loss, through TRL's own support for (B, T) advantages, with every loss type, the KL
term (unweighted, as in TRL), logging, checkpoints and PEFT left to TRL.

TRL's hooks this class overrides, in the order they run in one training step:

0. `get_batch_samples` (transformers'; with `async_rollouts` ours reads the data iterator ahead so
   the producer can sample the coming rounds: `async_rollouts.py`);
1. `training_step` (TRL's, then ours: flags a non-finite loss for the optimizer guard) calls
2. `_prepare_inputs` — on the first micro-step of a round TRL calls
3. `_generate_and_score_completions`, which calls
4. `_generate` (ours: wake the engine, open the round: sync weights, draw and set the skip set;
   with `async_rollouts`: take the round the producer sampled ahead and submit the next ones;
   close it: round metrics, the full-model probe), which calls, once per turn (tool calls add turns),
5. `_generate_single_turn` (ours: the engine samples, returning tokens and μ; asynchronous: the
   producer's samples);
   back in `_generate_and_score_completions` TRL computes rewards (`_calculate_rewards`, ours:
   inf made NaN, counted) and advantages, then ours adds π_old (dropout off), the finiteness
   check, the correction weights and the diagnostics (asynchronous: the log-ratio split into
   staleness and skipping); with `filter_groups` ours repeats 3-5 for
   more prompts until the round's groups all carry signal (`dynamic_sampling.py`);
   back in `_prepare_inputs` TRL splits the round into batches (ours trims unused padding);
6. `compute_loss` (TRL's `_compute_loss`, plus a backbone's auxiliary loss: `aux_loss.py`), then
   the optimizer step through the guard of `create_optimizer` (skips non-finite steps; fp32
   master weights for half-precision parameters: `master_weights.py`);
7. `_save_checkpoint` / `_load_optimizer_and_scheduler` (private; overridden because the skip
   policy's RNG, the round counter and a round's remaining batches must be saved and restored
   with the step, and TRL's `_buffered_inputs` lives outside transformers' callback state; the
   producer's rounds in flight are saved with them).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import time
import types

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing, unwrap_model_for_generation
from trl.trainer.utils import is_async_callable

from .async_rollouts import AsyncRolloutsMixin
from .aux_loss import GRPOAuxLossMixin
from .config import NestedReFTConfig
from .controller import AdaptiveSkipController
from .corrections import correction_weights, diagnostics
from .dynamic_sampling import (
    concat_outputs,
    informative_groups,
    refill_prompts,
    refill_size,
    select_groups,
)
from .engines import RolloutEngine, RolloutEngineUnavailable, SamplingSpec
from .engines.base import MAX_TURNS, round_seed
from .engines.factory import build_engine
from .engines.hf_copy import OwnWeightsHFEngine
from .engines.weights import changed_weights
from .master_weights import MasterWeightAdamW, MasterWeightsMixin
from .reward_guard import GuardedReward
from .round_buffer import LEGACY_PICKLE_FILE, has_round_buffer, load_round_buffer, save_round_buffer
from .skipping import LayerSkipPolicy, num_decoder_layers, skip_layers, skippable_layers

logger = logging.getLogger(__name__)

# Tensors of a training batch with one column per completion token.
PER_COMPLETION_TOKEN = ("completion_ids", "completion_mask", "advantages", "old_per_token_logps",
                        "ref_per_token_logps", "sampling_per_token_logps", "importance_sampling_ratio", "tool_mask")


def has_active_dropout(model: torch.nn.Module) -> bool:
    """Whether a forward in train mode is random: a dropout module with p > 0 (LoRA's among them) or
    attention dropout in the config."""
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        return True
    config = getattr(model, "config", None)
    return bool(getattr(config, "attention_dropout", 0.0) or 0.0)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def trim_completion_padding(inputs: dict) -> dict:
    """Drop the trailing completion columns that no row of this batch uses.

    TRL pads a whole generation round to its longest completion, so every optimizer step of the
    round trains on that width even when its own rows are shorter. Trailing columns are masked
    out of every loss and metric and, being after every real token, never seen by one under the
    causal mask: dropping them changes no number, and a round with one long completion then
    costs its length in one step instead of in all of them.
    """
    mask = inputs["completion_mask"]
    used = mask.any(dim=0).nonzero()
    width = int(used[-1]) + 1 if used.numel() else 1
    if width == mask.size(1):
        return inputs
    trimmed = dict(inputs)
    for key in PER_COMPLETION_TOKEN:
        value = inputs.get(key)
        if torch.is_tensor(value) and value.dim() == 2 and value.size(1) == mask.size(1):
            trimmed[key] = value[:, :width]
    return trimmed


class NestedReFTTrainer(AsyncRolloutsMixin, GRPOAuxLossMixin, MasterWeightsMixin, GRPOTrainer):
    """GRPO with rollouts from a layer-skipped copy of the policy, corrected off-policy.

    Takes every argument of `trl.GRPOTrainer`; `args` is a `NestedReFTConfig`. `engine` may be
    any `RolloutEngine`; by default the one `args.engine` names (`hf`: an in-process `HFEngine`
    sharing the policy's weights; `vllm` / `vllm_server`: an engine with its own copy of the
    weights, synced before the first generation after each optimizer step, as TRL does).

    A generation round is one call of TRL's `_generate`: the skip set is drawn once per round and
    every turn of it (tool calls make several) samples with that set, so μ is one model.

    When the engine's server goes away for good (`RolloutEngineUnavailable`, after the engine's
    retries), the trainer saves a checkpoint of the last completed optimizer step and stops with
    one error naming the server; rerunning the same command resumes from it.
    """

    def __init__(self, *args, engine: RolloutEngine | None = None, **kwargs):
        bound = inspect.signature(GRPOTrainer.__init__).bind_partial(None, *args, **kwargs).arguments
        if bound.get("rollout_func") is not None:
            raise ValueError("rollout_func samples outside the Nested-ReFT engine, so the behavior model and its "
                             "log-probs would not be the ones corrected for; use tools, or GRPOTrainer for rollout_func")
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, NestedReFTConfig):
            raise TypeError(f"NestedReFTTrainer needs a NestedReFTConfig, got {type(self.args).__name__}")
        a = self.args
        # plain reward functions cost one sample, not the run, when they raise or hang
        self.reward_funcs = [GuardedReward(f, a.reward_timeout)
                             if callable(f) and not isinstance(f, torch.nn.Module) and not is_async_callable(f)
                             else f for f in self.reward_funcs]
        policy = self.accelerator.unwrap_model(self.model)
        k_range = (a.skip_k_min, a.skip_k_max) if a.skip_k_min is not None else None
        self.skip_policy = LayerSkipPolicy(
            num_decoder_layers(policy), skip_ratio=a.skip_ratio, keep_first=a.keep_first,
            keep_last=a.keep_last, mode=a.skip_mode, layers=a.skip_layers, k_range=k_range,
            seed=a.seed if a.skip_seed is None else a.skip_seed, skippable=skippable_layers(policy),
        )
        self.skip_controller = None
        if a.correction == "ess_adaptive":
            self.skip_controller = AdaptiveSkipController(
                self.skip_policy.mean_skip_ratio, a.ess_target, a.ess_band, a.skip_ratio_min, a.skip_ratio_max,
                a.skip_ratio_step,
            )
        if engine is None and a.async_rollouts and a.engine == "hf":  # the producer samples from its own copy
            autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(self.accelerator.mixed_precision))
            engine = OwnWeightsHFEngine(policy, self._tokenizer, eos_token_ids=self.eos_token_ids, autocast_dtype=autocast,
                                        batch_size=a.rollout_batch_size, compact_every=a.rollout_compact_every,
                                        cache_implementation=a.cache_implementation)
        self.engine = engine or build_engine(a, policy, self._tokenizer, self.eos_token_ids)
        self._check_fixed_k_engine()
        self._synced_step: int | None = None
        self._round = 0
        self._round_skip: tuple[int, ...] = ()
        self._round_open = False
        self._turn = 0
        self._round_stats: dict[str, float] = {}
        self._round_start_policy: dict | None = None  # the skip policy before this round's draw
        self._probe_due = bool(a.full_model_probe_every)
        self._nonfinite_pending = False  # a micro-batch of this optimizer step had a NaN/inf loss
        self.nonfinite_steps_skipped = 0
        self.nonfinite_rounds_skipped = 0
        self._round_steps_to_skip = 0  # optimizer steps of a round dropped for non-finite μ
        self._idle_steps = {"nonfinite": 0, "zero_gradient": 0, "skipped_round": 0}  # consecutive, by cause
        # π_old and a re-scored μ are computed with dropout off, as the sampler runs
        self._dropout_active = has_active_dropout(policy)
        self._row_rewards: torch.Tensor | None = None  # the last scored rows' weighted rewards
        self._init_async(bound.get("tools"))
        if a.filter_groups and self.accelerator.num_processes > 1:
            raise ValueError(f"filter_groups=True runs in one training process; this run has {self.accelerator.num_processes} "
                             "(each would keep a different number of groups)")

    def _check_fixed_k_engine(self) -> None:
        """A compiled server holds L - k layers for one k: refuse, before training starts, a skip
        policy that draws other sizes and anything that needs the full model from it."""
        k = getattr(self.engine, "server_k", None)
        if k is None:
            return
        a, drawn = self.args, self.skip_policy.k_range
        if drawn != (k, k) or self.skip_controller is not None:
            sizes = "k steered by correction='ess_adaptive'" if self.skip_controller else f"k in {list(drawn)}"
            raise ValueError(f"the vLLM server serves the compact compiled model for k={k} skipped layers, but this "
                             f"run draws {sizes}: set skip_ratio so that round(skip_ratio * "
                             f"{self.skip_policy.num_layers}) = {k} (or skip_k_min = skip_k_max = {k}), or start the "
                             "server with --eager for skip sets of any size")
        if k and (a.full_model_probe_every or a.eval_strategy != "no"):
            needs = "the full-model probe (full_model_probe_every)" if a.full_model_probe_every else "evaluation"
            raise ValueError(f"{needs} samples with the full model, which the vLLM server serving the compact "
                             f"compiled model for k={k} cannot run: set full_model_probe_every=0 and "
                             "eval_strategy='no' (evaluate afterwards with the HF engine), or start the server with "
                             "--eager")

    # ------------------------------------------------------------------ generation

    def _sampling(self, turn: int, max_new_tokens: int | None = None, round_index: int | None = None) -> SamplingSpec:
        """Turn `turn` of this round (or of round `round_index`) on this rank gets seeds no other
        (round, turn, rank) shares."""
        round_index = self._round if round_index is None else round_index
        seed = round_seed(self.args.seed, round_index, self.accelerator.process_index, turn)
        return SamplingSpec(max_new_tokens=max_new_tokens or self.max_completion_length,
                            temperature=self.temperature, top_k=self.top_k or 0,
                            top_p=self.top_p if self.top_p is not None else 1.0, min_p=self.min_p or 0.0,
                            repetition_penalty=self.repetition_penalty, seed=seed)

    def _generate(self, prompts: list):
        mode = "train" if self.model.training else "eval"
        if self.engine.sleep_enabled:  # the colocated engine slept through the optimizer step
            self.engine.wake_up()
        with self._whole_policy_for_sampling():
            if self.args.async_rollouts and mode == "train":  # sampled ahead by the producer
                self._open_async_round(prompts)
            else:
                self._begin_round(mode)
            try:
                output = super()._generate(prompts)
            finally:
                self._round_open = False
            self._end_round(mode, output[0])
        if self.engine.sleep_enabled:  # hand its GPU memory to the backward pass until the next round
            self.engine.sleep(level=1)
        return output

    def _whole_policy_for_sampling(self):
        """Under ZeRO-3 an engine sampling from the policy's own parameters would see this rank's
        shards: gather the whole policy on every rank for the round (TRL's helper, as TRL does for
        its own generation), once, so no rank's sampling waits on another's."""
        if not (self._dist.is_zero3 and self.engine.shares_policy_weights):
            return contextlib.nullcontext()
        return unwrap_model_for_generation(self.model_wrapped, self.accelerator, gather_deepspeed3_params=True,
                                           gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs)

    def _begin_round(self, mode: str) -> None:
        self._round_start_policy = self.skip_policy.state_dict()
        self._sync_engine_weights(mode)
        skip = self.skip_policy.draw() if mode == "train" else ()  # evaluation uses the target model
        if mode == "train" and self.accelerator.num_processes > 1:
            self._check_same_skip_on_all_ranks(skip)
        self._engine_call(self.engine.set_skip, skip)
        if hasattr(self.engine, "last_load_seconds"):  # the compiled engine: this round's weights into its slots
            self._metrics[mode]["rollout/weight_load_seconds"].append(self.engine.last_load_seconds)
        self._round_skip = skip
        self._round_open, self._turn = True, 0
        self._round_stats = {"tokens": 0, "generate_seconds": 0.0, "logprob_seconds": 0.0}

    def _check_same_skip_on_all_ranks(self, skip: tuple[int, ...]) -> None:
        from accelerate.utils import gather_object

        sets = gather_object([skip])
        if any(tuple(s) != tuple(skip) for s in sets):
            raise RuntimeError(f"ranks drew different skip sets in round {self._round}: {sets}")

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if images is not None and any(img is not None for img in images) or multimodal_fields:
            raise ValueError("Nested-ReFT rollout engines generate text only; this batch has images")
        if not self._round_open:
            raise RuntimeError("_generate_single_turn runs inside a generation round (NestedReFTTrainer._generate)")
        if self._async_job is not None:
            return self._async_rollouts_for(prompt_ids)
        try:
            rollouts = self._engine_call(self.engine.generate, prompt_ids, self._sampling(self._turn))
        except torch.OutOfMemoryError as e:
            raise torch.OutOfMemoryError(self._generation_oom_message(len(prompt_ids))) from e
        self._turn += 1
        stats = self._round_stats
        stats["tokens"] += rollouts.num_tokens
        stats["generate_seconds"] += rollouts.generate_seconds
        stats["logprob_seconds"] += rollouts.logprob_seconds
        return rollouts.completion_ids, rollouts.logprobs

    def _generation_oom_message(self, num_prompts: int) -> str:
        a = self.args
        options = [f"fewer prompts per generate() call (rollout_batch_size={a.rollout_batch_size})",
                   f"shorter completions (max_completion_length={self.max_completion_length})"]
        if a.engine == "hf":
            options += [f"compaction of finished rows (rollout_compact_every={a.rollout_compact_every}; 32 is the default)",
                        "engine='vllm' (paged KV cache) or LoRA (use_peft) to free the optimizer's memory"]
        elif a.engine == "vllm":
            options += [f"a smaller vllm_gpu_memory_utilization ({a.vllm_gpu_memory_utilization}) so training keeps more",
                        f"vllm_enable_sleep_mode=True (now {a.vllm_enable_sleep_mode}) to free the engine's memory during the backward pass",
                        "engine='vllm_server' on other GPUs"]
        return (f"out of memory while generating {num_prompts} rollouts with the {type(self.engine).__name__} "
                f"(step {self.state.global_step}, round {self._round}). Options: " + "; ".join(options) + ".")

    def _end_round(self, mode: str, prompt_ids: list[list[int]]) -> None:
        """Round metrics, once per round whatever the number of turns; the probe when due."""
        skip, stats, metrics = self._round_skip, self._round_stats, self._metrics[mode]
        tokens_per_s = stats["tokens"] / stats["generate_seconds"] if stats["generate_seconds"] > 0 else 0.0
        metrics["rollout/skipped_layers"].append(float(len(skip)))
        metrics["rollout/behavior_tokens_per_s"].append(tokens_per_s)
        metrics["rollout/generate_seconds"].append(stats["generate_seconds"])
        metrics["rollout/logprob_seconds"].append(stats["logprob_seconds"])
        if mode != "train":
            return
        metrics["rollout/skip_ratio"].append(len(skip) / self.skip_policy.num_layers)  # the k drawn
        every = self.args.full_model_probe_every
        if every and self._round % every == 0:
            self._probe_due = True
        if self._probe_due and skip:
            self._probe(prompt_ids, metrics)
            self._probe_due = False
        logger.info("round %d: skipped layers %s, %d tokens at %.0f tokens/s", self._round, list(skip),
                    stats["tokens"], tokens_per_s)
        self._round += 1

    def _probe(self, prompt_ids: list[list[int]], metrics) -> None:
        """Full model against this round's behavior model on the same fixed-length workload (one
        prompt per group, `full_model_probe_tokens` tokens each, EOS ignored); samples discarded."""
        prompts = prompt_ids[:: self.num_generations] or prompt_ids[:1]
        n = min(self.max_completion_length, self.args.full_model_probe_tokens)
        sampling = self._sampling(MAX_TURNS - 1, max_new_tokens=n)  # a turn no real turn uses
        behavior, full = self._engine_call(self._probe_speeds, prompts, sampling, self._round_skip)
        metrics["rollout/full_tokens_per_s"].append(full)
        metrics["rollout/probe_behavior_tokens_per_s"].append(behavior)
        metrics["rollout/probe_speedup"].append(behavior / full if full > 0 else 0.0)

    def _probe_speeds(self, prompts, sampling: SamplingSpec, skip: tuple[int, ...]) -> tuple[float, float]:
        """Tokens/s of the behavior model (`skip`) and of the full model; the engine keeps its skip set."""
        kept = self.engine.skip
        try:
            self.engine.set_skip(skip)
            behavior = self.engine.generate(prompts, sampling, ignore_eos=True).tokens_per_s
            self.engine.set_skip(())
            full = self.engine.generate(prompts, sampling, ignore_eos=True).tokens_per_s
        finally:
            self.engine.set_skip(kept)
        return behavior, full

    def _sync_engine_weights(self, mode: str) -> None:
        """Push what the optimizer changed to an engine with its own weights, once per global step
        (the first generation after an optimizer step; also once before the first round)."""
        if self.engine.shares_policy_weights or self._synced_step == self.state.global_step:
            return
        start = time.perf_counter()
        if self._producer is not None:  # the producer's engine takes weights on its own thread, as a snapshot
            self._producer.call(self._producer.load, self._weights_now())
            self._synced_step = self.state.global_step
            self._metrics[mode]["rollout/weight_sync_seconds"].append(time.perf_counter() - start)
            return
        # under ZeRO-3 each rank holds shards: every rank gathers the whole tensors to send them
        with self._dist.gather_params(list(self.model.parameters())), \
                changed_weights(self.accelerator.unwrap_model(self.model)) as named:
            self.engine.load_weights(named)
            count = len(named)
        seconds = time.perf_counter() - start
        self._synced_step = self.state.global_step
        self._metrics[mode]["rollout/weight_sync_seconds"].append(seconds)
        logger.info("step %d: synced %d tensors to the %s engine in %.3f s", self.state.global_step, count,
                    type(self.engine).__name__, seconds)

    # ------------------------------------------------------------------ correction

    @torch.no_grad()
    def _prepare_inputs(self, generation_batch):
        inputs = super()._prepare_inputs(generation_batch)
        return trim_completion_padding(inputs) if self.model.training else inputs

    def _policy_logps(self, output: dict) -> torch.Tensor:
        """Per-token log-probs of the completions under `self.model` as it is now (TRL's forward),
        with dropout off: the policy that samples has none, and LoRA's dropout (0.05 by default)
        would add noise to every correction weight."""
        ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), eval_mode(self.model):
            logps, _, _ = self._get_per_token_logps_and_entropies(
                self.model, ids, mask, output["completion_ids"].size(1),
                batch_size=self.args.per_device_train_batch_size,
            )
        return logps

    def _mu_is_pi_old(self) -> bool:
        """μ equals π_old exactly: nothing skipped, the sampler is the policy's own weights, and it
        samples from softmax(logits / T) with nothing truncated or penalised."""
        return (not self._round_skip and self.engine.shares_policy_weights and self.args.behavior == "skip"
                and self._sampling(0).only_temperature)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """TRL's rewards (gathered over ranks), with ±inf made NaN ("no score", as TRL reads a None:
        one inf reward would otherwise make its whole group's advantages NaN, then 0), and every
        non-finite score counted per function (`rewards/<name>/nonfinite`): a reward that returns
        NaN everywhere leaves a trace instead of a silent run without signal."""
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        bad = ~torch.isfinite(rewards)
        mode = "train" if self.model.training else "eval"
        for i, name in enumerate(self.reward_func_names):
            self._metrics[mode][f"rewards/{name}/nonfinite"].append(float(bad[:, i].sum()))
        rewards = torch.where(torch.isinf(rewards), torch.full_like(rewards, float("nan")), rewards)
        # each row's weighted reward, NaN when no function scored it (as TRL sums them): filter_groups reads it
        weighted = (rewards * self.reward_weights.to(rewards.device)).nansum(dim=1)
        self._row_rewards = torch.where(bad.all(dim=1), torch.full_like(weighted, float("nan")), weighted)
        return rewards

    def _generate_and_score_completions(self, inputs):
        output = self._score_and_correct(inputs)
        if self.model.training and self.args.filter_groups:
            output = self._fill_with_informative_groups(inputs, output)
        return output

    def _fill_with_informative_groups(self, inputs: list, output: dict) -> dict:
        """Dynamic sampling (`filter_groups`, `dynamic_sampling.py`): keep the groups whose rewards
        differ, and sample more prompts (each call its own generation round: its own skip set,
        seeds and correction) until the round has as many such groups as it was given, at most
        `filter_groups_max_calls` extra calls; then fill up with dropped groups (no signal)."""
        size = self.num_generations
        n_groups = len(inputs) // size
        steps_to_skip = self._round_steps_to_skip  # a bad call skips the round's steps once, not per call
        parts = [(output, informative_groups(self._row_rewards, size))]
        kept, generated, calls = int(parts[0][1].sum()), n_groups, 0
        while kept < n_groups and calls < self.args.filter_groups_max_calls:
            n = refill_size(n_groups - kept, kept, generated, n_groups)
            rows = [self.train_dataset[i] for i in refill_prompts(len(self.train_dataset), n, self.args.seed, self._round)
                    for _ in range(size)]
            part = self._score_and_correct(rows)
            parts.append((part, informative_groups(self._row_rewards, size)))
            kept, generated, calls = kept + int(parts[-1][1].sum()), generated + n, calls + 1
        if self._round_steps_to_skip > steps_to_skip:
            per_round = max(1, self.args.steps_per_generation * self.num_iterations // self.args.gradient_accumulation_steps)
            self._round_steps_to_skip = steps_to_skip + per_round
        chosen, missing = [], n_groups
        for part, informative in parts:  # informative groups first, in the order they were sampled
            take = informative.nonzero().view(-1)[:missing]
            if take.numel():
                chosen.append(select_groups(part, take, size))
                missing -= take.numel()
        filler = (~parts[0][1]).nonzero().view(-1)[:missing]  # the round's own dropped groups
        if filler.numel():
            chosen.append(select_groups(output, filler, size))
        metrics = self._metrics["train"]
        metrics["dynamic_sampling/informative_fraction"].append(float(parts[0][1].float().mean()))
        metrics["dynamic_sampling/extra_calls"].append(float(calls))
        metrics["dynamic_sampling/extra_prompts"].append(float(generated - n_groups))
        metrics["dynamic_sampling/unfilled_groups"].append(float(filler.numel()))
        return concat_outputs(chosen, self._tokenizer.pad_token_id)

    def _score_and_correct(self, inputs):
        """TRL's sampling, rewards and advantages for `inputs`, then π_old and the correction weights."""
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        for func, name in zip(self.reward_funcs, self.reward_func_names):
            if isinstance(func, GuardedReward):
                self._metrics[mode][f"rewards/{name}/failed"].append(float(func.pop_failures()))
                timeouts = func.pop_timeouts()  # checks cut off at their time limit: scored 0, not wrong answers
                if timeouts is not None:
                    self._metrics[mode][f"rewards/{name}/timeouts"].append(float(timeouts))
        if not self.model.training:
            return output
        start = time.perf_counter()
        mask = output["completion_mask"]
        if "tool_mask" in output:
            mask = mask * output["tool_mask"]
        if self._mu_is_pi_old():
            # d_t = 0 exactly, no forward needed; the method's weight at ratio 1 still applies
            old = behavior = torch.zeros_like(mask, dtype=torch.float32)
        else:
            old = output.get("old_per_token_logps")
            if old is None or self._dropout_active:
                # TRL skips π_old when it equals the policy at loss time (we need it for w_t), and
                # computes it with dropout on (train mode): ours has dropout off
                old = self._policy_logps(output)
                if output.get("old_per_token_logps") is not None:
                    output["old_per_token_logps"] = old
            behavior = output.get("sampling_per_token_logps")
            if behavior is None:  # behavior_logprobs='rescore': the skipped forward, as for π_old
                with skip_layers(self.model, self._round_skip):
                    behavior = self._policy_logps(output)
        a = self.args
        weights = correction_weights(old, behavior, mask, a.correction, clip=a.clip, lam=a.lam)
        weights = self._check_finite_round(old, behavior, mask, weights)
        stats = diagnostics(*(self._gather_rows(t) for t in (old, behavior, mask, weights)), a.correction, clip=a.clip)
        advantages = output["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        output["advantages"] = advantages * weights.to(advantages.dtype)
        metrics = self._metrics["train"]
        for key, value in stats.items():  # over all ranks' tokens, like TRL's own metrics
            metrics[f"correction/{key}"].append(value)
        self._log_staleness_split(output, old, behavior, mask)
        metrics["correction/seconds"].append(time.perf_counter() - start)
        if self.skip_controller is not None:  # every rank sees the same global ESS, so the same k
            self.skip_policy.set_skip_ratio(self.skip_controller.update(stats["ess"]))
        return output

    def _check_finite_round(self, old, behavior, mask, weights) -> torch.Tensor:
        """Count the round's tokens whose μ or π_old is NaN/inf (over all ranks) and log them. A
        non-finite μ, or a round whose weights are all zero, means the behavior model is broken
        (a failed weight sync, say): the run stops with one error, or with
        `nonfinite_logprobs='skip_round'` the round's optimizer steps are skipped and counted."""
        valid = mask.bool()
        counts = torch.stack([(~torch.isfinite(behavior) & valid).sum(), (~torch.isfinite(old) & valid).sum(),
                              valid.sum(), (weights * valid).sum().gt(0).long()]).float()
        if self.accelerator.num_processes > 1:  # every rank decides alike
            counts = self.accelerator.reduce(counts, reduction="sum")
        bad_mu, bad_old, tokens, ranks_with_weight = (int(c) for c in counts.tolist())
        metrics = self._metrics["train"]
        metrics["correction/nonfinite_mu_tokens"].append(float(bad_mu))
        metrics["correction/nonfinite_old_tokens"].append(float(bad_old))
        if bad_mu:
            problem = (f"{bad_mu} of {tokens} completion tokens have a non-finite behavior log-prob (μ) from the "
                       f"{type(self.engine).__name__}")
        elif tokens and not ranks_with_weight:
            problem = f"every correction weight of the round is 0 ({self.args.correction}, {tokens} tokens)"
        else:
            return weights
        where = f"step {self.state.global_step + 1}, round {self._round - 1}"  # the round just sampled
        if self.args.nonfinite_logprobs == "error":
            raise FloatingPointError(
                f"{problem} ({where}): the behavior model is not the policy it should be (a failed weight sync, "
                "a broken engine), so no policy gradient would be learned. Set nonfinite_logprobs='skip_round' to "
                "skip such rounds instead (counted in nonfinite_rounds_skipped).")
        per_round = max(1, self.args.steps_per_generation * self.num_iterations // self.args.gradient_accumulation_steps)
        self._round_steps_to_skip += per_round
        self.nonfinite_rounds_skipped += 1
        metrics["nonfinite_rounds_skipped"].append(float(self.nonfinite_rounds_skipped))
        logger.warning("%s (%s): the round's %d optimizer step(s) are skipped (%d rounds so far)", problem, where,
                       per_round, self.nonfinite_rounds_skipped)
        return torch.zeros_like(weights)

    def _gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """(B, T) on each rank -> (world * B, T_max), padded with zeros (masked out)."""
        if self.accelerator.num_processes == 1:
            return t
        t = self.accelerator.pad_across_processes(t.contiguous(), dim=1, pad_index=0)
        return self.accelerator.gather(t)

    # ------------------------------------------------------------------ non-finite steps

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            self._nonfinite_pending = True
        return loss

    def create_optimizer(self, model=None):
        """The optimizer (AdamW over fp32 masters when trainable parameters are bf16/fp16:
        `master_weights.py`), with its step skipped when the step's loss or gradients are not finite:
        one NaN would otherwise poison every weight. (With DeepSpeed the engine owns the optimizer
        step and its own overflow check applies instead.)"""
        optimizer = super().create_optimizer(model)
        if getattr(optimizer, "_nested_reft_guarded", False):
            return optimizer
        step = optimizer.step

        def guarded_step(opt, *args, **kwargs):
            if self._skip_nonfinite_step(opt):
                return None
            return step(*args, **kwargs)

        # a bound method: torch's LR schedulers re-wrap optimizer.step through its __func__
        optimizer.step, optimizer._nested_reft_guarded = types.MethodType(guarded_step, optimizer), True
        return optimizer

    def _skip_nonfinite_step(self, optimizer) -> bool:
        """Whether to skip this optimizer step (its round was dropped, or its loss or gradients are
        not finite); also counts steps that cannot change the weights (skipped, or every gradient
        zero) and stops the run after `max_idle_steps` of them in a row."""
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if isinstance(optimizer, MasterWeightAdamW):  # the masters get their gradients inside step()
            grads = [p.grad for p in optimizer.model_params if p.grad is not None] + grads
        peak = torch.stack([g.detach().abs().amax().float() for g in grads]).max() if grads else None
        flags = torch.tensor([float(bool(self._round_steps_to_skip)),
                              float(self._nonfinite_pending or (peak is not None and not bool(torch.isfinite(peak)))),
                              float(peak is None or float(peak) == 0.0)], device=self.accelerator.device)
        self._nonfinite_pending = False
        if self.accelerator.num_processes > 1:  # every rank decides alike: the weights stay identical
            flags = self.accelerator.reduce(flags, reduction="sum")
        dropped, nonfinite, zero = (bool(f) for f in flags.tolist())
        if dropped:
            self._round_steps_to_skip -= 1
            self._count_idle("skipped_round")
            return True
        if nonfinite:
            self.nonfinite_steps_skipped += 1
            self._metrics["train"]["nonfinite_steps_skipped"].append(float(self.nonfinite_steps_skipped))
            logger.warning("step %d: non-finite loss or gradients; the optimizer step is skipped (%d so far)",
                           self.state.global_step + 1, self.nonfinite_steps_skipped)
            self._count_idle("nonfinite")
            return True
        if zero and int(flags[2]) == self.accelerator.num_processes:
            self._count_idle("zero_gradient")
        else:
            self._idle_steps = dict.fromkeys(self._idle_steps, 0)
        return False

    def _count_idle(self, cause: str) -> None:
        self._idle_steps[cause] += 1
        total = sum(self._idle_steps.values())
        limit = self.args.max_idle_steps
        if not limit or total < limit:
            return
        causes = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in self._idle_steps.items() if n)
        raise RuntimeError(
            f"no optimizer step has changed the weights for {total} steps in a row (up to step "
            f"{self.state.global_step + 1}: {causes}). Non-finite steps come from NaN/inf losses; zero gradients "
            "from advantages that are all 0 (every group's rewards equal, or NaN: see rewards/<name>/nonfinite "
            f"in the metrics). Stopping instead of running on unchanged weights (max_idle_steps={limit}; 0 turns "
            "the check off).")

    # ------------------------------------------------------------------ checkpoints

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        except RolloutEngineUnavailable as e:
            raise self._stop_without_engine(e) from None
        finally:
            self._close_producer()

    def _stop_without_engine(self, error: RolloutEngineUnavailable) -> RolloutEngineUnavailable:
        """Save the last completed optimizer step (the failed round's skip-set draw undone, so a
        resumed run draws what an uninterrupted one would) and say where it is."""
        step = self.state.global_step
        if not error.every_rank:  # saving is collective; the other ranks are elsewhere
            return RolloutEngineUnavailable(f"{error} This rank alone lost its server, so no checkpoint was saved; "
                                            "resume from the last scheduled one.", error.url)
        if step == 0:
            return RolloutEngineUnavailable(f"{error} No optimizer step had completed: nothing to save.", error.url, True)
        if self._round_start_policy is not None:
            self.skip_policy.load_state_dict(self._round_start_policy)
        folder = os.path.join(self._get_output_dir(trial=None), f"{PREFIX_CHECKPOINT_DIR}-{step}")
        if not os.path.exists(os.path.join(folder, self.SKIP_STATE_FILE)):  # not saved by the schedule already
            self._save_checkpoint(self.model, trial=None)
        return RolloutEngineUnavailable(f"{error} Saved step {step} in {folder}: once the server is back, rerun the "
                                        "same command to resume.", error.url, True)

    SKIP_STATE_FILE = "nested_reft_state.json"

    def _save_checkpoint(self, model, trial):
        """Also save the skip policy (RNG and history), round counter and controller, so a resumed
        run draws the same skip sets as an uninterrupted one."""
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            state = {"skip_policy": self.skip_policy.state_dict(), "round": self._round,
                     "skip_ratio": self.skip_controller.ratio if self.skip_controller else None,
                     "probe_due": self._probe_due, "nonfinite_steps_skipped": self.nonfinite_steps_skipped}
            generate_every = self.args.steps_per_generation * self.num_iterations
            if self._buffered_inputs is not None and self._step % generate_every:
                # a checkpoint inside a round: keep the round's remaining batches, so a resumed run
                # trains on them as the uninterrupted one does instead of sampling a new round
                save_round_buffer(folder, self._step, self._buffered_inputs)
            self._save_async_state(folder)  # the rounds the producer sampled ahead
            path = os.path.join(folder, self.SKIP_STATE_FILE)
            with open(path + ".tmp", "w") as f:  # written whole, then renamed: never half a file
                json.dump(state, f)
            os.replace(path + ".tmp", path)

    @staticmethod
    def _checkpoint_step(checkpoint: str) -> int:
        with open(os.path.join(checkpoint, "trainer_state.json")) as f:
            return int(json.load(f)["global_step"])

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, self.SKIP_STATE_FILE) if checkpoint else None
        if path and os.path.exists(path):
            with open(path) as f:
                state = json.load(f)
            self.skip_policy.load_state_dict(state["skip_policy"])
            self._round = state["round"]
            self._probe_due = state.get("probe_due", self._probe_due)
            self.nonfinite_steps_skipped = state.get("nonfinite_steps_skipped", 0)
            if self.skip_controller is not None and state["skip_ratio"] is not None:
                self.skip_controller.ratio = state["skip_ratio"]
                self.skip_policy.set_skip_ratio(state["skip_ratio"])
        if not checkpoint:
            return
        self._load_async_state(checkpoint)
        # TRL counts micro-steps from 0 in every process; a resumed run continues the count, so a
        # new round starts where the uninterrupted run started one
        self._step = self._checkpoint_step(checkpoint) * self.args.gradient_accumulation_steps
        if has_round_buffer(checkpoint):
            self._step, self._buffered_inputs = load_round_buffer(checkpoint, self.accelerator.device)
        elif os.path.exists(os.path.join(checkpoint, LEGACY_PICKLE_FILE)):
            # unpickling would run whatever code the file holds: never load it
            raise ValueError(f"{os.path.join(checkpoint, LEGACY_PICKLE_FILE)} is a pickled round buffer, which is not "
                             "loaded (a crafted one would run code on resume). Delete it to resume from this checkpoint "
                             "with a freshly sampled round.")
