"""archs."""

from . import scout  # noqa: F401  (registers model_type "scout" with the Auto classes)
