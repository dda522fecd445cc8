"""Integral attention (SPEC §6) in a Llama-shaped model; registered with the Auto classes on import."""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_integral import IntegralConfig
from .modeling_integral import (
           IntegralAttention,
           IntegralForCausalLM,
           IntegralModel,
           IntegralPreTrainedModel,
)
from .reference import integral_attention_signals

AutoConfig.register(IntegralConfig.model_type, IntegralConfig, exist_ok=True)
AutoModelForCausalLM.register(IntegralConfig, IntegralForCausalLM, exist_ok=True)

__all__ = ["IntegralAttention", "IntegralConfig", "IntegralForCausalLM", "IntegralModel", "IntegralPreTrainedModel",
           "integral_attention_signals"]
