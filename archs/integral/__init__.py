"""Integral attention (SPEC §6) in a Llama-shaped model; registered with the Auto classes on import."""

from ..registry import register_family
from .configuration_integral import IntegralConfig
from .modeling_integral import (
           IntegralAttention,
           IntegralForCausalLM,
           IntegralModel,
           IntegralPreTrainedModel,
)
from .reference import integral_attention_signals

register_family(IntegralConfig, IntegralForCausalLM)

__all__ = ["IntegralAttention", "IntegralConfig", "IntegralForCausalLM", "IntegralModel", "IntegralPreTrainedModel",
           "integral_attention_signals"]
