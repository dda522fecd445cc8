"""ECHO shared-KV family (SPEC §7): sharer layers read an earlier owner layer's K/V after RoPE."""

from ..registry import register_family
from .cache_echo import EchoCache
from .configuration_echo import EchoConfig, upper_half_pairs
from .convert import convert_to_echo
from .modeling_echo import EchoForCausalLM, EchoModel, EchoPreTrainedModel

register_family(EchoConfig, EchoForCausalLM)

__all__ = ["EchoCache", "EchoConfig", "EchoForCausalLM", "EchoModel", "EchoPreTrainedModel", "convert_to_echo",
           "upper_half_pairs"]
