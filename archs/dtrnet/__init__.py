"""DTRNet (SPEC §5): routed attention with a bypass path; registered with the Auto classes on import."""

from transformers import AutoConfig, AutoModelForCausalLM

from .cache_dtrnet import DTRNetCache
from .callbacks import RoutedFractionCallback
from .configuration_dtrnet import DTRNetConfig, default_dense_layers
from .modeling_dtrnet import DTRNetForCausalLM, DTRNetModel, DTRNetPreTrainedModel

AutoConfig.register(DTRNetConfig.model_type, DTRNetConfig, exist_ok=True)
AutoModelForCausalLM.register(DTRNetConfig, DTRNetForCausalLM, exist_ok=True)

__all__ = ["DTRNetCache", "DTRNetConfig", "DTRNetForCausalLM", "DTRNetModel", "DTRNetPreTrainedModel",
           "RoutedFractionCallback", "default_dense_layers"]
