"""Balcony exits configuration (SPEC.md §3, arXiv 2503.05005).

Balcony adds depth-elastic exits to a frozen Llama / Qwen2-style model or one of this project's
families: exit `k` runs base layers 0..k−1, then one extra decoder layer (initialised as a copy of the
base's last layer), an RMSNorm (initialised from the norm layer k applies to its input) and the base's
own LM head. This config describes a
set of exits and the base they belong to; it is saved beside the exit weights (`save_exits`), so
exits load onto the base they were trained on and nothing else.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

INITS = ("last_layer", "random")
BLOCKS = ("full", "attention", "mlp")
KL_REDUCTIONS = ("token_mean", "batchmean")
# Families whose decoder layers call their mixer with their own positional arguments (padding validity,
# positions, routes): an exit layer cannot drop a branch by swapping a module, so they take full exits only.
FULL_BLOCK_ONLY = ("dtrnet", "regla", "resona", "scout")


@strict
class BalconyConfig(PreTrainedConfig):
    r"""
    exits (`list[int]`):
        Exit depths k (sorted, distinct): exit k reads the residual stream after k base layers
        (`hidden_states[k]`), 1 <= k < base_num_hidden_layers.
    init (`str`, defaults to `"last_layer"`):
        `"last_layer"`: each exit layer starts as a copy of the base's last decoder layer [code];
        `"random"`: re-drawn (linear weights N(0, initializer_range), biases 0, norm weights 1) [ablation].
    block (`str`, defaults to `"full"`):
        The exit layer: `"full"` decoder layer [code]; `"attention"` (its MLP branch removed) or `"mlp"`
        (its attention branch removed) [ablations], not on the families in `FULL_BLOCK_ONLY`.
    base_model_type, base_num_hidden_layers, base_hidden_size:
        The base model the exits were built on; `load_exits` refuses another one.
    """

    model_type = "balcony"

    exits: list[int] | None = None
    init: str = "last_layer"
    block: str = "full"
    base_model_type: str | None = None
    base_num_hidden_layers: int | None = None
    base_hidden_size: int | None = None

    def __post_init__(self, **kwargs):
        self.exits = [] if self.exits is None else list(self.exits)
        self._check()
        super().__post_init__(**kwargs)

    def _check(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"BalconyConfig.init must be one of {INITS}, got {self.init!r}")
        if self.block not in BLOCKS:
            raise ValueError(f"BalconyConfig.block must be one of {BLOCKS}, got {self.block!r}")
        if self.block != "full" and self.base_model_type in FULL_BLOCK_ONLY:
            raise ValueError(f"Balcony block={self.block!r} is not supported on a {self.base_model_type} base: its "
                             "decoder layers call their mixer with arguments of their own, so exits on it "
                             "are full decoder layers (block='full')")
        bad = [k for k in self.exits if isinstance(k, bool) or not isinstance(k, int) or k < 1]
        if bad:
            raise ValueError(f"Balcony exits must be integers >= 1 (exit k runs base layers 0..k-1), got {bad}")
        if self.exits != sorted(set(self.exits)):
            raise ValueError(f"Balcony exits must be sorted and distinct, got {self.exits}")
        n = self.base_num_hidden_layers
        if n is not None and any(k >= n for k in self.exits):
            raise ValueError(f"Balcony exits {[k for k in self.exits if k >= n]} are out of range for a base with "
                             f"{n} layers (1 <= k <= {n - 1})")


__all__ = ["BLOCKS", "FULL_BLOCK_ONLY", "INITS", "KL_REDUCTIONS", "BalconyConfig"]
