"""archs."""

from . import scout  # noqa: F401  (registers model_type "scout" with the Auto classes)
from . import balcony  # noqa: F401  (registers the Balcony exits' config, model_type "balcony")
