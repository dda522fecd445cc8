"""ReGLA's feature maps and refining gate (SPEC.md §9), and the running-max shift folded into the log-gate.

The trainer's chunked path and the sampler's recurrent decode both call `shifted_keys`, with the
running max carried in the cache between decode steps, so they use one shift rule.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG2 = math.log(2.0)


def variance_scale(feature_dim: int) -> float:
    """1 / (e · √(m (e² − 1))), applied to φ(q); m the feature dimension."""
    return 1.0 / (math.e * math.sqrt(feature_dim * (math.e**2 - 1.0)))


def query_features(q: torch.Tensor) -> torch.Tensor:
    """φ_q = exp(q − max_features q), per token and head."""
    return torch.exp(q - q.amax(dim=-1, keepdim=True))


def shifted_keys(k: torch.Tensor, valid: torch.Tensor, running_max: torch.Tensor | None):
    """φ_k = exp(k − m_t) with m_t the running max of k over features and this row's real tokens so
    far; the shift m_{t−1} − m_t (≤ 0) that rescales the state to the new max.

    k (B, H, T, D); valid (B, T) bool; running_max (B, H) before the chunk, −inf where the row has seen
    no real token (None: nothing seen). Pads have φ_k = 0, shift 0 and leave m unchanged; a row's
    first real token has shift 0 (its state is empty). Returns φ_k, shift (B, H, T), m after the chunk.
    """
    b, nh, t_len, _ = k.shape
    if running_max is None:
        running_max = k.new_full((b, nh), float("-inf"))
    real = valid[:, None, :]
    token_max = k.amax(dim=-1).masked_fill(~real, float("-inf"))
    m = torch.cummax(torch.cat([running_max[..., None].to(k.dtype), token_max], dim=-1), dim=-1).values
    before, after = m[..., :-1], m[..., 1:]
    # finite stand-ins where nothing has been seen, so no inf ever enters an exp or a gradient
    after_f = torch.where(torch.isfinite(after), after, torch.zeros_like(after))
    before_f = torch.where(torch.isfinite(before), before, after_f)
    shift = torch.where(real, before_f - after_f, torch.zeros_like(after_f))
    phi_k = torch.where(real[..., None], k - after_f[..., None], torch.full_like(k, float("-inf"))).exp()
    return phi_k, shift, m[..., -1]


def refined_log_gate(gate_logits: torch.Tensor, refine_logits: torch.Tensor | None) -> torch.Tensor:
    """log F for F = (1 − r) g² + r (1 − (1 − g)²), g = σ(a), r = σ(b); r ≡ 0 when `refine_logits` is None.

    F = g (g + 2r(1 − g)), so log F = log g + logaddexp(log g, log 2 + log r + log(1 − g)) with every
    log a logsigmoid: finite for any finite logits, never −inf. F ≤ 1 exactly; the clamp only removes
    rounding above 0 (GLA kernels assume log F ≤ 0).
    """
    log_g = F.logsigmoid(gate_logits)
    if refine_logits is None:
        return 2.0 * log_g
    refine = LOG2 + F.logsigmoid(refine_logits) + F.logsigmoid(-gate_logits)
    return (log_g + torch.logaddexp(log_g, refine)).clamp(max=0.0)
