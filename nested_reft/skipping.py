"""Layer-skipped behavior models (SPEC §1): which layers to skip (`LayerSkipPolicy`); the
in-place skip itself (`skip_layers`) lives in `archs.skipping` and is re-exported here."""

from __future__ import annotations

import random
from collections.abc import Sequence

from archs.skipping import decoder_stack, num_decoder_layers, skip_layers, skippable_layers

__all__ = ["MODES", "LayerSkipPolicy", "decoder_stack", "num_decoder_layers", "skip_layers", "skippable_layers"]

MODES = ("random", "contiguous", "strided", "fixed")


class LayerSkipPolicy:
    """Draws the set of layers to skip, once per generation round (seeded, replayable).

    k = round(skip_ratio * num_layers) layers are skipped, or k uniform in `k_range` (inclusive);
    the first `keep_first` and last `keep_last` layers are never skipped, nor any layer outside
    `skippable` (the family's skippable units, `skippable_layers(model)`; default all). Modes: `random`
    (uniform subset of the eligible layers), `contiguous` (one block at a random offset),
    `strided` (evenly spaced, random phase) or `fixed` (always `layers`).
    """

    def __init__(self, num_layers: int, skip_ratio: float = 0.25, keep_first: int = 2,
                 keep_last: int = 2, mode: str = "random", layers: Sequence[int] | None = None,
                 k_range: tuple[int, int] | None = None, seed: int = 0,
                 skippable: Sequence[int] | None = None):
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
        allowed = set(range(num_layers)) if skippable is None else set(skippable)
        self.eligible = tuple(i for i in range(keep_first, max(keep_first, num_layers - keep_last)) if i in allowed)
        self.layers: tuple[int, ...] | None = None
        if mode == "fixed":
            if layers is None:
                raise ValueError("mode='fixed' needs `layers`, the explicit list of layers to skip")
            bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < num_layers]
            if bad:
                raise ValueError(f"layer indices {bad} are out of range for a model with {num_layers} layers")
            fixed = sorted(set(layers) - allowed)
            if fixed:
                raise ValueError(f"layers {fixed} may not be skipped in this model (skippable: {sorted(allowed)})")
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
                    + ("" if skippable is None else f" and skippable layers {sorted(allowed)}")
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

    @property
    def mean_skip_ratio(self) -> float:
        """The centre of the k range as a fraction of the layers (the controller's starting point)."""
        return (self.k_range[0] + self.k_range[1]) / 2 / self.num_layers

    def set_skip_ratio(self, skip_ratio: float) -> None:
        """Move the k range to `skip_ratio` (the adaptive controller does): its width is kept and
        its centre becomes r * L, rounded, then shifted to stay within [0, eligible layers]."""
        if self.mode == "fixed":
            raise ValueError("the skip ratio of a 'fixed' policy cannot change")
        if not 0 <= skip_ratio < 1:
            raise ValueError(f"skip_ratio must be in [0, 1), got {skip_ratio!r}")
        width = self.k_range[1] - self.k_range[0]
        k_min = round(skip_ratio * self.num_layers - width / 2)
        k_min = min(max(k_min, 0), len(self.eligible) - width)
        self.skip_ratio, self.k_range = skip_ratio, (k_min, k_min + width)

    def state_dict(self) -> dict:
        return {"rng": self._rng.getstate(), "history": list(self.history), "k_range": list(self.k_range)}

    def load_state_dict(self, state: dict) -> None:
        self._rng.setstate(_as_rng_state(state["rng"]))
        self.history = [tuple(s) for s in state["history"]]
        if "k_range" in state:
            self.k_range = tuple(state["k_range"])


def _as_rng_state(state):
    # JSON round trips turn the state's tuples into lists; random.setstate needs tuples.
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
