"""The SCOUT decode cache: per double block, the last w−1 K/V of the sliding-window mixer (or Mamba's
conv and SSM state) and the K/V of the checkpoint tokens seen so far, plus a per-row count of the
real tokens seen. Cached entries are fewer than tokens seen, so positions never come from a length.

Slots are padded per row: a row's entries are left-aligned and the rest are marked invalid. Slot
widths depend only on how many columns (tokens, pads included) the batch has processed, never on
another row's content, so one row's logits do not depend on the others'.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from reft_kernels.scout_attention import compact_index


@dataclass
class KVSlots:
    """K/V of some tokens of each row: keys, values (B, Hkv, L, D), content positions and validity (B, L)."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor

    @property
    def width(self) -> int:
        return self.keys.size(2)

    def cat(self, other: KVSlots) -> KVSlots:
        return KVSlots(torch.cat([self.keys, other.keys], 2), torch.cat([self.values, other.values], 2),
                       torch.cat([self.positions, other.positions], 1), torch.cat([self.valid, other.valid], 1))

    def compact(self, keep: torch.Tensor, width: int) -> KVSlots:
        """The kept entries of each row, in order, left-aligned in `width` slots."""
        index, slot_valid = compact_index(keep, width)
        kv_index = index[:, None, :, None].expand(-1, self.keys.size(1), -1, self.keys.size(3))
        return KVSlots(self.keys.gather(2, kv_index), self.values.gather(2, kv_index),
                       self.positions.gather(1, index), slot_valid)

    def index_select(self, rows: torch.Tensor) -> KVSlots:
        return KVSlots(self.keys.index_select(0, rows), self.values.index_select(0, rows),
                       self.positions.index_select(0, rows), self.valid.index_select(0, rows))

    def num_entries(self) -> int:
        return int(self.valid.sum())

    def entry_bytes(self) -> int:
        """Bytes of one token's K and V in this layer (all K/V heads)."""
        return 2 * self.keys.size(1) * self.keys.size(3) * self.keys.element_size()


class ScoutLayerCache:
    """What one double block keeps between forward calls."""

    def __init__(self):
        self.window: KVSlots | None = None  # sliding-window mixer
        self.checkpoints: KVSlots | None = None  # ScoutAttn
        self.conv_state: torch.Tensor | None = None  # Mamba mixer: (B, E, conv_kernel − 1) last inputs
        self.ssm_state: torch.Tensor | None = None  # Mamba mixer: (B, E, state_size), float32

    def index_select(self, rows: torch.Tensor) -> None:
        for name in ("window", "checkpoints", "conv_state", "ssm_state"):
            value = getattr(self, name)
            if isinstance(value, KVSlots):
                setattr(self, name, value.index_select(rows))
            elif value is not None:
                setattr(self, name, value.index_select(0, rows))


