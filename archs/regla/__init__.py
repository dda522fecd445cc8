"""ReGLA (SPEC.md §9): refined gated linear attention, optionally hybrid with softmax attention.
Importing this package registers `model_type="regla"` with the Auto classes."""

from transformers import AutoConfig, AutoModelForCausalLM

from .cache_regla import ReglaCache
from .configuration_regla import ReglaConfig
from .modeling_regla import ReglaForCausalLM, ReglaModel, ReglaPreTrainedModel

AutoConfig.register(ReglaConfig.model_type, ReglaConfig, exist_ok=True)
AutoModelForCausalLM.register(ReglaConfig, ReglaForCausalLM, exist_ok=True)

__all__ = ["ReglaCache", "ReglaConfig", "ReglaForCausalLM", "ReglaModel", "ReglaPreTrainedModel"]
