"""Adaptive skip controller [ours, beyond the paper]: the skip ratio as a set point on ESS."""

from __future__ import annotations


class AdaptiveSkipController:
    """Raise the skip ratio while ESS stays above `target`, lower it when ESS falls below
    `target - band`, within [r_min, r_max]: the compute/bias trade-off becomes a set point."""

    def __init__(self, ratio: float, target: float = 0.8, band: float = 0.05, r_min: float = 0.0,
                 r_max: float = 0.5, step: float = 0.05):
        if not 0 <= r_min <= r_max < 1:
            raise ValueError(f"need 0 <= r_min <= r_max < 1, got {r_min!r}, {r_max!r}")
        if not 0 < target <= 1:
            raise ValueError(f"target ESS must be in (0, 1], got {target!r}")
        if not step > 0 or band < 0:
            raise ValueError(f"step must be > 0 and band >= 0, got step={step!r}, band={band!r}")
        self.target, self.band, self.r_min, self.r_max, self.step = target, band, r_min, r_max, step
        self.ratio = min(max(ratio, r_min), r_max)

    def update(self, ess: float) -> float:
        """The skip ratio for the next round, given the ESS measured on the last one."""
        if ess > self.target:
            self.ratio += self.step
        elif ess < self.target - self.band:
            self.ratio -= self.step
        self.ratio = round(min(max(self.ratio, self.r_min), self.r_max), 10)
        return self.ratio
