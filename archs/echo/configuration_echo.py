"""ECHO configuration: a Llama / Qwen2-shaped decoder in which some layers (sharers) read the K/V of an
earlier layer (their owner) instead of computing their own (docs/architectures/echo.md)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

BASE_MODEL_TYPES = ("llama", "qwen2")
KV_ADAPTERS = ("none", "scale", "lowrank")
DEFAULT_SHARING = "upper_half_pairs"


def upper_half_pairs(num_layers: int) -> dict[int, int]:
    """The default sharing map: the upper half of the layers, `L//2 .. L-1`, taken in pairs
    `(L//2, L//2+1), (L//2+2, L//2+3), ...`; the second layer of each pair reads the K/V of the first.
    L = 8: {5: 4, 7: 6}; L = 7: {4: 3, 6: 5}; L = 6: {4: 3} (layer 5 has no partner); L = 4: {3: 2};
    L = 2: {} (layer 1 alone)."""
    return {s: s - 1 for s in range(num_layers // 2 + 1, num_layers, 2)}


def resolve_kv_sharing(kv_sharing, num_layers: int) -> dict[int, int]:
    """A sharing spec (None or {} for none, "upper_half_pairs", or {sharer: owner}) as a validated
    {sharer: owner} map with int keys (JSON stores the keys as strings)."""
    if kv_sharing is None:
        return {}
    if isinstance(kv_sharing, str):
        if kv_sharing != DEFAULT_SHARING:
            raise ValueError(f"kv_sharing must be a {{sharer: owner}} map or {DEFAULT_SHARING!r}, got {kv_sharing!r}")
        return upper_half_pairs(num_layers)
    if not isinstance(kv_sharing, dict):
        raise ValueError(f"kv_sharing must be a {{sharer: owner}} map or {DEFAULT_SHARING!r}, got {kv_sharing!r}")
    resolved = {_layer_index(s, kv_sharing): _layer_index(o, kv_sharing) for s, o in kv_sharing.items()}
    validate_kv_sharing(resolved, num_layers)
    return dict(sorted(resolved.items()))


def _layer_index(x, spec) -> int:
    """An int, or a string of digits (JSON keys are strings)."""
    if isinstance(x, int) and not isinstance(x, bool):
        return x
    if isinstance(x, str) and x.strip().lstrip("-").isdigit():
        return int(x)
    raise ValueError(f"kv_sharing entries must be integer layer indices, got {x!r} in {spec!r}")


def validate_kv_sharing(kv_sharing: dict[int, int], num_layers: int) -> None:
    """Each sharer reads an earlier layer that computes its own K/V. Chains (7 -> 6 -> 5) are refused:
    name the layer that computes the K/V (7 -> 5, 6 -> 5), so every owner is a plain layer and the
    skipping rule stays one step deep."""
    for s, o in kv_sharing.items():
        if not 0 <= s < num_layers:
            raise ValueError(f"kv_sharing: sharer layer {s} is out of range for {num_layers} layers")
        if not 0 <= o < num_layers:
            raise ValueError(f"kv_sharing: owner layer {o} (of sharer {s}) is out of range for {num_layers} layers")
        if o >= s:
            raise ValueError(f"kv_sharing: sharer {s} must read an earlier layer, got owner {o} >= {s}")
        if o in kv_sharing:
            raise ValueError(f"kv_sharing: owner {o} of sharer {s} is itself a sharer (reads {kv_sharing[o]}); "
                             f"chains are not allowed, write {s}: {kv_sharing[o]}")


@strict
class EchoConfig(LlamaConfig):
    r"""Llama's configuration plus the ECHO fields.

    base_model_type (`str`, *optional*, defaults to `"llama"`):
        `llama` (biases on q/k/v/o follow `attention_bias`) or `qwen2` (q/k/v with bias, o without,
        as transformers' Qwen2; `attention_bias` must then be False).
    kv_sharing (`dict` or `str`, *optional*):
        {sharer layer: owner layer}, owner < sharer, owners never sharers themselves; `"upper_half_pairs"`
        expands to `upper_half_pairs(num_hidden_layers)`; None or {} shares nothing (a plain Llama / Qwen2).
    kv_adapter (`str`, *optional*, defaults to `"none"`):
        A trainable per-sharer map of the borrowed K/V, exactly the identity at init: `scale` (a gain per
        value channel and per rotary pair of key channels), `lowrank` (values += B·A·values, B = 0).
    kv_adapter_rank (`int`, *optional*, defaults to 8):
        Rank of the `lowrank` adapter.
    """

    model_type = "echo"

    base_model_type: str = "llama"
    kv_sharing: dict | str | None = None
    kv_adapter: str = "none"
    kv_adapter_rank: int = 8

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.base_model_type not in BASE_MODEL_TYPES:
            raise ValueError(f"base_model_type must be one of {BASE_MODEL_TYPES}, got {self.base_model_type!r}")
        if self.base_model_type == "qwen2" and (self.attention_bias or self.mlp_bias):
            raise ValueError("base_model_type='qwen2' fixes the biases (q/k/v yes, o and MLP no): "
                             f"attention_bias and mlp_bias must be False, got {self.attention_bias}, {self.mlp_bias}")
        self.kv_sharing = resolve_kv_sharing(self.kv_sharing, self.num_hidden_layers)
        if self.kv_adapter not in KV_ADAPTERS:
            raise ValueError(f"kv_adapter must be one of {KV_ADAPTERS}, got {self.kv_adapter!r}")
        if not isinstance(self.kv_adapter_rank, int) or self.kv_adapter_rank < 1:
            raise ValueError(f"kv_adapter_rank must be a positive integer, got {self.kv_adapter_rank!r}")

    @property
    def qkv_bias(self) -> bool:
        return True if self.base_model_type == "qwen2" else self.attention_bias

    @property
    def o_bias(self) -> bool:
        return False if self.base_model_type == "qwen2" else self.attention_bias

    @property
    def kv_owners(self) -> list[int]:
        """Layers whose K/V a sharer reads."""
        return sorted(set(self.kv_sharing.values()))


__all__ = ["EchoConfig", "upper_half_pairs"]
