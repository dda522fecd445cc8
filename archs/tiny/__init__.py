"""The embedded tiny models: built offline from synthetic data, cached on disk."""

from .build import TinyMathRecipe, build_tiny_math_model, default_cache_dir, load_tiny_math_model
from .math_task import SYSTEM_PROMPT, MathProblem, generate_problems

__all__ = [
    "SYSTEM_PROMPT",
    "MathProblem",
    "TinyMathRecipe",
    "build_tiny_math_model",
    "default_cache_dir",
    "generate_problems",
    "load_tiny_math_model",
]
