"""Exact bias and variance of the corrections when the behavior model is stale *and* skipped, by
enumeration: the setting of asynchronous rollouts, where a round sampled by the policy of s
optimizer steps ago (with layers skipped) is trained on by the current policy.

    python -m benchmarks.staleness_bias [--vocab 5] [--length 3] [--stale 0 1 2] [--skip 2] [--lr 0.003]
                                        [--seed 0] [--out outputs/benchmarks/staleness_bias.json]

The model and the enumeration are `estimator_bias`'s (tiny float64 Qwen2, every completion of one
prompt). Training is exact: each SGD step moves θ along the exact policy gradient of a training
reward (seeded, standard normal, another seed than the evaluation reward), θ ← θ + lr · g/‖g‖ (a step of
length lr in parameter space; the raw gradient of this deliberately peaky model is huge). After
s steps, π = π_θs (the current policy, whose score vectors the estimators use) and the sampler is
μ = π_θ0 with the layers `--skip` skipped. Per method of `estimator_bias.METHOD_GRID`, exactly: the
bias and one-sample variance relative to the on-policy gradient of the evaluation reward, and ESS.

The log-ratio splits into a staleness part and a skipping part,
log π(y) − log μ(y) = [log π_θs(y) − log π_θ0(y)] + [log π_θ0(y) − log μ(y)],
reported as KL per sequence of each (KL(π_θ0‖π_θs) and KL(μ‖π_θ0)) next to the total KL(μ‖π).

Negative control: seq_is whose μ ignores the staleness (the *current* policy with the layers skipped,
what a trainer that rescored its samples with the skipped current model would divide by) while the
samples still come from the stale sampler: biased, by the amount in the `control` column.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.estimator_bias import (
    behavior_logps,
    enumerate_completions,
    estimator_stats,
    exact_gradient,
    make_model,
    make_reward,
    measure,
    method_weights,
    prompt_for,
)

TRAIN_REWARD_SEED = 1000  # the reward the SGD steps ascend (the evaluation reward is --seed)


def sgd_steps(model, prompt: list[int], vocab: int, length: int, steps: int, lr: float) -> list:
    """Copies of `model` after 0..steps exact policy-gradient steps on the training reward."""
    reward = None
    models = [copy.deepcopy(model)]
    current = copy.deepcopy(model)
    for _ in range(steps):
        e = enumerate_completions(current, prompt, vocab, length, skip=())
        if reward is None:
            reward = make_reward(len(e.seqs), TRAIN_REWARD_SEED)
        grad = exact_gradient(e, reward)
        step = grad / grad.norm()  # a step of length lr in parameter space: the raw gradient of this peaky model is huge
        params = [p for p in current.parameters() if p.requires_grad]
        with torch.no_grad():
            offset = 0
            for p in params:
                p.add_(lr * step[offset: offset + p.numel()].view_as(p).to(p.dtype))
                offset += p.numel()
        models.append(copy.deepcopy(current))
    return models


def kl(logp_a: torch.Tensor, logp_b: torch.Tensor) -> float:
    """KL(a‖b) per sequence from per-token log-probs of every completion."""
    a, b = logp_a.sum(-1), logp_b.sum(-1)
    return float((a.exp() * (a - b)).sum())


def measure_stale(models: list, stale: int, skip, prompt: list[int], vocab: int, length: int, seed: int) -> dict:
    """π = models[stale] (current), μ = models[0] with `skip` skipped; every method, the split, the control."""
    current, sampler = models[stale], models[0]
    e = enumerate_completions(current, prompt, vocab, length, skip=())
    logp_stale = behavior_logps(sampler, prompt, e.seqs, ())
    logp_mu = behavior_logps(sampler, prompt, e.seqs, skip)
    e = replace(e, logp_behavior=logp_mu)
    result = measure(e, seed)
    # the control: seq_is dividing by the skipped *current* policy, sampled from the real μ
    wrong = replace(e, logp_behavior=behavior_logps(current, prompt, e.seqs, skip))
    reward = make_reward(len(e.seqs), seed)
    control = estimator_stats(e, reward, method_weights(wrong, "seq_is", clip=math.inf), sample_logp=logp_mu)
    return {"stale_steps": stale, "skip": list(skip), **result,
            "kl_staleness": kl(logp_stale, e.logp_target), "kl_skipping": kl(logp_mu, logp_stale),
            "control_seq_is_ignoring_staleness": control}


def table(result: dict) -> str:
    lines = ["| steps stale | skip | KL(μ‖π) | of which: staleness KL(π_old‖π) | skipping KL(μ‖π_old) | method | rel. bias "
             "| rel. variance (1 sample) | ESS |", "|---|---|---|---|---|---|---|---|---|"]
    for m in result["settings"]:
        head = (f"| {m['stale_steps']} | {m['skip']} | {m['kl_behavior_per_sequence']:.3f} | {m['kl_staleness']:.3f} | "
                f"{m['kl_skipping']:.3f}")
        lines.append(f"{head} | on-policy samples (y ~ π) | 0 | {m['on_policy_variance']:.3g} | 1 |")
        for r in m["methods"]:
            lines.append(f"{head} | {r['label']} | {r['bias']:.3g} | {r['variance']:.3g} | {r['ess']:.3f} |")
        c = m["control_seq_is_ignoring_staleness"]
        lines.append(f"{head} | control: seq_is C=∞ with μ = skipped *current* policy | {c['bias']:.3g} | "
                     f"{c['variance']:.3g} | {c['ess']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=5)
    p.add_argument("--length", type=int, default=3)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--stale", type=int, nargs="+", default=[0, 1, 2], help="optimizer steps between sampling and training")
    p.add_argument("--skip", type=int, nargs="*", default=[2], help="layers the sampler skips")
    p.add_argument("--lr", type=float, default=0.003, help="length of each SGD step along the exact policy gradient")
    p.add_argument("--seed", type=int, default=0, help="evaluation reward seed")
    p.add_argument("--out", default="outputs/benchmarks/staleness_bias.json")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    bad = [i for i in args.skip if not 0 <= i < args.layers]
    if bad:
        raise ValueError(f"--skip layers {bad} are out of range for --layers {args.layers}")
    if min(args.stale) < 0 or args.vocab < 2 or args.length < 1 or not args.lr > 0:
        raise ValueError(f"need --stale >= 0, --vocab >= 2, --length >= 1, --lr > 0; got {args.stale}, {args.vocab}, "
                         f"{args.length}, {args.lr}")
    start = time.perf_counter()
    model = make_model(args.vocab, args.layers)
    prompt = prompt_for(args.vocab)
    models = sgd_steps(model, prompt, args.vocab, args.length, max(args.stale), args.lr)
    settings = [measure_stale(models, s, args.skip, prompt, args.vocab, args.length, args.seed) for s in args.stale]
    result = {"setting": {"vocab": args.vocab, "length": args.length, "layers": args.layers, "lr": args.lr,
                          "reward_seed": args.seed, "train_reward_seed": TRAIN_REWARD_SEED,
                          "seconds": round(time.perf_counter() - start, 2)},
              "settings": settings}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(table(result))
    return result


if __name__ == "__main__":
    main()
