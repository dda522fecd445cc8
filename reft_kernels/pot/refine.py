"""Step 2 of PoT post-training: scale refinement Ŝ = S ⊙ (1 + Γ) (SPEC.md §10).

Γ (one entry per group) is trained with Adam through a straight-through estimator (STE) on

    L(Γ) = ||F(W, X) - F(W~(Γ), X)||² / ||F(W, X)||²  +  (λ/2) · mean(Γ²)

where X are calibration activations captured from the full-precision model (or, with
`quantize_model(sequential=True)`, from the model whose earlier blocks are already quantized).

STE: with x = W / Ŝ and Q(x) = sign(x) · 2**clamp(round(log2|x|), 0, E_max), the weight is
W~ = Ŝ · Q(x) and Q is treated as the identity inside its range (round(log2|x|) in [0, E_max])
and as a constant outside it, so ∂W~/∂Ŝ = Q(x) − x inside and Q(x) outside (the LSQ rule).
(Differentiating through log2 and round as identities would cancel exactly: d(Ŝ·W/Ŝ)/dŜ = 0.)

[ours] The error is normalised by the output energy, and the regulariser is a mean, so one
(lr, λ) works across layers of any size; the Γ with the lowest objective seen is kept (in layer
mode the objective is exact, computed from H = XᵀX/T, so "seen" costs nothing).

Granularity: "layer" — each linear alone, F(W, X) = X Wᵀ, via H (K × K) accumulated from the
layer's inputs; "block" — all linears of one decoder block jointly, F = the block's output,
re-run on the captured block inputs in mini-batches; "model" [ours] — all Γ of the model
jointly, on the end-to-end objective KL(p_fp ‖ p_PoT) of the next-token distributions over the
calibration tokens (`refine_model_scales`).

Rounding: `rounding` picks how codes are chosen for given scales ("log2", SPEC's round(log2),
or "linear", the nearest level; `reference.round_exponent`), in the STE exactly as in storage.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .format import clamp_pot_scales, grouped, max_exponent
from .reference import round_exponent


def ste_pot_weight(w: torch.Tensor, scales_hat: torch.Tensor, bits: int, group_size: int,
                   rounding: str = "log2") -> torch.Tensor:
    """W~(Ŝ) [N, K] in fp32, differentiable in Ŝ [N, G] through the STE described above
    (codes chosen by `rounding`, as `reference.round_exponent`). [ours] The forward rounds Ŝ to
    the fp16 scale that will be stored (`clamp_pot_scales`; straight through in the backward),
    so its value is exactly the dequantized weight of `pot_quantize(w, Ŝ)`."""
    n, k = w.shape
    wg, _ = grouped(w, group_size)  # [N, G, gs]; padded columns are sliced off at the end
    # the forward uses the scales as they will be stored (fp16, clamped); gradient: identity
    s16 = clamp_pot_scales(scales_hat.detach(), bits).float()
    s = (scales_hat + (s16 - scales_hat).detach()).unsqueeze(-1)
    x = wg / s
    e_raw = round_exponent(x.abs().detach(), rounding)
    inside = ((e_raw >= 0) & (e_raw <= max_exponent(bits))).float()
    q = torch.sign(wg).masked_fill(wg == 0, 1.0) * torch.exp2(e_raw.clamp(0, max_exponent(bits)))
    x_ste = inside * x + (q - inside * x).detach()  # value Q(x); gradient 1 inside, 0 outside
    return (s * x_ste).reshape(n, -1)[:, :k]


def _objective(err: torch.Tensor, gamma: torch.Tensor, lam: float) -> torch.Tensor:
    return err + 0.5 * lam * gamma.pow(2).mean()


def refine_layer_scales(w: torch.Tensor, hessian: torch.Tensor, scales: torch.Tensor, bits: int,
                        group_size: int, steps: int = 200, lr: float = 1e-3, lam: float = 1e-4,
                        rounding: str = "log2") -> tuple[torch.Tensor, dict]:
    """Refined fp32 scales for one linear layer from H = XᵀX / T; returns (scales, stats)."""
    w = w.detach().float()
    h = hessian.detach().float()
    s = scales.detach().float()
    ref = ((w @ h) * w).sum().clamp_min(1e-30)

    def rel_err(gamma):
        d = w - ste_pot_weight(w, s * (1 + gamma), bits, group_size, rounding)
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
                        lr: float = 1e-3, lam: float = 1e-4, rounding: str = "log2"
                        ) -> tuple[dict[str, torch.Tensor], dict]:
    """Refined scales of all `linears` (names relative to `block`) jointly, on the block's output.

    inputs[i] = (args, kwargs) of the block's forward for calibration batch i, targets[i] its
    full-precision output. Mini-batches cycle through the captured batches, one per step.
    """
    weights = {n: m.weight.detach().float() for n, m in linears.items()}
    base = {n: s.detach().float() for n, s in scales.items()}
    gammas = {n: torch.zeros_like(s, requires_grad=True) for n, s in base.items()}
    opt = torch.optim.Adam(list(gammas.values()), lr=lr)

    def output(i, gs):
        params = {f"{n}.weight": ste_pot_weight(weights[n], base[n] * (1 + gs[n]), bits, group_size, rounding)
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


def _kl_to_teacher(logits: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(p_teacher ‖ p_student) from student logits and teacher log-probs."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return (teacher_logp.exp() * (teacher_logp - logp)).sum(-1).mean()


def refine_model_scales(model: torch.nn.Module, linears: dict[str, torch.nn.Linear],
                        scales: dict[str, torch.Tensor], batches: list[torch.Tensor], bits: int,
                        group_size: int, steps: int = 200, lr: float = 1e-3, lam: float = 1e-4,
                        rounding: str = "log2", val_batches: list[torch.Tensor] | None = None,
                        eval_every: int = 50, progress: bool = False, cosine: bool = True
                        ) -> tuple[dict[str, torch.Tensor], dict]:
    """[ours] End-to-end refinement: all Γ jointly, on KL(p_fp ‖ p_PoT) of the model's logits.

    `model` is the full-precision model (its linears are `linears`, by qualified name); the
    teacher distribution is its own output on each batch (computed once, kept as log-probs).
    Adam steps cycle through `batches` (LongTensor [b, T], no padding); every `eval_every` steps
    and at the end, the mean KL over `val_batches` (default: `batches`) is measured and the Γ with
    the lowest one — the init included — is returned, so the result is never worse than the
    starting scales on that set. `cosine`: the learning rate decays from `lr` to 0 over the steps
    (a cosine), so the last steps settle instead of oscillating between code flips.
    """
    device = next(model.parameters()).device
    weights = {n: m.weight.detach().float() for n, m in linears.items()}
    base = {n: scales[n].detach().float() for n in linears}
    gammas = {n: torch.zeros_like(s, requires_grad=True) for n, s in base.items()}
    opt = torch.optim.Adam(list(gammas.values()), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1)) if cosine else None

    @torch.no_grad()
    def teacher(ids):
        return torch.log_softmax(model(input_ids=ids.to(device), use_cache=False).logits.float(), -1)

    train_t = [teacher(b) for b in batches]
    if val_batches is None:  # validate on the training batches: reuse their teacher log-probs
        val_batches, val_t = batches, train_t
    else:
        val_t = [teacher(b) for b in val_batches]

    def kl(ids, t_logp, gs):
        params = {f"{n}.weight": ste_pot_weight(weights[n], base[n] * (1 + gs[n]), bits, group_size, rounding)
                  for n in weights}
        out = torch.func.functional_call(model, params, (), {"input_ids": ids.to(device), "use_cache": False})
        return _kl_to_teacher(out.logits, t_logp)

    def val_kl(gs):
        with torch.no_grad():
            return sum(kl(b, t, gs).item() * b.numel() for b, t in zip(val_batches, val_t)) / sum(
                b.numel() for b in val_batches)

    def reg(gs):
        return sum(g.pow(2).sum() for g in gs.values()) / sum(g.numel() for g in gs.values())

    init_kl = val_kl(gammas)
    best_kl, best = init_kl, {n: torch.zeros_like(g) for n, g in gammas.items()}
    history = [init_kl]
    bar = tqdm(range(1, steps + 1), desc="PoT refine (model, KL)", disable=not progress)
    for step in bar:
        i = (step - 1) % len(batches)
        obj = kl(batches[i], train_t[i], gammas) + 0.5 * lam * reg(gammas)
        opt.zero_grad(set_to_none=True)
        obj.backward()
        opt.step()
        if sched is not None:
            sched.step()
        if step % eval_every == 0 or step == steps:
            cur = val_kl(gammas)
            history.append(cur)
            if cur < best_kl:
                best_kl, best = cur, {n: g.detach().clone() for n, g in gammas.items()}
            bar.set_postfix(val_kl=f"{init_kl:.2e}->{best_kl:.2e}")
    chosen = {n: base[n] * (1 + best[n]) for n in base}
    return chosen, {"init_kl": init_kl, "refined_kl": best_kl, "val_kl_history": history}
