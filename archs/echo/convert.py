"""Converting a pretrained transformers Llama / Qwen2 causal LM into an ECHO model, and the gradual
conversion schedule (which sharers start reading their owner's K/V at which training step)."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import torch

from .configuration_echo import DEFAULT_SHARING, EchoConfig, resolve_kv_sharing, validate_kv_sharing
from .modeling_echo import EchoForCausalLM

# Config fields an ECHO config takes over from its Llama / Qwen2 source as they are.
SHARED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
                 "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
                 "rope_parameters", "attention_dropout")


def echo_config_from(config, kv_sharing=DEFAULT_SHARING, kv_adapter: str = "none",
                     kv_adapter_rank: int = 8) -> EchoConfig:
    """The ECHO config of a transformers Llama or Qwen2 config (Qwen2: full attention only)."""
    kind = getattr(config, "model_type", None)
    if kind not in ("llama", "qwen2"):
        raise ValueError(f"convert_to_echo converts Llama or Qwen2 models, got model_type={kind!r}")
    if kind == "qwen2" and (getattr(config, "use_sliding_window", False)
                            or "sliding_attention" in (getattr(config, "layer_types", None) or [])):
        raise ValueError("convert_to_echo: this Qwen2 model uses sliding-window attention, which ECHO does not have")
    fields = {k: copy.deepcopy(getattr(config, k)) for k in SHARED_FIELDS}
    fields["head_dim"] = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if kind == "llama":
        fields.update(attention_bias=config.attention_bias, mlp_bias=config.mlp_bias)
    return EchoConfig(**fields, base_model_type=kind, kv_sharing=kv_sharing, kv_adapter=kv_adapter,
                      kv_adapter_rank=kv_adapter_rank)


def sharer_kv_keys(kv_sharing: dict[int, int]) -> set[str]:
    """State-dict keys of the sharers' k/v projections (weights and biases), which ECHO deletes."""
    return {f"model.layers.{s}.self_attn.{proj}.{w}" for s in kv_sharing for proj in ("k_proj", "v_proj")
            for w in ("weight", "bias")}


@torch.no_grad()
def convert_to_echo(model, kv_sharing=None, kv_adapter: str = "none", kv_adapter_rank: int = 8) -> EchoForCausalLM:
    """An `EchoForCausalLM` with `model`'s weights (a transformers `LlamaForCausalLM` or `Qwen2ForCausalLM`).

    kv_sharing: None (the default map, "upper_half_pairs"), "upper_half_pairs", or {sharer: owner};
    {} shares nothing and gives a model that computes exactly what `model` computes. Every weight is
    copied except the sharers' k/v projections (and their biases), which ECHO does not have; adapters,
    if any, start at the identity. The source model is left unchanged.
    """
    config = echo_config_from(model.config, DEFAULT_SHARING if kv_sharing is None else kv_sharing,
                              kv_adapter, kv_adapter_rank)
    weight = next(model.parameters())
    echo = EchoForCausalLM._from_config(config, dtype=weight.dtype,
                                        attn_implementation=model.config._attn_implementation).to(weight.device)
    dropped = sharer_kv_keys(config.kv_sharing)
    state = {k: v for k, v in model.state_dict().items() if k not in dropped}
    missing, unexpected = echo.load_state_dict(state, strict=False)
    missing = [k for k in missing if ".kv_adapter." not in k]
    if missing or unexpected:
        raise ValueError(f"convert_to_echo: weights do not match (missing {missing[:4]}, unexpected {unexpected[:4]})")
    echo.generation_config = copy.deepcopy(model.generation_config)
    return echo.train(model.training)


@dataclass
class KVSharingSchedule:
    """The gradual conversion: `entries` = [(step, {sharer: owner}), ...]. From training step `step`
    on, those sharers read their owners' K/V (their k/v projections are deleted then); before it they
    still compute their own. Steps are distinct and increasing, each sharer appears once, and the
    union of the pairs must be a valid sharing map."""

    entries: list[tuple[int, dict[int, int]]]

    def __post_init__(self):
        steps = [step for step, _ in self.entries]
        if any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in steps) or steps != sorted(set(steps)):
            raise ValueError(f"schedule steps must be distinct non-negative integers in increasing order, got {steps}")
        seen: dict[int, int] = {}
        for step, pairs in self.entries:
            if not pairs:
                raise ValueError(f"schedule entry at step {step} has no pairs")
            for s in pairs:
                if s in seen:
                    raise ValueError(f"schedule: sharer {s} appears twice (steps {seen[s]} and {step})")
                seen[s] = step

    @classmethod
    def parse(cls, spec, num_layers: int) -> KVSharingSchedule:
        """From [[step, {sharer: owner}], ...] or its JSON text (map keys may be strings)."""
        raw = json.loads(spec) if isinstance(spec, str) else spec
        if not isinstance(raw, list) or not all(isinstance(e, (list, tuple)) and len(e) == 2 for e in raw):
            raise ValueError(f"schedule must be a list of [step, {{sharer: owner}}] pairs, got {spec!r}")
        schedule = cls([(step, resolve_kv_sharing(pairs, num_layers)) for step, pairs in raw])
        validate_kv_sharing(schedule.kv_sharing, num_layers)
        return schedule

    @classmethod
    def gradual(cls, kv_sharing: dict[int, int], over_steps: int) -> KVSharingSchedule:
        """One pair at a time, the deepest sharer first, at steps evenly spaced over [0, over_steps)."""
        pairs = sorted(kv_sharing.items(), reverse=True)
        n = len(pairs)
        steps = [i * over_steps // n for i in range(n)]
        if len(set(steps)) < n:
            raise ValueError(f"cannot spread {n} pairs over {over_steps} steps")
        return cls([(step, {s: o}) for step, (s, o) in zip(steps, pairs)])

    @property
    def kv_sharing(self) -> dict[int, int]:
        """The sharing map once every entry has started."""
        return dict(sorted((s, o) for _, pairs in self.entries for s, o in pairs.items()))

    def starting_at(self, step: int) -> dict[int, int]:
        return next((dict(pairs) for s, pairs in self.entries if s == step), {})

    def apply(self, model: EchoForCausalLM, step: int):
        """Start the pairs scheduled at `step` (call once per step, before its forward). Returns the
        (removed, added) parameters, for the optimizer."""
        pairs = self.starting_at(step)
        return model.model.share_kv(pairs) if pairs else ([], [])

    def as_json(self) -> list:
        return [[step, {str(s): o for s, o in pairs.items()}] for step, pairs in self.entries]
