"""The ReGLA decode cache: per GLA layer the state S (B, H, Dk, Dv, float32) and the running key max m
(B, H), constant in the number of tokens; per softmax layer (hybrid) the K/V of every column, as a
DynamicCache holds them; plus a per-row count of the real tokens seen, from which positions come.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache


class ReglaLayerCache:
    """What one decoder layer keeps between forward calls: a GLA state or softmax K/V."""

    def __init__(self):
        self.state: torch.Tensor | None = None  # GLA: (B, H, Dk, Dv), float32 (float64 for float64 models)
        self.running_max: torch.Tensor | None = None  # GLA: (B, H), −inf while a row has seen no real token
        self.keys: torch.Tensor | None = None  # softmax: (B, Hkv, columns, D), after RoPE
        self.values: torch.Tensor | None = None

    def index_select(self, rows: torch.Tensor) -> None:
        for name in ("state", "running_max", "keys", "values"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.index_select(0, rows))

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.state, self.running_max) if t is not None)

    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values) if t is not None)


class ReglaCache(Cache):
    """Cache for `ReglaForCausalLM`. Layers get their slot lazily by `layer_idx`, so a model run with
    layers skipped has one slot per layer that ran."""

    is_compileable = False

    def __init__(self, config=None):
        super().__init__(layers=[])
        self.seen_tokens: torch.Tensor | None = None  # (B,) real tokens seen per row
        self.columns = 0  # tokens processed per row, pads included (what generate() calls the cache length)
        self.column_valid: torch.Tensor | None = None  # (B, columns) which columns are real; softmax layers only
        self._chunk: torch.Tensor | None = None

    # ------------------------------------------------------------------ bookkeeping

    def layer(self, layer_idx: int) -> ReglaLayerCache:
        while len(self.layers) <= layer_idx:
            self.layers.append(ReglaLayerCache())
        return self.layers[layer_idx]

    def begin(self, valid: torch.Tensor, track_columns: bool) -> torch.Tensor:
        """Starts a forward over a chunk whose real tokens are `valid` (B, T); returns the rows' seen counts
        before it. `track_columns`: keep which columns are real (softmax layers mask their keys with it)."""
        if self.seen_tokens is None:
            self.seen_tokens = torch.zeros(valid.size(0), dtype=torch.long, device=valid.device)
            if track_columns:
                self.column_valid = valid[:, :0]
        if self.seen_tokens.size(0) != valid.size(0):
            raise ValueError(f"batch of {valid.size(0)} rows for a cache of {self.seen_tokens.size(0)} rows")
        if track_columns != (self.column_valid is not None):
            raise ValueError("this cache was started by a model with a different set of softmax layers "
                             "(a cache must not be carried across skip sets)")
        if track_columns:
            self.column_valid = torch.cat([self.column_valid, valid], dim=1)
        self._chunk = valid
        return self.seen_tokens

    def end(self) -> None:
        """Ends the forward begun by `begin`, after every layer has used and updated its slot."""
        self.seen_tokens = self.seen_tokens + self._chunk.sum(dim=1)
        self.columns += self._chunk.size(1)
        self._chunk = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.columns

    # ------------------------------------------------------------------ GLA layers

    def gla_state(self, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        slot = self.layer(layer_idx)
        return slot.state, slot.running_max

    def store_gla_state(self, layer_idx: int, state: torch.Tensor, running_max: torch.Tensor) -> None:
        slot = self.layer(layer_idx)
        # copies of views: a slice of the prefill's per-position maxima would keep all N of them alive
        slot.state, slot.running_max = state, running_max.clone()

    # ------------------------------------------------------------------ softmax layers

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """Appends the chunk's K/V (every column, pads masked by `column_valid`); returns all of them."""
        slot = self.layer(layer_idx)
        if slot.keys is None:
            slot.keys, slot.values = key_states, value_states
        else:
            slot.keys = torch.cat([slot.keys, key_states], dim=-2)
            slot.values = torch.cat([slot.values, value_states], dim=-2)
        return slot.keys, slot.values

    # ------------------------------------------------------------------ sizes

    def nbytes(self) -> dict[str, int]:
        """Bytes held: GLA states and running maxima (`state`), softmax K/V (`kv`), and the per-row
        bookkeeping (seen counts, column validity)."""
        state = sum(s.state_bytes() for s in self.layers)
        kv = sum(s.kv_bytes() for s in self.layers)
        book = sum(t.numel() * t.element_size() for t in (self.seen_tokens, self.column_valid) if t is not None)
        return {"state": state, "kv": kv, "bookkeeping": book, "total": state + kv + book}

    def kv_entries(self) -> int:
        """Cached K/V entries (one token's K and V in one softmax layer), summed over rows and layers."""
        return sum(s.keys.size(0) * s.keys.size(2) for s in self.layers if s.keys is not None)

    # ------------------------------------------------------------------ generate() plumbing

    @property
    def batch_size(self) -> int:
        return -1 if self.seen_tokens is None else self.seen_tokens.size(0)

    @property
    def is_initialized(self) -> bool:
        return self.seen_tokens is not None

    @property
    def is_croppable(self) -> bool:
        return False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keeps rows `indices` (in that order) of every per-row tensor: states, maxima, K/V, counts."""
        for slot in self.layers:
            slot.index_select(indices)
        if self.seen_tokens is not None:
            self.seen_tokens = self.seen_tokens.index_select(0, indices)
        if self.column_valid is not None:
            self.column_valid = self.column_valid.index_select(0, indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.seen_tokens is not None:
            self.batch_select_indices(torch.arange(self.seen_tokens.size(0), device=self.seen_tokens.device)
                                      .repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a ReGLA cache cannot be rolled back: the recurrent state forgets what it adds")

    def reset(self) -> None:
        self.layers = []
        self.seen_tokens = None
        self.columns = 0
        self.column_valid = None
        self._chunk = None

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        raise NotImplementedError("ReGLA builds its own masks from the cache's column validity")

    def __repr__(self) -> str:
        return f"ReglaCache(layers={len(self.layers)}, columns={self.columns}, bytes={self.nbytes()})"
