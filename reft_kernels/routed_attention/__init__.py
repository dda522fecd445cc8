"""Routed attention (DTRNet, SPEC §5): causal attention among the routed tokens of each row; a token that
is not routed attends to itself only (its output is its own value).

- `naive`: `routed_attention_naive`, a per-row, per-token loop: the obviously-correct reference
- `masked`: the boolean mask `diag ∪ (routed_i ∧ routed_j ∧ j < i)` (with cached keys in front), for
  eager / SDPA attention over all tokens
- `packed`: routed tokens gathered per row (`RoutedKV`), packed into variable-length segments and
  attended with `varlen_attention_torch` (plain torch) or `varlen_attention_flash` (flash-attn, optional)
"""

from .masked import routed_attention_mask
from .naive import routed_attention_naive
from .packed import (
    PackedSegments,
    RoutedKV,
    pack_routed,
    unpack_routed,
    varlen_attention_flash,
    varlen_attention_torch,
)

__all__ = [
    "routed_attention_mask", "routed_attention_naive", "PackedSegments", "RoutedKV", "pack_routed",
    "unpack_routed", "varlen_attention_flash", "varlen_attention_torch",
]
