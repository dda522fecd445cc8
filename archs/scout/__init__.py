"""SCOUT (SPEC.md §4): double blocks of a sliding-window or Mamba-1 mixer plus checkpoint attention.
Importing this package registers `model_type="scout"` with the Auto classes."""

from ..registry import register_family
from .cache_scout import ScoutCache
from .configuration_scout import ScoutConfig
from .modeling_scout import ScoutForCausalLM, ScoutModel, ScoutPreTrainedModel

register_family(ScoutConfig, ScoutForCausalLM)

__all__ = ["ScoutCache", "ScoutConfig", "ScoutForCausalLM", "ScoutModel", "ScoutPreTrainedModel"]
