"""The Resona decode cache: ReGLA's (per recurrent layer the state, per softmax layer the K/V, per row the
seen count), plus per retrieval layer the read keys and values of every real token seen, in content
slots, and the summaries of the completed chunks; plus Mamba's conv and SSM state for `mixer="mamba"`.

Unlike ReGLA's, this cache grows with N: a retrieval layer keeps 2·H·D values per token (its chunks'
K/V) and H·D per completed chunk (the summary). That is what retrieval from the context costs.
"""

from __future__ import annotations

import torch

from ..regla.cache_regla import ReglaCache, ReglaLayerCache

RETRIEVAL_FIELDS = ("chunk_keys", "chunk_values", "summaries")
MAMBA_FIELDS = ("conv_state", "ssm_state")


class ResonaLayerCache(ReglaLayerCache):
    """ReGLA's slot of one layer plus the retrieval store and the Mamba state."""

    def __init__(self):
        super().__init__()
        self.chunk_keys: torch.Tensor | None = None  # (B, H, columns, D): slot s = the real token at content position s
        self.chunk_values: torch.Tensor | None = None
        self.summaries: torch.Tensor | None = None  # (B, H, columns // C, D); rows of incomplete chunks are 0
        self.conv_state: torch.Tensor | None = None  # Mamba mixer: (B, E, conv_kernel − 1)
        self.ssm_state: torch.Tensor | None = None  # Mamba mixer: (B, E, state_size)

    def index_select(self, rows: torch.Tensor) -> None:
        super().index_select(rows)
        for name in RETRIEVAL_FIELDS + MAMBA_FIELDS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.index_select(0, rows))

    def state_bytes(self) -> int:
        return super().state_bytes() + _bytes(self, MAMBA_FIELDS)

    def retrieval_bytes(self) -> int:
        return _bytes(self, RETRIEVAL_FIELDS)


def _bytes(slot, names) -> int:
    return sum(t.numel() * t.element_size() for t in (getattr(slot, n) for n in names) if t is not None)


class ResonaCache(ReglaCache):
    """Cache for `ResonaForCausalLM`; slots are created lazily by `layer_idx`, as ReGLA's."""

    def layer(self, layer_idx: int) -> ResonaLayerCache:
        while len(self.layers) <= layer_idx:
            self.layers.append(ResonaLayerCache())
        return self.layers[layer_idx]

    # ------------------------------------------------------------------ retrieval layers

    def chunk_store(self, layer_idx: int):
        """(keys, values, summaries) kept by a retrieval layer, or Nones before its first call."""
        slot = self.layer(layer_idx)
        return slot.chunk_keys, slot.chunk_values, slot.summaries

    def store_chunks(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, summaries: torch.Tensor) -> None:
        slot = self.layer(layer_idx)
        slot.chunk_keys, slot.chunk_values, slot.summaries = keys, values, summaries

    # ------------------------------------------------------------------ Mamba mixer (SCOUT's, same calls)

    def mamba_state(self, layer_idx: int):
        slot = self.layer(layer_idx)
        return slot.conv_state, slot.ssm_state

    def store_mamba_state(self, layer_idx: int, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> None:
        slot = self.layer(layer_idx)
        slot.conv_state, slot.ssm_state = conv_state, ssm_state

    # ------------------------------------------------------------------ sizes

    def nbytes(self) -> dict[str, int]:
        """ReGLA's counts (`state`: recurrent states, Mamba's included; `kv`: softmax layers' K/V;
        `bookkeeping`), plus `retrieval`: the retrieval layers' chunk K/V and summaries."""
        sizes = super().nbytes()
        retrieval = sum(s.retrieval_bytes() for s in self.layers)
        return {**sizes, "retrieval": retrieval, "total": sizes["total"] + retrieval}

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a Resona cache cannot be rolled back: the recurrent state forgets what it adds")

    def __repr__(self) -> str:
        return f"ResonaCache(layers={len(self.layers)}, columns={self.columns}, bytes={self.nbytes()})"
