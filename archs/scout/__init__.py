"""SCOUT (SPEC.md §4): double blocks of a sliding-window or Mamba-1 mixer plus checkpoint attention.
Importing this package registers `model_type="scout"` with the Auto classes."""

from transformers import AutoConfig, AutoModelForCausalLM

from .cache_scout import ScoutCache
from .configuration_scout import ScoutConfig
from .modeling_scout import ScoutForCausalLM, ScoutModel, ScoutPreTrainedModel

AutoConfig.register(ScoutConfig.model_type, ScoutConfig, exist_ok=True)
AutoModelForCausalLM.register(ScoutConfig, ScoutForCausalLM, exist_ok=True)

__all__ = ["ScoutCache", "ScoutConfig", "ScoutForCausalLM", "ScoutModel", "ScoutPreTrainedModel"]
