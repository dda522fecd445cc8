"""Step 1 of PoT post-training: per-group scale initialisation by grid search (SPEC.md §10).

    s0 = max|W_g| / 2**E_max,   s = s0 * b*,   b* = argmin_b ||W_g - W~_g(s0 * b)||^2

over b in {0.01 i : i = 1..200} by default. (SPEC writes the denominator as 2**(qmax - 1) with
qmax = 2**(n-1) exponent levels, i.e. 2**E_max: at b = 1 the largest weight sits on the top
level.) [ours] The grid stops at 2.00: past b = 2 every level has moved up a full octave, so
larger b only clamps more weights to the lowest level. Candidate scales are rounded to fp16 and
clamped exactly as they will be stored, so the error is that of the stored weight.
"""

from __future__ import annotations

import torch

from .format import check_bits, check_group_size, clamp_pot_scales, grouped, max_exponent
from .reference import PoTWeight, check_rounding, pot_quantize, round_exponent


def default_grid() -> torch.Tensor:
    return torch.arange(1, 201, dtype=torch.float32) * 0.01


def _fake_quant_grouped(wg: torch.Tensor, s: torch.Tensor, bits: int, rounding: str = "log2") -> torch.Tensor:
    """wg [N, G, gs], s [N, G] -> s * sign * 2**clamp(rounded log2|w|/s, 0, E_max)."""
    s = s.float().unsqueeze(-1)
    e = round_exponent(wg.abs() / s, rounding).clamp(0, max_exponent(bits))
    return torch.where(wg < 0, -s, s) * torch.exp2(e)


@torch.no_grad()
def grid_search_scales(w: torch.Tensor, bits: int, group_size: int = 128,
                       grid: torch.Tensor | None = None, rounding: str = "log2") -> torch.Tensor:
    """fp16 [N, G] scales minimising the squared weight error of each group over the grid, with
    codes chosen by `rounding` (see `reference.round_exponent`) as they will be when stored."""
    check_bits(bits)
    check_group_size(group_size)
    check_rounding(rounding)
    grid = default_grid() if grid is None else torch.as_tensor(grid, dtype=torch.float32)
    if grid.numel() == 0 or not bool((grid > 0).all()):
        raise ValueError(f"the scale grid must be non-empty and positive, got {grid.tolist()}")
    wg, mask = grouped(w.detach().float(), group_size)
    s0 = wg.abs().amax(-1) / 2 ** max_exponent(bits)
    best_err = torch.full_like(s0, torch.inf)
    best = clamp_pot_scales(s0, bits)
    for b in grid.tolist():
        s = clamp_pot_scales(s0 * b, bits)
        err = ((wg - _fake_quant_grouped(wg, s, bits, rounding)) ** 2 * mask).sum(-1)
        better = err < best_err  # strict: the first (smallest) b wins ties
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s, best)
    return best


def quantize_pot_init(w: torch.Tensor, bits: int, group_size: int = 128,
                      grid: torch.Tensor | None = None, rounding: str = "log2") -> PoTWeight:
    """Grid-searched scales, then codes: PoT 'init only' (no refinement)."""
    return pot_quantize(w, grid_search_scales(w, bits, group_size, grid, rounding), bits, group_size, rounding)
