"""Off-policy correction weights for behavior-sampled tokens (SPEC §1), and their diagnostics.

With `d_t = log π_old(y_t) − log μ(y_t)` per token and `ρ_t = exp(d_t)`, each method gives a
per-token weight `w_t` that multiplies the GRPO per-token loss. Weights are detached, float32,
finite and non-negative for any input (±inf, NaN, ±1e30 log-probs), and zero where the mask is zero.

| method       | w_t                                                              |
|--------------|------------------------------------------------------------------|
| none         | 1                                                                |
| tis          | min(ρ_t, C)                                                      |
| retrace      | Π_{s≤t} c_s with c_s = λ · min(1, ρ_s) (the Retrace(λ) trace)    |
| seq_tis      | min(exp(mean_t d_t), C) on every token of a sequence             |
| seq_mask     | 1 if exp(mean_t d_t) ∈ [1/C, C] else 0                           |
| seq_is       | min(exp(Σ_t d_t), C) on every token of a sequence, C = ∞ allowed |
| ess_adaptive | as tis (the skip ratio is steered by `AdaptiveSkipController`)   |

Only `seq_is` at C = ∞ is unbiased for a sequence-level reward: it is the sequence ratio
π_old(y)/μ(y). The per-token ratios (`tis`, `retrace`) do not correct the distribution of the
prefix, and the geometric mean (`seq_tis`) is not the sequence ratio (docs/nested_reft.md). For GRPO
this holds with mean-centred advantages (`scale_rewards='none'`): dividing by the std of μ's group
makes even `seq_is` biased (19.9% in the exact enumeration of tests/nested_reft/test_unbiasedness.py).

Numerics: everything is computed in float64 log space. A NaN log-ratio (e.g. −inf minus −inf)
counts as −inf (weight 0); a sequence holding a −inf token has sequence log-ratio −inf (π_old gives
it probability 0), whatever else it holds. Every log-weight is capped at `LOG_WEIGHT_MAX` = 80
(e^80 ≈ 5.5e34, so float32 weights and sums of many of them stay finite): with C = ∞ (`tis`,
`seq_is`), that cap is the only truncation, and it binds only on ratios above e^80.
"""

from __future__ import annotations

import math

import torch

METHODS = ("none", "tis", "retrace", "seq_tis", "seq_mask", "ess_adaptive", "seq_is")
LOG_WEIGHT_MAX = 80.0


def _check(method: str, clip: float, lam: float) -> None:
    if method not in METHODS:
        raise ValueError(f"correction must be one of {METHODS}, got {method!r}")
    if not clip >= 1.0:
        raise ValueError(f"clip must be >= 1 (it bounds the importance ratio), got {clip!r}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam (Retrace λ) must be in [0, 1], got {lam!r}")


def _log_cap(clip: float) -> float:
    """The log-weight bound: log C, never above LOG_WEIGHT_MAX (so C = ∞ stays finite)."""
    return min(math.log(clip), LOG_WEIGHT_MAX)


