"""SCOUT attention ops (SPEC.md §4): checkpoint attention and the causal sliding window.

- `reference`: the two masks written out densely over content positions, and masked attention with
  one fp32 softmax (the obviously-correct quadratic form)
- `checkpoints`: checkpoint attention over {self} ∪ gathered checkpoints, T × (1 + T/S) scores, as
  the model runs it in prefill and decode
"""

from .checkpoints import checkpoint_attention, checkpoint_visible, compact_index, is_checkpoint
from .reference import checkpoint_mask, masked_attention, sliding_window_mask, softmax_dtype

__all__ = [
    "checkpoint_attention", "checkpoint_visible", "compact_index", "is_checkpoint",
    "checkpoint_mask", "masked_attention", "sliding_window_mask", "softmax_dtype",
]
