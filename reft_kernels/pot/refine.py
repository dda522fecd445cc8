"""Step 2 of PoT post-training: scale refinement Ŝ = S ⊙ (1 + Γ) (SPEC.md §10).

Γ (one entry per group) is trained with Adam through a straight-through estimator (STE) on

    L(Γ) = ||F(W, X) - F(W~(Γ), X)||² / ||F(W, X)||²  +  (λ/2) · mean(Γ²)

where X are calibration activations captured from the full-precision model.

STE: with x = W / Ŝ and Q(x) = sign(x) · 2**clamp(round(log2|x|), 0, E_max), the weight is
W~ = Ŝ · Q(x) and Q is treated as the identity inside its range (round(log2|x|) in [0, E_max])
and as a constant outside it, so ∂W~/∂Ŝ = Q(x) − x inside and Q(x) outside (the LSQ rule).
(Differentiating through log2 and round as identities would cancel exactly: d(Ŝ·W/Ŝ)/dŜ = 0.)

[ours] The error is normalised by the output energy, and the regulariser is a mean, so one
(lr, λ) works across layers of any size; the Γ with the lowest objective seen is kept (in layer
mode the objective is exact, computed from H = XᵀX/T, so "seen" costs nothing).

Granularity: "layer" — each linear alone, F(W, X) = X Wᵀ, via H (K × K) accumulated from the
layer's inputs; "block" — all linears of one decoder block jointly, F = the block's output,
re-run on the captured block inputs in mini-batches.
"""

from __future__ import annotations

import torch

from .format import grouped, max_exponent


def ste_pot_weight(w: torch.Tensor, scales_hat: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """W~(Ŝ) [N, K] in fp32, differentiable in Ŝ [N, G] through the STE described above."""
    n, k = w.shape
    wg, _ = grouped(w, group_size)  # [N, G, gs]; padded columns are sliced off at the end
    s = scales_hat.unsqueeze(-1)
    x = wg / s
    e_raw = torch.round(torch.log2(x.abs()))
    inside = ((e_raw >= 0) & (e_raw <= max_exponent(bits))).float()
    q = torch.sign(wg).masked_fill(wg == 0, 1.0) * torch.exp2(e_raw.clamp(0, max_exponent(bits)))
    x_ste = inside * x + (q - inside * x).detach()  # value Q(x); gradient 1 inside, 0 outside
    return (s * x_ste).reshape(n, -1)[:, :k]


def _objective(err: torch.Tensor, gamma: torch.Tensor, lam: float) -> torch.Tensor:
    return err + 0.5 * lam * gamma.pow(2).mean()


def refine_layer_scales(w: torch.Tensor, hessian: torch.Tensor, scales: torch.Tensor, bits: int,
                        group_size: int, steps: int = 200, lr: float = 1e-3, lam: float = 1e-4
                        ) -> tuple[torch.Tensor, dict]:
    """Refined fp32 scales for one linear layer from H = XᵀX / T; returns (scales, stats)."""
    w = w.detach().float()
    h = hessian.detach().float()
    s = scales.detach().float()
    ref = ((w @ h) * w).sum().clamp_min(1e-30)

    def rel_err(gamma):
        d = w - ste_pot_weight(w, s * (1 + gamma), bits, group_size)
        return ((d @ h) * d).sum() / ref

    gamma = torch.zeros_like(s, requires_grad=True)
    opt = torch.optim.Adam([gamma], lr=lr)
    with torch.no_grad():
        init_err = rel_err(gamma).item()
    best_obj, best_gamma, best_err = init_err, gamma.detach().clone(), init_err
    for _ in range(steps):
        err = rel_err(gamma)
        obj = _objective(err, gamma, lam)
        if obj.item() < best_obj:
            best_obj, best_gamma, best_err = obj.item(), gamma.detach().clone(), err.item()
        opt.zero_grad(set_to_none=True)
        obj.backward()
        opt.step()
    with torch.no_grad():  # the last step's Γ has not been scored yet
        err = rel_err(gamma)
        if _objective(err, gamma, lam).item() < best_obj:
            best_gamma, best_err = gamma.detach().clone(), err.item()
    return s * (1 + best_gamma), {"init_rel_err": init_err, "refined_rel_err": best_err}


def refine_block_scales(block: torch.nn.Module, linears: dict[str, torch.nn.Linear],
                        scales: dict[str, torch.Tensor], inputs: list[tuple[tuple, dict]],
                        targets: list[torch.Tensor], bits: int, group_size: int, steps: int = 200,
                        lr: float = 1e-3, lam: float = 1e-4) -> tuple[dict[str, torch.Tensor], dict]:
    """Refined scales of all `linears` (names relative to `block`) jointly, on the block's output.

    inputs[i] = (args, kwargs) of the block's forward for calibration batch i, targets[i] its
    full-precision output. Mini-batches cycle through the captured batches, one per step.
    """
    weights = {n: m.weight.detach().float() for n, m in linears.items()}
    base = {n: s.detach().float() for n, s in scales.items()}
    gammas = {n: torch.zeros_like(s, requires_grad=True) for n, s in base.items()}
    opt = torch.optim.Adam(list(gammas.values()), lr=lr)

    def output(i, gs):
        params = {f"{n}.weight": ste_pot_weight(weights[n], base[n] * (1 + gs[n]), bits, group_size)
                  for n in weights}
        args, kwargs = inputs[i]
        out = torch.func.functional_call(block, params, args, kwargs)
        return out[0] if isinstance(out, tuple) else out

    def rel_err(i, gs):
        return (output(i, gs) - targets[i]).pow(2).sum() / targets[i].pow(2).sum().clamp_min(1e-30)

    def full_err(gs):
        with torch.no_grad():
            return sum(rel_err(i, gs).item() for i in range(len(inputs))) / len(inputs)

    def reg(gs):
        return sum(g.pow(2).mean() for g in gs.values()) / len(gs)

    init_err = full_err(gammas)
    for step in range(steps):
        err = rel_err(step % len(inputs), gammas)
        obj = err + 0.5 * lam * reg(gammas)
        opt.zero_grad(set_to_none=True)
        obj.backward()
        opt.step()
    final_err = full_err(gammas)
    zero = {n: torch.zeros_like(g) for n, g in gammas.items()}
    keep = final_err + 0.5 * lam * reg(gammas).item() < init_err  # never worse than the init
    chosen = {n: base[n] * (1 + (gammas[n].detach() if keep else zero[n])) for n in base}
    return chosen, {"init_rel_err": init_err, "refined_rel_err": final_err if keep else init_err}