def log_ratios(target_logps: torch.Tensor, behavior_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """d_t in float64, zero at masked positions; a NaN (e.g. -inf minus -inf) becomes -inf (weight 0)."""
    d = target_logps.detach().double() - behavior_logps.detach().double()
    d = torch.where(torch.isnan(d), torch.full_like(d, -math.inf), d)
    return torch.where(mask.bool(), d, torch.zeros_like(d))


def _sequence_sums(d: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_t d_t per sequence, shape (B,). Any -inf token makes it -inf; without one, +inf tokens
    give +inf (never inf - inf = NaN)."""
    neg_inf = (d == -math.inf) & mask.bool()
    total = torch.where(neg_inf, torch.zeros_like(d), d).sum(-1)
    return torch.where(neg_inf.any(-1), torch.full_like(total, -math.inf), total)


def sequence_log_ratios(d: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean_t d_t per sequence over unmasked tokens, shape (B,); 0 for empty sequences."""
    return _sequence_sums(d, mask) / mask.bool().sum(-1).clamp(min=1)


def correction_weights(target_logps: torch.Tensor, behavior_logps: torch.Tensor, mask: torch.Tensor,
                       method: str, *, clip: float = 2.0, lam: float = 1.0) -> torch.Tensor:
    """Per-token weights (B, T), detached, float32, finite, zero where `mask` is 0."""
    _check(method, clip, lam)
    valid = mask.bool()
    if method == "none":
        return valid.float()
    d = log_ratios(target_logps, behavior_logps, mask)
    log_c = _log_cap(clip)
    if method in ("tis", "ess_adaptive"):
        log_w = d.clamp(max=log_c)
    elif method == "retrace":
        # log c_s = log λ + min(0, d_s); masked positions add log 1 = 0 to the running product.
        log_lam = math.log(lam) if lam > 0 else -math.inf
        log_c_s = torch.where(valid, log_lam + d.clamp(max=0.0), torch.zeros_like(d))
        log_w = log_c_s.cumsum(-1)  # terms are <= 0 or -inf: never inf - inf
    elif method == "seq_mask":
        seq = sequence_log_ratios(d, mask)
        bound = math.log(clip)  # a rejection bound on the ratio, not a weight: no cap needed
        inside = (seq >= -bound) & (seq <= bound)
        log_w = torch.where(inside, torch.zeros_like(seq), torch.full_like(seq, -math.inf)).unsqueeze(-1).expand_as(d)
    else:
        seq = sequence_log_ratios(d, mask) if method == "seq_tis" else _sequence_sums(d, mask)
        log_w = seq.clamp(max=log_c).unsqueeze(-1).expand_as(d)
    w = torch.exp(log_w.clamp(max=LOG_WEIGHT_MAX))
    return torch.where(valid, w, torch.zeros_like(w)).float().detach()


@torch.no_grad()
def diagnostics(target_logps: torch.Tensor, behavior_logps: torch.Tensor, mask: torch.Tensor,
                weights: torch.Tensor, method: str, *, clip: float = 2.0) -> dict[str, float]:
    """What SPEC §1 asks to log each step, over unmasked tokens.

    ratio_{mean,min,max}: exp(d_t) (bounded at e^80 for the statistics only); clipped_frac: the
    fraction of tokens (for `retrace`: tokens with ρ_t > 1; for sequence methods: sequences) whose
    weight was truncated or masked; ess: (Σw)² / (N Σw²); kl_behavior: KL(μ‖π_old) ≈ mean(−d_t).
    """
    valid = mask.bool()
    n = int(valid.sum())
    if n == 0:
        return {"ratio_mean": 1.0, "ratio_min": 1.0, "ratio_max": 1.0, "clipped_frac": 0.0,
                "ess": 1.0, "kl_behavior": 0.0}
    d = log_ratios(target_logps, behavior_logps, mask)
    dv = d[valid]
    ratio = torch.exp(dv.clamp(max=LOG_WEIGHT_MAX))
    w = weights.detach().double()[valid]
    w_sum, w_sq = float(w.sum()), float((w * w).sum())
    log_c = _log_cap(clip)
    rows = valid.any(-1)
    if method in ("tis", "ess_adaptive"):
        clipped = float((dv > log_c).float().mean())
    elif method == "retrace":
        clipped = float((dv > 0).float().mean())
    elif method == "seq_tis":
        clipped = float((sequence_log_ratios(d, mask)[rows] > log_c).float().mean())
    elif method == "seq_is":
        clipped = float((_sequence_sums(d, mask)[rows] > log_c).float().mean())
    elif method == "seq_mask":
        seq, bound = sequence_log_ratios(d, mask)[rows], math.log(clip)
        clipped = float(((seq < -bound) | (seq > bound)).float().mean())
    else:
        clipped = 0.0
    finite = dv[torch.isfinite(dv)]
    return {
        "ratio_mean": float(ratio.mean()),
        "ratio_min": float(ratio.min()),
        "ratio_max": float(ratio.max()),
        "clipped_frac": clipped,
        "ess": (w_sum * w_sum) / (n * w_sq) if w_sq > 0 else 0.0,
        "kl_behavior": float((-finite).mean()) if finite.numel() else float("inf"),
    }


def effective_sample_size(weights: torch.Tensor, mask: torch.Tensor) -> float:
    """Normalised ESS (Σw)² / (N Σw²) in (0, 1] over unmasked entries."""
    w = weights.detach().double()[mask.bool()]
    sq = float((w * w).sum())
    return float(w.sum()) ** 2 / (w.numel() * sq) if sq > 0 else 0.0
