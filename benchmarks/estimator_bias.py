"""Exact bias and variance of the off-policy correction methods, by enumeration (SPEC §1, Bias).

    python -m benchmarks.estimator_bias [--vocab 5] [--length 3] [--mild 2] [--strong 2 3 4]
                                        [--seed 0] [--out outputs/benchmarks/estimator_bias.json]

A tiny random Qwen2 in float64 is the target π. Its vocabulary holds no EOS, so every completion
has exactly T = --length tokens, and there are V^T of them (V = --vocab). The behavior model μ is
the same model under `skip_layers(model, S)`, for a mild and a strong skip set S. Enumerating every
completion y of one prompt gives π(y), μ(y) and each per-token score g_{y,t} = ∇θ log π(y_t | y_<t)
(the full vector over all parameters). With a sequence-level reward R(y) (seeded, standard normal),
the on-policy gradient is g = Σ_y π(y) R(y) Σ_t g_{y,t}, and a method's one-sample estimator from
y ~ μ is ĝ(y) = R(y) Σ_t w_{y,t} g_{y,t}, with the weights of `correction_weights`. Per method,
exactly (no Monte Carlo):

- bias: ‖E_μ[ĝ] − g‖ / ‖g‖;
- variance: tr Cov_μ(ĝ) / ‖g‖² for one sample (n samples: n times less);
- ess: (E_μ Σ_t w_t)² / (T · E_μ Σ_t w_t²), the large-batch limit of the ESS the trainer logs.

The table also gives KL(μ‖π) per sequence and the variance of on-policy sampling (y ~ π, w ≡ 1).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from nested_reft.corrections import correction_weights
from nested_reft.skipping import skip_layers

# (method, keyword arguments of correction_weights) in table order
METHOD_GRID = [
    ("none", {}),
    ("tis", {"clip": 2.0}),
    ("tis", {"clip": math.inf}),
    ("retrace", {"lam": 1.0}),
    ("retrace", {"lam": 0.9}),
    ("seq_tis", {"clip": 2.0}),
    ("seq_mask", {"clip": 2.0}),
    ("seq_is", {"clip": math.inf}),
    ("seq_is", {"clip": 10.0}),
]


def make_model(vocab: int, num_layers: int = 6, seed: int = 1, layer_scale: float = 4.0,
               head_scale: float = 15.0) -> Qwen2ForCausalLM:
    """A tiny random float64 Qwen2 with peaky distributions that depend on its layers (weights
    scaled up), so that skipping layers changes them: with V = 5, T = 3 the completions have
    entropy 2.2 nats (of ln 125 = 4.8), and KL(μ‖π) per sequence is 0.15 with layer 2 skipped,
    1.6 with layers 2-4 skipped. (Qwen2's RMSNorm and rotary embedding still compute in float32:
    log-probs agree between forwards to about 1e-7.)"""
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=num_layers,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg).double().eval()
    with torch.no_grad():
        for p in model.model.layers.parameters():
            p.mul_(layer_scale)
        model.lm_head.weight.mul_(head_scale)
    return model


def prompt_for(vocab: int) -> list[int]:
    return [t % vocab for t in (1, 2, 3, 4)]


@dataclass
class Enumeration:
    """Every completion of one prompt, with its log-probs and score vectors.

    Score vectors are stored once per (prefix, next token) node: `scores[node[i, t]]` is
    g_{y_i,t} = ∇θ log π(y_t | prompt, y_<t) for completion `seqs[i]`.
    """

    vocab: int
    seqs: torch.Tensor           # (N, T) every completion, in base-V order
    logp_target: torch.Tensor    # (N, T) log π(y_t | y_<t)
    logp_behavior: torch.Tensor  # (N, T) log μ(y_t | y_<t)
    node: torch.Tensor           # (N, T) row of `scores`
    scores: torch.Tensor         # (K, P)
    gram: torch.Tensor           # (K, K) scores @ scores.T

    @property
    def length(self) -> int:
        return self.seqs.shape[1]

    def rows(self, completions) -> torch.Tensor:
        """Row of `seqs` for each completion (a list of T token ids each)."""
        digits = torch.tensor(completions, dtype=torch.long)
        powers = self.vocab ** torch.arange(self.length - 1, -1, -1)
        return digits @ powers

    def vector(self, coef: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Σ_i Σ_t coef[i, t] g_{y_i,t} over completions `rows` (default: all), shape (P,)."""
        node = self.node if rows is None else self.node[rows]
        per_node = torch.zeros(self.scores.shape[0], dtype=torch.float64)
        per_node.index_add_(0, node.flatten(), coef.double().flatten())
        return per_node @ self.scores

    def sq_norms(self, coef: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """‖Σ_t coef[i, t] g_{y_i,t}‖² for each row i, through the Gram matrix of the scores."""
        node = self.node if rows is None else self.node[rows]
        g = self.gram[node[:, :, None], node[:, None, :]]  # (n, T, T)
        c = coef.double()
        return torch.einsum("nt,nts,ns->n", c, g, c)


def _completion_logps(model, prompt: list[int], seqs: torch.Tensor) -> torch.Tensor:
    ids = torch.cat([torch.tensor(prompt).expand(len(seqs), -1), seqs], 1)
    logits = model(input_ids=ids).logits[:, len(prompt) - 1:-1]
    return torch.log_softmax(logits.double(), -1).gather(-1, seqs.unsqueeze(-1)).squeeze(-1)


def enumerate_completions(model, prompt: list[int], vocab: int, length: int, skip) -> Enumeration:
    """π, μ = π under `skip_layers(model, skip)`, and the score vectors of every completion."""
    params = [p for p in model.parameters() if p.requires_grad]
    seqs = torch.tensor(list(itertools.product(range(vocab), repeat=length)), dtype=torch.long)
    scores = []
    # one forward per prefix, one backward per next token: rows in base-V order of (prefix, token)
    for t in range(length):
        for prefix in itertools.product(range(vocab), repeat=t):
            logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + list(prefix)])).logits[0, -1], -1)
            for v in range(vocab):
                grads = torch.autograd.grad(logp[v], params, retain_graph=v < vocab - 1)
                scores.append(torch.cat([g.flatten() for g in grads]))
    scores = torch.stack(scores).double()
    # node of (y_<t, y_t): the nodes of all shorter prefixes come first, then y_0..y_t in base V
    offsets = torch.tensor([sum(vocab ** (s + 1) for s in range(t)) for t in range(length)])
    prefix_codes = torch.stack([seqs[:, : t + 1] @ (vocab ** torch.arange(t, -1, -1)) for t in range(length)], 1)
    node = offsets + prefix_codes
    with torch.no_grad():
        logp_target = _completion_logps(model, prompt, seqs)
    return Enumeration(vocab, seqs, logp_target, behavior_logps(model, prompt, seqs, skip), node, scores,
                       scores @ scores.T)


