"""archs."""

from . import (
    dtrnet,  # noqa: F401  (registers the DTRNet config and model with the Auto classes)
    integral,  # noqa: F401  (registers the Integral-attention config and model)
)
