"""Layer-skipped behavior models (SPEC §1): which layers to skip, and skipping them in place.

A skipped decoder layer is the identity on the residual stream. `skip_layers` runs any Hugging
Face decoder-only model whose layers live in `model.model.layers` (Llama, Qwen2, Qwen3, Mistral
and their relatives) as the same model with those layers removed: no weight is copied, and the
model is restored exactly on exit.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence

from torch import nn

MODES = ("random", "contiguous", "strided", "fixed")


class LayerSkipPolicy:
    """Draws the set of layers to skip, once per generation round (seeded, replayable).

    k = round(skip_ratio * num_layers) layers are skipped, or k uniform in `k_range` (inclusive);
    the first `keep_first` and last `keep_last` layers are never skipped. Modes: `random`
    (uniform subset of the eligible layers), `contiguous` (one block at a random offset),
    `strided` (evenly spaced, random phase) or `fixed` (always `layers`).
    """

    def __init__(self, num_layers: int, skip_ratio: float = 0.25, keep_first: int = 2,
                 keep_last: int = 2, mode: str = "random", layers: Sequence[int] | None = None,
                 k_range: tuple[int, int] | None = None, seed: int = 0):
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not 0 <= skip_ratio < 1:
            raise ValueError(f"skip_ratio must be in [0, 1), got {skip_ratio!r}")
        if keep_first < 0 or keep_last < 0:
            raise ValueError(f"keep_first and keep_last must be >= 0, got {keep_first!r}, {keep_last!r}")
        self.num_layers, self.mode, self.seed = num_layers, mode, seed
        self.skip_ratio, self.keep_first, self.keep_last = skip_ratio, keep_first, keep_last
        self.eligible = tuple(range(keep_first, max(keep_first, num_layers - keep_last)))
        self.layers: tuple[int, ...] | None = None
        if mode == "fixed":
            if layers is None:
                raise ValueError("mode='fixed' needs `layers`, the explicit list of layers to skip")
            bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < num_layers]
            if bad:
                raise ValueError(f"layer indices {bad} are out of range for a model with {num_layers} layers")
            if len(set(layers)) >= num_layers:
                raise ValueError(f"cannot skip all {num_layers} layers (layers={list(layers)})")
            self.layers = tuple(sorted(set(layers)))
            self.k_range = (len(self.layers), len(self.layers))
        else:
            if layers is not None:
                raise ValueError(f"`layers` is only used with mode='fixed', got mode={mode!r}")
            if k_range is None:
                k = round(skip_ratio * num_layers)
                k_range = (k, k)
            k_min, k_max = k_range
            if not 0 <= k_min <= k_max:
                raise ValueError(f"k_range must satisfy 0 <= k_min <= k_max, got {tuple(k_range)!r}")
            if k_max > len(self.eligible):
                raise ValueError(
                    f"cannot skip {k_max} layers: only {len(self.eligible)} of {num_layers} are eligible "
                    f"with keep_first={keep_first}, keep_last={keep_last}"
                )
            self.k_range = (k_min, k_max)
        self._rng = random.Random(seed)
        self.history: list[tuple[int, ...]] = []

    def draw(self) -> tuple[int, ...]:
        """The next skip set: sorted layer indices (empty when nothing is skipped)."""
        k = self._rng.randint(*self.k_range)
        elig = self.eligible
        if self.mode == "fixed":
            skip = self.layers
        elif k == 0:
            skip = ()
        elif self.mode == "random":
            skip = tuple(sorted(self._rng.sample(elig, k)))
        elif self.mode == "contiguous":
            start = self._rng.randint(0, len(elig) - k)
            skip = elig[start : start + k]
        else:  # strided: k evenly spaced eligible layers, with a random phase
            step = len(elig) / k
            phase = self._rng.random() * step
            skip = tuple(sorted({elig[min(len(elig) - 1, int(phase + i * step))] for i in range(k)}))
        self.history.append(tuple(skip))
        return tuple(skip)

    def set_skip_ratio(self, skip_ratio: float) -> None:
        """Change r (the adaptive controller does); k becomes round(r * L), capped by the eligible layers."""
        if self.mode == "fixed":
            raise ValueError("the skip ratio of a 'fixed' policy cannot change")
        if not 0 <= skip_ratio < 1:
            raise ValueError(f"skip_ratio must be in [0, 1), got {skip_ratio!r}")
        k = min(round(skip_ratio * self.num_layers), len(self.eligible))
        self.skip_ratio, self.k_range = skip_ratio, (k, k)

    def state_dict(self) -> dict:
        return {"rng": self._rng.getstate(), "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self._rng.setstate(_as_rng_state(state["rng"]))
        self.history = [tuple(s) for s in state["history"]]


def _as_rng_state(state):
    # JSON round trips turn the state's tuples into lists; random.setstate needs tuples.
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def decoder_stack(model: nn.Module) -> nn.Module:
    """The module that owns the decoder `layers` ModuleList (e.g. `Qwen2Model`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    inner = getattr(base, "model", None)
    if inner is not None and isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return inner
    raise TypeError(
        f"layer skipping needs a decoder-only model with its layers in `model.model.layers` "
        f"(Llama, Qwen2, Qwen3, Mistral, ...); got {type(base).__name__}"
    )


def num_decoder_layers(model: nn.Module) -> int:
    return len(decoder_stack(model).layers)


@contextlib.contextmanager
def skip_layers(model: nn.Module, layers: Sequence[int]) -> Iterator[nn.Module]:
    """Run `model` with `layers` skipped (identity on the residual stream) inside the block.

    The kept layers are run as a shorter stack with their cache indices renumbered, exactly as a
    model rebuilt without the skipped layers would run; the KV cache that `generate()` creates
    then has one entry per kept layer. A cache must not be carried across different skip sets.
    Everything is restored on exit, also on exceptions.
    """
    stack = decoder_stack(model)
    original = stack.layers
    n = len(original)
    skip = set(layers)
    bad = [i for i in skip if not isinstance(i, int) or not 0 <= i < n]
    if bad:
        raise ValueError(f"layer indices {sorted(bad)} are out of range for a model with {n} layers")
    if len(skip) >= n:
        raise ValueError(f"cannot skip all {n} layers")
    if not skip:
        yield model
        return
    kept = [i for i in range(n) if i not in skip]
    config = stack.config
    saved_config = {k: getattr(config, k) for k in ("num_hidden_layers", "layer_types") if hasattr(config, k)}
    renumbered: list[tuple[nn.Module, int]] = []
    try:
        for new_idx, old_idx in enumerate(kept):
            for module in original[old_idx].modules():
                if getattr(module, "layer_idx", None) == old_idx:
                    renumbered.append((module, old_idx))
                    module.layer_idx = new_idx
        stack.layers = nn.ModuleList([original[i] for i in kept])
        config.num_hidden_layers = len(kept)
        if "layer_types" in saved_config and saved_config["layer_types"] is not None:
            config.layer_types = [saved_config["layer_types"][i] for i in kept]
        yield model
    finally:
        stack.layers = original
        for key, value in saved_config.items():
            setattr(config, key, value)
        for module, old_idx in renumbered:
            module.layer_idx = old_idx
