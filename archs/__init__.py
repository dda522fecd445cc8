"""archs."""

from . import echo  # noqa: F401  (registers the ECHO family with the Auto classes)
