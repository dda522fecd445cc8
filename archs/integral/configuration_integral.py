"""Integral-attention configuration (SPEC §6): a Llama configuration plus the signal options."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

ROPE_MODES = ("full_head", "per_signal")
SIGNAL_SCALES = ("signal_dim", "head_dim")
INTEGRAL_PATHS = ("fused", "signals")


@strict
class IntegralConfig(LlamaConfig):
    r"""
    Llama fields, plus:

    integral_layers (`list[int]`, *optional*): layers with integral attention; default the upper half,
        `range(L // 2, L)` [paper]. The others are plain Llama attention.
    num_signals (`int`, default 8): S, the number of column slices of each head's q and k [paper].
    rope_mode (`str`, default "full_head"): "full_head" rotates each head as Llama does, then slices;
        "per_signal" rotates each signal as its own (head_dim / S)-dimensional RoPE vector.
    signal_scale (`str`, default "signal_dim"): the scale inside the average, (head_dim / S)^-½ or head_dim^-½.
    integral_path (`str`, default "fused"): "fused" runs one attention call at the equivalent scale
        (eager / SDPA / flash, whichever `attn_implementation` is); "signals" computes the S signal
        products one by one (the reference).
    """

    model_type = "integral"

    integral_layers: list[int] | None = None
    num_signals: int = 8
    rope_mode: str = "full_head"
    signal_scale: str = "signal_dim"
    integral_path: str = "fused"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        n = self.num_hidden_layers
        if self.integral_layers is None:
            self.integral_layers = list(range(n // 2, n))
        self.integral_layers = sorted(self.integral_layers)
        bad = [i for i in self.integral_layers if not 0 <= i < n]
        if bad or len(set(self.integral_layers)) != len(self.integral_layers):
            raise ValueError(f"integral_layers={self.integral_layers} must be distinct layer indices in [0, {n})")
        if self.rope_mode not in ROPE_MODES:
            raise ValueError(f"rope_mode={self.rope_mode!r} must be one of {ROPE_MODES}")
        if self.signal_scale not in SIGNAL_SCALES:
            raise ValueError(f"signal_scale={self.signal_scale!r} must be one of {SIGNAL_SCALES}")
        if self.integral_path not in INTEGRAL_PATHS:
            raise ValueError(f"integral_path={self.integral_path!r} must be one of {INTEGRAL_PATHS}")
        if self.num_signals < 1:
            raise ValueError(f"num_signals={self.num_signals} must be >= 1")
        if self.head_dim % self.num_signals:
            raise ValueError(f"num_signals={self.num_signals} must divide head_dim={self.head_dim}")
        if self.rope_mode == "per_signal" and self.head_dim % (2 * self.num_signals):
            raise ValueError(f"rope_mode='per_signal' needs head_dim={self.head_dim} divisible by "
                             f"2 * num_signals={2 * self.num_signals} (each signal is rotated in pairs)")
