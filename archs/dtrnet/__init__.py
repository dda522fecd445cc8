"""DTRNet (SPEC §5): routed attention with a bypass path; registered with the Auto classes on import."""

from ..registry import register_family
from .cache_dtrnet import DTRNetCache
from .callbacks import RoutedFractionCallback
from .configuration_dtrnet import DTRNetConfig, default_dense_layers
from .modeling_dtrnet import DTRNetForCausalLM, DTRNetModel, DTRNetPreTrainedModel

register_family(DTRNetConfig, DTRNetForCausalLM)

__all__ = ["DTRNetCache", "DTRNetConfig", "DTRNetForCausalLM", "DTRNetModel", "DTRNetPreTrainedModel",
           "RoutedFractionCallback", "default_dense_layers"]