@torch.no_grad()
def behavior_logps(model, prompt: list[int], seqs: torch.Tensor, skip) -> torch.Tensor:
    """log μ(y_t | y_<t) of every completion: the model under `skip_layers(model, skip)`."""
    with skip_layers(model, tuple(skip)):
        return _completion_logps(model, prompt, seqs)


def make_reward(num_completions: int, seed: int = 0) -> torch.Tensor:
    """A sequence-level reward R(y): one seeded standard-normal value per completion."""
    return torch.randn(num_completions, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def exact_gradient(e: Enumeration, reward: torch.Tensor) -> torch.Tensor:
    """g = Σ_y π(y) R(y) Σ_t g_{y,t}."""
    pi = e.logp_target.sum(-1).exp()
    return e.vector((pi * reward)[:, None].expand_as(e.logp_target))


def method_weights(e: Enumeration, method: str, **kw) -> torch.Tensor:
    """The method's weights on every enumerated completion, (N, T) float64."""
    mask = torch.ones_like(e.logp_target)
    return correction_weights(e.logp_target, e.logp_behavior, mask, method, **kw).double()


def estimator_stats(e: Enumeration, reward: torch.Tensor, weights: torch.Tensor, *, sample_logp: torch.Tensor | None = None,
                    exact: torch.Tensor | None = None) -> dict[str, float]:
    """Exact bias, one-sample variance (both relative to ‖g‖) and ESS of ĝ(y) = R(y) Σ_t w_{y,t} g_{y,t}
    with y drawn from the distribution whose per-token log-probs are `sample_logp` (default: μ)."""
    exact = exact_gradient(e, reward) if exact is None else exact
    p = (e.logp_behavior if sample_logp is None else sample_logp).sum(-1).exp()
    coef = reward[:, None] * weights
    mean = e.vector(p[:, None] * coef)
    second = float(p @ e.sq_norms(coef))
    norm2 = float(exact @ exact)
    w_sq = float(p @ (weights * weights).sum(-1))
    return {
        "bias": float((mean - exact).norm()) / math.sqrt(norm2),
        "variance": (second - float(mean @ mean)) / norm2,
        "ess": float(p @ weights.sum(-1)) ** 2 / (e.length * w_sq) if w_sq > 0 else 0.0,
    }


def kl_behavior(e: Enumeration) -> float:
    """KL(μ‖π) per sequence: Σ_y μ(y) (log μ(y) − log π(y))."""
    log_mu, log_pi = e.logp_behavior.sum(-1), e.logp_target.sum(-1)
    return float((log_mu.exp() * (log_mu - log_pi)).sum())


def label(method: str, kw: dict) -> str:
    if "clip" in kw:
        clip = "∞" if math.isinf(kw["clip"]) else f"{kw['clip']:g}"
        return f"{method} C={clip}"
    if "lam" in kw:
        return f"{method} λ={kw['lam']:g}"
    return method


def measure(e: Enumeration, reward_seed: int) -> dict:
    """Every method of METHOD_GRID on one enumeration (one T, one skip set)."""
    reward = make_reward(len(e.seqs), reward_seed)
    exact = exact_gradient(e, reward)
    on_policy = estimator_stats(e, reward, torch.ones_like(e.logp_target), sample_logp=e.logp_target, exact=exact)
    rows = []
    for method, kw in METHOD_GRID:
        stats = estimator_stats(e, reward, method_weights(e, method, **kw), exact=exact)
        jkw = {k: ("inf" if math.isinf(v) else v) for k, v in kw.items()}  # strict JSON has no inf
        rows.append({"label": label(method, kw), "method": method, **jkw, **stats})
    return {"kl_behavior_per_sequence": kl_behavior(e),
            "on_policy_variance": on_policy["variance"], "methods": rows}


def table(result: dict) -> str:
    """Every method at T = --length."""
    lines = ["| mismatch | KL(μ‖π)/seq | method | rel. bias | rel. variance (1 sample) | ESS |",
             "|---|---|---|---|---|---|"]
    for m in result["mismatches"]:
        head = f"| {m['name']} (skip {m['skip']}) | {m['kl_behavior_per_sequence']:.3f}"
        lines.append(f"{head} | on-policy samples (y ~ π) | 0 | {m['on_policy_variance']:.3g} | 1 |")
        for r in m["methods"]:
            lines.append(f"{head} | {r['label']} | {r['bias']:.3g} | {r['variance']:.3g} | {r['ess']:.3f} |")
    return "\n".join(lines)


def sweep_table(result: dict) -> str:
    """Over T: the price of seq_is (its ESS, its variance over on-policy sampling's) and the bias
    of the untruncated per-token ratio, which is the sequence ratio only at T = 1."""
    lines = ["| mismatch | T | KL(μ‖π)/seq | seq_is C=∞: ESS | seq_is C=∞: variance / on-policy variance "
             "| tis C=∞: rel. bias |", "|---|---|---|---|---|---|"]
    for name in ("mild", "strong"):
        for entry in result["sweep"]:
            m = next(x for x in entry["mismatches"] if x["name"] == name)
            by = {r["label"]: r for r in m["methods"]}
            seq_is, tis = by["seq_is C=∞"], by["tis C=∞"]
            lines.append(f"| {name} (skip {m['skip']}) | {entry['length']} | {m['kl_behavior_per_sequence']:.3f} | "
                         f"{seq_is['ess']:.3f} | {seq_is['variance'] / m['on_policy_variance']:.2f} | "
                         f"{tis['bias']:.3g} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=5, help="V: completions are every sequence of T tokens out of V")
    p.add_argument("--length", type=int, default=3, help="T of the full table: generated tokens per completion")
    p.add_argument("--sweep", type=int, nargs="*", default=[1, 2, 3, 4], help="values of T for the seq_is-over-T table")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--mild", type=int, nargs="+", default=[2], help="layers skipped for the mild mismatch")
    p.add_argument("--strong", type=int, nargs="+", default=[2, 3, 4], help="layers skipped for the strong mismatch")
    p.add_argument("--seed", type=int, default=0, help="reward seed (the model is built with seed 1)")
    p.add_argument("--out", default="outputs/benchmarks/estimator_bias.json")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.vocab < 2 or min([args.length, *args.sweep]) < 1:
        raise ValueError(f"need --vocab >= 2 and lengths >= 1, got {args.vocab} and {[args.length, *args.sweep]}")
    for name in ("mild", "strong"):
        bad = [i for i in getattr(args, name) if not 0 <= i < args.layers]
        if bad:
            raise ValueError(f"--{name} layers {bad} are out of range for --layers {args.layers}")

    start = time.perf_counter()
    model = make_model(args.vocab, args.layers)
    prompt = prompt_for(args.vocab)
    by_length = {}
    for length in dict.fromkeys([args.length, *args.sweep]):  # each T once, in order
        e = enumerate_completions(model, prompt, args.vocab, length, skip=())
        by_length[length] = []
        for name in ("mild", "strong"):  # π's scores are shared; only μ changes with the skip set
            skip = getattr(args, name)
            mismatch = replace(e, logp_behavior=behavior_logps(model, prompt, e.seqs, skip))
            by_length[length].append({"name": name, "skip": skip, **measure(mismatch, args.seed)})
    result = {"setting": {"vocab": args.vocab, "length": args.length, "layers": args.layers, "prompt": prompt,
                          "reward_seed": args.seed, "completions": args.vocab ** args.length,
                          "parameters": sum(q.numel() for q in model.parameters()),
                          "seconds": round(time.perf_counter() - start, 2)},
              "mismatches": by_length[args.length],
              "sweep": [{"length": t, "mismatches": by_length[t]} for t in args.sweep]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    s = result["setting"]
    print(f"V = {s['vocab']}, T = {s['length']}: {s['completions']} completions, {s['parameters']} parameters "
          f"({s['seconds']} s in all)\n")
    print(table(result))
    if args.sweep:
        print("\n" + sweep_table(result))
    return result


if __name__ == "__main__":
    main()
