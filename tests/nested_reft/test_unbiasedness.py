"""Monte-Carlo check that `tis` corrects behavior samples to the on-policy gradient and `none` does not.

One generated token per prompt, so the per-token ratio is the exact sequence ratio and
E_μ[min(π/μ, C) R ∇log π] = E_π[R ∇log π] when C exceeds every ratio. The exact on-policy
gradient is computed by enumerating the (small) vocabulary.
"""

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from nested_reft.corrections import correction_weights
from nested_reft.engines import HFEngine, SamplingSpec
from nested_reft.skipping import skip_layers

VOCAB = 8


class _Tok:
    pad_token_id = 0
    eos_token_id = 7


def make_model():
    torch.manual_seed(1)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # peaky, layer-dependent distributions so skipping changes them a lot
        for p in model.model.layers.parameters():
            p.mul_(6.0)
        model.lm_head.weight.mul_(30.0)
    return model


def test_tis_is_unbiased_and_none_is_biased():
    model = make_model()
    prompt = [1, 2, 3, 4]
    reward = torch.tensor([0.0, 1.0, 3.0, -1.0, 2.0, 0.5, -2.0, 1.5])
    ids = torch.tensor([prompt])
    params = [p for p in model.parameters() if p.requires_grad]

    # exact on-policy gradient: sum_y π(y) R(y) ∇log π(y); and per-token ∇log π(y) for every y
    logp = torch.log_softmax(model(ids).logits[0, -1], -1)
    grads = []
    for y in range(VOCAB):
        g = torch.autograd.grad(logp[y], params, retain_graph=True)
        grads.append(torch.cat([x.flatten() for x in g]))
    grads = torch.stack(grads)  # (V, P)
    pi = logp.exp().detach()
    exact = (pi * reward) @ grads

    # behavior samples from the layer-skipped model, with their log-probs, through the engine
    engine = HFEngine(model, _Tok(), eos_token_ids=[99], batch_size=4096)
    engine.set_skip((2, 3, 4))
    n = 20000
    rollouts = engine.generate([prompt] * n, SamplingSpec(max_new_tokens=1, temperature=1.0, seed=0))
    ys = torch.tensor([c[0] for c in rollouts.completion_ids])
    mu_logp = torch.tensor([lp[0] for lp in rollouts.logprobs])
    with skip_layers(model, (2, 3, 4)), torch.no_grad():
        mu = torch.softmax(model(ids).logits[0, -1], -1)
    assert torch.allclose(mu_logp, mu.log()[ys], atol=1e-5)  # engine log-probs are the skipped model's
    assert (pi - mu).abs().sum() > 0.2  # the behavior model is far from the target

    mask = torch.ones(n, 1)
    target_logp = logp.detach()[ys].unsqueeze(1)
    direction = exact / exact.norm()
    proj = grads @ direction  # (V,) each sample's gradient projected on the exact direction

    def estimate(method, **kw):
        w = correction_weights(target_logp, mu_logp.unsqueeze(1), mask, method, **kw)[:, 0]
        contrib = w * reward[ys] * proj[ys]
        return contrib.mean(), contrib.std() / n**0.5

    tis, tis_se = estimate("tis", clip=1e6)
    none, none_se = estimate("none")
    target = exact.norm()
    assert abs(tis - target) < 4 * tis_se, (float(tis), float(target), float(tis_se))
    assert abs(none - target) > 10 * none_se, (float(none), float(target), float(none_se))
