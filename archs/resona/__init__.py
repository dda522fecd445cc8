"""Resona (SPEC.md §8): a linear recurrent model (ReGLA, or SCOUT's Mamba-1 mixer) with a parallel
cross-attention read of chunks retrieved from its own context. Importing this package registers
`model_type="resona"` with the Auto classes."""

from ..registry import register_family
from .cache_resona import ResonaCache
from .configuration_resona import ResonaConfig
from .modeling_resona import ResonaForCausalLM, ResonaModel, ResonaPreTrainedModel

register_family(ResonaConfig, ResonaForCausalLM)

__all__ = ["ResonaCache", "ResonaConfig", "ResonaForCausalLM", "ResonaModel", "ResonaPreTrainedModel"]
