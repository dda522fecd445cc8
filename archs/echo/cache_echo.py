"""The ECHO KV cache: one entry per layer that computes its own K/V; sharers store nothing.

A sharer reads its owner's entry (the same tensors, no copy), so the cache holds
`L - #sharers` entries instead of `L` and its bytes shrink by exactly `#sharers / L`. Entries are
keyed by the `layer_idx` of the layers present when it fills (it grows lazily), so a model run
under `archs.skipping.skip_layers` gets a cache of its kept layers. Besides the K/V it keeps a
per-row count of content (non-pad) tokens seen: the positions of new tokens come from that count,
never from the cache length (which counts pad columns too).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


def content_positions(seen: torch.Tensor | None, new_tokens: torch.Tensor) -> torch.Tensor:
    """Content positions (B, q) of new tokens from a (B, q) 0/1 mask of the new columns: the row's
    seen count (None: 0) plus the running count of content tokens among them; pads get 0, as in generate()."""
    base = seen if seen is not None else new_tokens.new_zeros(new_tokens.size(0))
    positions = base[:, None] + new_tokens.cumsum(-1) - 1
    return positions.masked_fill(new_tokens == 0, 0)


class EchoCache(Cache):
    def __init__(self):
        super().__init__(layers=[])
        self.slot_of: dict[int, int] = {}  # layer_idx -> index into self.layers
        self.seen_tokens: torch.Tensor | None = None  # (B,) content tokens seen per row

    # ------------------------------------------------------------------ K/V of the owners
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx not in self.slot_of:
            self.slot_of[layer_idx] = len(self.layers)
            self.layers.append(DynamicLayer())
        return self.layers[self.slot_of[layer_idx]].update(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Cached columns (pads included); every entry holds the same number."""
        return self.layers[0].get_seq_length() if self.layers else 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    @property
    def num_entries(self) -> int:
        """K/V entries stored: one per layer that computes its own K/V."""
        return len(self.layers)

    def kv_bytes(self) -> int:
        """Bytes of cached keys and values."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.keys, layer.values)
                   if t is not None)

    # ------------------------------------------------------------------ content positions
    def record_tokens(self, new_tokens: torch.Tensor) -> None:
        counts = new_tokens.sum(-1)
        self.seen_tokens = counts if self.seen_tokens is None else self.seen_tokens + counts

    # ------------------------------------------------------------------ batch bookkeeping
    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        if self.seen_tokens is not None:
            self.seen_tokens = self.seen_tokens.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        if self.seen_tokens is not None:
            self.seen_tokens = self.seen_tokens[indices]

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        if self.seen_tokens is not None:
            self.seen_tokens = self.seen_tokens.index_select(0, beam_idx.to(self.seen_tokens.device))

    def reset(self):
        super().reset()
        self.seen_tokens = None

    @property
    def is_croppable(self) -> bool:
        return False

    def crop(self, tokens_to_remove: int):
        raise NotImplementedError("EchoCache keeps per-row content-token counts and cannot be cropped "
                                  "(assisted / speculative decoding is not supported)")