class ScoutCache(Cache):
    """Cache for `ScoutForCausalLM`; layers are created lazily by `layer_idx`, so a model run with some
    double blocks skipped gets one slot per block it runs."""

    is_compileable = False

    def __init__(self, config):
        super().__init__(layers=[])
        self.segment_size = config.segment_size
        self.sliding_window = config.sliding_window
        self.seen_tokens: torch.Tensor | None = None  # (B,) real tokens seen per row
        self.columns = 0  # tokens processed per row, pads included (what generate() calls the cache length)
        self._chunk: torch.Tensor | None = None  # validity of the chunk being processed

    # ------------------------------------------------------------------ bookkeeping

    def layer(self, layer_idx: int) -> ScoutLayerCache:
        while len(self.layers) <= layer_idx:
            self.layers.append(ScoutLayerCache())
        return self.layers[layer_idx]

    def begin(self, valid: torch.Tensor) -> torch.Tensor:
        """Starts a forward over a chunk whose real tokens are `valid` (B, T); returns the rows' seen
        counts before it."""
        if self.seen_tokens is None:
            self.seen_tokens = torch.zeros(valid.size(0), dtype=torch.long, device=valid.device)
        if self.seen_tokens.size(0) != valid.size(0):
            raise ValueError(f"batch of {valid.size(0)} rows for a cache of {self.seen_tokens.size(0)} rows")
        self._chunk = valid
        return self.seen_tokens

    def end(self) -> None:
        """Ends the forward begun by `begin`, after every block has used and updated its slots."""
        self.seen_tokens = self.seen_tokens + self._chunk.sum(dim=1)
        self.columns += self._chunk.size(1)
        self._chunk = None

    @property
    def columns_after_chunk(self) -> int:
        return self.columns + (0 if self._chunk is None else self._chunk.size(1))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.columns

    # ------------------------------------------------------------------ sliding window

    def update_window(self, layer_idx: int, new: KVSlots) -> KVSlots:
        """Returns cached ∪ new K/V for the chunk's queries; keeps per row only the last w−1 real
        tokens, the keys a later query can still see (its window is w keys including itself)."""
        slot = self.layer(layer_idx)
        keys = new if slot.window is None else slot.window.cat(new)
        masked = keys.positions.masked_fill(~keys.valid, -1)
        last = masked.max(dim=1, keepdim=True).values
        keep = keys.valid & (keys.positions > last + 1 - self.sliding_window)
        slot.window = keys.compact(keep, min(self.columns_after_chunk, self.sliding_window - 1))
        return keys

    # ------------------------------------------------------------------ checkpoints

    def checkpoints(self, layer_idx: int) -> KVSlots | None:
        return self.layer(layer_idx).checkpoints

    def store_checkpoints(self, layer_idx: int, checkpoints: KVSlots) -> None:
        """Keeps `checkpoints` (the cached ones plus this chunk's) after the chunk used them. A row of
        n real tokens has ⌊n/S⌋ of them, so ⌊columns/S⌋ slots hold every row."""
        count = int(checkpoints.valid.sum(dim=1).max()) if checkpoints.width else 0
        width = max(self.columns_after_chunk // self.segment_size, count)
        self.layer(layer_idx).checkpoints = checkpoints.compact(checkpoints.valid, width)

    # ------------------------------------------------------------------ Mamba

    def mamba_state(self, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        slot = self.layer(layer_idx)
        return slot.conv_state, slot.ssm_state

    def store_mamba_state(self, layer_idx: int, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> None:
        slot = self.layer(layer_idx)
        slot.conv_state, slot.ssm_state = conv_state, ssm_state

    # ------------------------------------------------------------------ sizes

    def kv_entries(self) -> dict[str, int]:
        """Exact number of cached K/V entries (one token's K and V in one block), summed over rows and
        blocks: the sliding-window part, the checkpoint part and their total."""
        window = sum(s.window.num_entries() for s in self.layers if s.window is not None)
        checkpoint = sum(s.checkpoints.num_entries() for s in self.layers if s.checkpoints is not None)
        return {"window": window, "checkpoint": checkpoint, "total": window + checkpoint}

    def nbytes(self) -> dict[str, int]:
        """Bytes of the cached K/V entries (`kv`), of the Mamba states (`recurrent`), and of every tensor
        as allocated, padding slots and positions included (`allocated`)."""
        kv = recurrent = allocated = 0
        for s in self.layers:
            for slots in (s.window, s.checkpoints):
                if slots is not None:
                    kv += slots.num_entries() * slots.entry_bytes()
                    allocated += sum(t.numel() * t.element_size()
                                     for t in (slots.keys, slots.values, slots.positions, slots.valid))
            for state in (s.conv_state, s.ssm_state):
                if state is not None:
                    recurrent += state.numel() * state.element_size()
                    allocated += state.numel() * state.element_size()
        return {"kv": kv, "recurrent": recurrent, "allocated": allocated}

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
        for slot in self.layers:
            slot.index_select(indices)
        if self.seen_tokens is not None:
            self.seen_tokens = self.seen_tokens.index_select(0, indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.seen_tokens is not None:
            self.batch_select_indices(torch.arange(self.seen_tokens.size(0), device=self.seen_tokens.device)
                                      .repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a SCOUT cache cannot be rolled back: the sliding window and the Mamba "
                                  "state forget what they drop")

    def reset(self) -> None:
        self.layers = []
        self.seen_tokens = None
        self.columns = 0
        self._chunk = None

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        raise NotImplementedError("SCOUT builds its own masks from content positions")

    def __repr__(self) -> str:
        return f"ScoutCache(blocks={len(self.layers)}, columns={self.columns}, entries={self.kv_entries()})"
