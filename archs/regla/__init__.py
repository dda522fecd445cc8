"""ReGLA (SPEC.md §9): refined gated linear attention, optionally hybrid with softmax attention.
Importing this package registers `model_type="regla"` with the Auto classes."""

from ..registry import register_family
from .cache_regla import ReglaCache
from .configuration_regla import ReglaConfig
from .modeling_regla import ReglaForCausalLM, ReglaModel, ReglaPreTrainedModel

register_family(ReglaConfig, ReglaForCausalLM)

__all__ = ["ReglaCache", "ReglaConfig", "ReglaForCausalLM", "ReglaModel", "ReglaPreTrainedModel"]
