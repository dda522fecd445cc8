"""The DTRNet decode cache: per layer, the K/V of the tokens that attended, per row (ragged).

A dense layer keeps every real (non-pad) token, a routed layer only its routed tokens, so a routed layer
holds fewer entries than tokens seen. Positions therefore come from the explicit per-row count of real
tokens seen (`seen_tokens`), never from a cache length.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from reft_kernels.routed_attention import RoutedKV


class DTRNetCache(Cache):
    """Grows lazily by `layer_idx`, so it matches whatever layers run (e.g. under `skip_layers`)."""

    def __init__(self):
        super().__init__(layers=[])  # transformers' per-layer classes assume dense K/V; ours are `RoutedKV`
        self.stores: list[RoutedKV | None] = []
        self.seen_tokens: torch.Tensor | None = None  # (B,) real tokens seen per row
        self.seen_columns = 0  # input columns consumed (pads included): what generate() slices by

    def layer(self, layer_idx: int, like: torch.Tensor) -> RoutedKV:
        while len(self.stores) <= layer_idx:
            self.stores.append(None)
        if self.stores[layer_idx] is None:
            self.stores[layer_idx] = RoutedKV.empty(like)
        return self.stores[layer_idx]

    def positions(self, real: torch.Tensor) -> torch.Tensor:
        """Content positions (B, T) of a chunk's tokens, from the per-row seen count (pads get the
        position of the next real token; they are never attended)."""
        seen = self.seen_tokens if self.seen_tokens is not None else torch.zeros(
            real.shape[0], dtype=torch.long, device=real.device)
        return seen[:, None] + real.long().cumsum(1) - real.long()

    def advance(self, real: torch.Tensor) -> None:
        """Record a chunk as seen: called once per forward, after all layers ran."""
        counts = real.long().sum(1)
        self.seen_tokens = counts if self.seen_tokens is None else self.seen_tokens + counts
        self.seen_columns += real.shape[1]

    def entry_counts(self) -> torch.Tensor:
        """(num_layers, B): K/V entries (tokens) cached per layer and row, per KV head."""
        return torch.stack([s.lengths for s in self.stores if s is not None])

    # ---- the Cache interface generate() uses
    def __len__(self) -> int:
        return len(self.stores)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_columns

    @property
    def is_compileable(self) -> bool:
        return False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.seen_tokens is not None:
            self._select(torch.arange(self.seen_tokens.shape[0]).repeat_interleave(repeats))

    def _select(self, index: torch.Tensor) -> None:
        for store in self.stores:
            if store is not None:
                store.select_rows(index)
        if self.seen_tokens is not None:
            self.seen_tokens = self.seen_tokens[index.to(self.seen_tokens.device)]

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("DTRNetCache cannot be cropped (assisted decoding is not supported)")
