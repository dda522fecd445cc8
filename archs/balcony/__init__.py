"""Balcony (SPEC.md §3): depth-elastic exits on a frozen Llama / Qwen2-style model. Importing this
package registers the exits' config (`model_type="balcony"`) with `AutoConfig`; the exits attach to
an existing model (`add_exits`, `load_exits`) instead of being a model class of their own."""

from ..registry import register_family
from .configuration_balcony import BLOCKS, FULL_BLOCK_ONLY, INITS, KL_REDUCTIONS, BalconyConfig
from .modeling_balcony import (
    DEFAULT_EXIT_FRACTIONS,
    EXITS_FILE,
    BalconyExit,
    BalconyExits,
    add_exits,
    build_exits,
    default_exits,
    distillation_loss,
    exit_forward,
    exit_kl,
    exit_logits,
    load_exits,
    read_exits,
    save_exits,
    use_exit,
)

register_family(BalconyConfig)

__all__ = [
    "BLOCKS", "DEFAULT_EXIT_FRACTIONS", "EXITS_FILE", "FULL_BLOCK_ONLY", "INITS", "KL_REDUCTIONS", "BalconyConfig",
    "BalconyExit", "BalconyExits", "add_exits", "build_exits", "default_exits", "distillation_loss", "exit_forward",
    "exit_kl", "exit_logits", "load_exits", "read_exits", "save_exits", "use_exit",
]
