"""archs."""

from . import scout  # noqa: F401  (registers model_type "scout" with the Auto classes)
from .regla import ReglaConfig  # noqa: F401  (importing archs.regla registers model_type "regla")
