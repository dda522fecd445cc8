"""Which corrections are unbiased for a sequence-level reward, exactly and through the real engine.

T = 3 generated tokens from a V = 5 vocabulary with no EOS in it, so every completion has T tokens and
all V^T = 125 of them can be enumerated (benchmarks/estimator_bias.py): π(y), μ(y) (the same model
under `skip_layers`), and every per-token score g_{y,t} = ∇θ log π(y_t | prompt, y_<t), the full
vector over all parameters. For a reward R(y), the on-policy gradient is g = Σ_y π(y) R(y) Σ_t g_{y,t}
and a method's estimator from y ~ μ has the exact expectation Σ_y μ(y) R(y) Σ_t w_{y,t} g_{y,t}.
Only the sequence ratio π(y)/μ(y) (`seq_is`, C = ∞) makes the two equal.
"""

import math

import pytest
import torch

from benchmarks.estimator_bias import (
    enumerate_completions,
    estimator_stats,
    exact_gradient,
    kl_behavior,
    make_model,
    make_reward,
    method_weights,
    prompt_for,
)
from nested_reft.corrections import correction_weights
from nested_reft.engines import HFEngine, SamplingSpec

V, T, SKIP = 5, 3, (2, 3, 4)


class _Tok:
    pad_token_id = 0
    eos_token_id = 99  # outside the vocabulary: every completion has T tokens


@pytest.fixture(scope="module")
def setup():
    model = make_model(V)
    prompt = prompt_for(V)
    e = enumerate_completions(model, prompt, V, T, SKIP)
    reward = make_reward(len(e.seqs), seed=0)
    return model, prompt, e, reward, exact_gradient(e, reward)


def test_enumeration_gives_the_on_policy_gradient(setup):
    model, prompt, e, reward, exact = setup
    assert float(e.logp_target.sum(-1).exp().sum()) == pytest.approx(1.0, abs=1e-12)
    assert float(e.logp_behavior.sum(-1).exp().sum()) == pytest.approx(1.0, abs=1e-12)
    assert kl_behavior(e) > 1.0  # the behavior model is far from the target
    # g from the per-token scores equals autograd of J(θ) = Σ_y π_θ(y) R(y) in one backward
    ids = torch.cat([torch.tensor(prompt).expand(len(e.seqs), -1), e.seqs], 1)
    logits = model(input_ids=ids).logits[:, len(prompt) - 1:-1]
    logp = torch.log_softmax(logits, -1).gather(-1, e.seqs.unsqueeze(-1)).squeeze(-1).sum(-1)
    grads = torch.autograd.grad((logp.exp() * reward).sum(), [p for p in model.parameters()])
    direct = torch.cat([g.flatten() for g in grads])
    # Qwen2's RMSNorm and rotary embedding compute in float32 even in a float64 model
    assert float((direct - exact).norm() / exact.norm()) < 1e-5


@pytest.mark.parametrize("method, kw", [
    ("none", {}), ("tis", {"clip": 2.0}), ("tis", {"clip": math.inf}), ("retrace", {"lam": 1.0}),
    ("seq_tis", {"clip": 2.0}), ("seq_tis", {"clip": math.inf}), ("seq_is", {"clip": 10.0}),
])
def test_every_other_method_is_biased(setup, method, kw):
    _, _, e, reward, exact = setup
    # measured 0.23 (seq_is C=10) to 1.7 (none); seq_is at C = ∞ is below 1e-7 (next test)
    assert estimator_stats(e, reward, method_weights(e, method, **kw), exact=exact)["bias"] > 0.15


def test_seq_is_is_exactly_unbiased(setup):
    _, _, e, reward, exact = setup
    stats = estimator_stats(e, reward, method_weights(e, "seq_is", clip=math.inf), exact=exact)
    assert stats["bias"] < 1e-6  # float32 weights; the full gradient vector, not a projection


def test_monte_carlo_through_the_engine(setup):
    """Sampled by `HFEngine` from the skipped model: seq_is lands on g within Monte-Carlo error,
    `none` lands on its own (biased) expectation, far from g."""
    model, prompt, e, reward, exact = setup
    n = 20000
    engine = HFEngine(model, _Tok(), eos_token_ids=[99], batch_size=4096)
    engine.set_skip(SKIP)
    rollouts = engine.generate([prompt] * n, SamplingSpec(max_new_tokens=T, temperature=1.0, seed=0))
    rows = e.rows(rollouts.completion_ids)
    behavior = torch.tensor(rollouts.logprobs, dtype=torch.float64)
    torch.testing.assert_close(behavior, e.logp_behavior[rows], atol=1e-5, rtol=0)  # μ of the engine
    mask = torch.ones(n, T)

    def monte_carlo(method, **kw):
        """(‖mean − g‖, a 3-standard-error bound on it from the per-sample covariance)."""
        w = correction_weights(e.logp_target[rows], behavior, mask, method, **kw).double()
        coef = reward[rows, None] * w
        mean = e.vector(coef / n, rows)
        trace_cov = (float(e.sq_norms(coef, rows).mean()) - float(mean @ mean)) * n / (n - 1)
        return mean, 3 * math.sqrt(trace_cov / n)

    seq_is, bound = monte_carlo("seq_is", clip=math.inf)
    assert float((seq_is - exact).norm()) < bound, (float((seq_is - exact).norm()), bound)
    assert bound < 0.2 * float(exact.norm())  # the check has power: the error bound is small

    none, none_bound = monte_carlo("none")
    expected_none = e.vector(e.logp_behavior.sum(-1).exp()[:, None] * reward[:, None] * torch.ones(len(e.seqs), T))
    assert float((none - expected_none).norm()) < none_bound  # samples follow the enumerated μ
    assert float((none - exact).norm()) > 3 * none_bound
