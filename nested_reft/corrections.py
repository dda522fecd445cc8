"""Off-policy correction weights for behavior-sampled tokens (SPEC §1), and their diagnostics.

With `d_t = log π_old(y_t) − log μ(y_t)` per token, each method gives a per-token weight `w_t`
that multiplies the GRPO per-token loss. Everything is computed in log space, so log-ratios of
±1e4 give no inf or NaN; weights are detached and zero where the mask is zero.

| method       | w_t                                                  |
|--------------|------------------------------------------------------|
| none         | 1                                                    |
| tis          | min(exp(d_t), C)                                     |
| retrace      | λ · min(1, exp(d_t))                                 |
| seq_tis      | min(exp(mean_t d_t), C) on every token of a sequence |
| seq_mask     | 1 if exp(mean_t d_t) ∈ [1/C, C] else 0               |
| ess_adaptive | as tis (the skip ratio is steered by `AdaptiveSkipController`) |
"""

from __future__ import annotations

import math

import torch

METHODS = ("none", "tis", "retrace", "seq_tis", "seq_mask", "ess_adaptive")


def _check(method: str, clip: float, lam: float) -> None:
    if method not in METHODS:
        raise ValueError(f"correction must be one of {METHODS}, got {method!r}")
    if not clip >= 1.0:
        raise ValueError(f"clip must be >= 1 (it bounds the importance ratio), got {clip!r}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam (Retrace λ) must be in [0, 1], got {lam!r}")


def log_ratios(target_logps: torch.Tensor, behavior_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """d_t, zero at masked positions; a NaN (e.g. -inf minus -inf) becomes -inf (weight 0)."""
    d = (target_logps.detach().float() - behavior_logps.detach().float())
    d = torch.where(torch.isnan(d), torch.full_like(d, -math.inf), d)
    return torch.where(mask.bool(), d, torch.zeros_like(d))


def sequence_log_ratios(d: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean_t d_t per sequence over unmasked tokens, shape (B,); 0 for empty sequences."""
    m = mask.float()
    total = torch.where(m.bool(), d, torch.zeros_like(d)).sum(-1)
    return total / m.sum(-1).clamp(min=1.0)


def correction_weights(target_logps: torch.Tensor, behavior_logps: torch.Tensor, mask: torch.Tensor,
                       method: str, *, clip: float = 2.0, lam: float = 1.0) -> torch.Tensor:
    """Per-token weights (B, T), detached, float32, zero where `mask` is 0."""
    _check(method, clip, lam)
    m = mask.float()
    if method == "none":
        return m.clone()
    d = log_ratios(target_logps, behavior_logps, mask)
    log_c = math.log(clip)
    if method in ("tis", "ess_adaptive"):
        w = torch.exp(d.clamp(max=log_c))
    elif method == "retrace":
        w = lam * torch.exp(d.clamp(max=0.0))
    else:
        seq = sequence_log_ratios(d, mask)
        if method == "seq_tis":
            w = torch.exp(seq.clamp(max=log_c))
        else:  # seq_mask
            w = ((seq >= -log_c) & (seq <= log_c)).float()
        w = w.unsqueeze(-1).expand_as(m)
    return (w * m).detach()


@torch.no_grad()
def diagnostics(target_logps: torch.Tensor, behavior_logps: torch.Tensor, mask: torch.Tensor,
                weights: torch.Tensor, method: str, *, clip: float = 2.0) -> dict[str, float]:
    """What SPEC §1 asks to log each step, over unmasked tokens.

    ratio_{mean,min,max}: exp(d_t) (bounded at e^80 for the statistics only); clipped_frac: the
    fraction of tokens (or, for sequence methods, of sequences) whose weight was truncated or
    masked; ess: (Σw)² / (N Σw²); kl_behavior: KL(μ‖π_old) ≈ mean(−d_t).
    """
    valid = mask.bool()
    n = int(valid.sum())
    if n == 0:
        return {"ratio_mean": 1.0, "ratio_min": 1.0, "ratio_max": 1.0, "clipped_frac": 0.0,
                "ess": 1.0, "kl_behavior": 0.0}
    d = log_ratios(target_logps, behavior_logps, mask)
    dv = d[valid]
    ratio = torch.exp(dv.clamp(max=80.0))
    w = weights.detach().float()[valid]
    w_sum, w_sq = float(w.sum()), float((w * w).sum())
    log_c = math.log(clip)
    if method in ("tis", "ess_adaptive"):
        clipped = float((dv > log_c).float().mean())
    elif method == "retrace":
        clipped = float((dv > 0).float().mean())
    elif method in ("seq_tis", "seq_mask"):
        seq = sequence_log_ratios(d, mask)[valid.any(-1)]
        out = (seq > log_c) if method == "seq_tis" else ((seq < -log_c) | (seq > log_c))
        clipped = float(out.float().mean())
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
    w = weights.detach().float()[mask.bool()]
    sq = float((w * w).sum())
    return float(w.sum()) ** 2 / (w.numel() * sq) if sq > 0 else 0.0
