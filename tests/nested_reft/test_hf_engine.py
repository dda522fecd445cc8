"""The HF engine's μ is the distribution that sampled: checked against an independent forward and
against the empirical frequencies of thousands of samples; seeds are distinct per request."""

import itertools

import pytest
import torch
from test_skipping import rebuilt_without, tiny
from transformers import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from nested_reft.engines import HFEngine, SamplingSpec
from nested_reft.engines.base import MAX_TURNS, request_seeds, round_seed
from nested_reft.engines.hf import checkpoint_sampler_settings


class _Tok:
    pad_token_id = 0
    eos_token_id = 96


def teacher_forced_logps(model, prompt, completion, temperature):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].double()
    return torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(completion).unsqueeze(-1)).squeeze(-1)


def test_sampler_logprobs_equal_a_model_rebuilt_without_the_skipped_layers():
    """Left-padded batch, several tokens: μ from generate()'s scores = an independent forward of a
    model rebuilt without the skipped layers (1e-5, float32). A wrong skip set fails this."""
    model = tiny("qwen2", num_layers=6)
    skip = (2, 4)
    engine = HFEngine(model, _Tok(), eos_token_ids=[96])
    engine.set_skip(skip)
    prompts = [[5, 6, 7, 8, 9], [11], [12, 13], [14, 15, 16]]
    out = engine.generate(prompts, SamplingSpec(max_new_tokens=10, temperature=0.7, seed=0))
    assert out.logprob_seconds == 0.0  # no second forward
    ref = rebuilt_without(model, skip)
    wrong = rebuilt_without(model, (2, 3))
    for prompt, completion, lps in zip(prompts, out.completion_ids, out.logprobs):
        assert len(lps) == len(completion) > 0
        expected = teacher_forced_logps(ref, prompt, completion, 0.7)
        torch.testing.assert_close(torch.tensor(lps, dtype=torch.float64), expected, atol=1e-5, rtol=0)
        assert (teacher_forced_logps(wrong, prompt, completion, 0.7) - expected).abs().max() > 1e-3


N_SAMPLES = 8000


def max_z(freq, probs, n=N_SAMPLES):
    """Largest z-score of empirical frequencies against probabilities (< 5 by chance: p ≈ 6e-7 per
    cell), per token expected at least 5 times and for all rarer tokens pooled; a token of
    probability 0 must never be drawn (inf)."""
    if (freq[probs == 0] > 0).any():
        return float("inf")
    common = probs * n >= 5
    f = torch.cat([freq[common], freq[~common].sum().reshape(1)])
    p = torch.cat([probs[common], probs[~common].sum().reshape(1)])
    se = (p * (1 - p) / n).sqrt().clamp(min=1 / n)
    return float(((f - p).abs() / se).max())


def first_token_frequencies(engine, prompt, sampling, n=N_SAMPLES):
    out = engine.generate([prompt] * n, sampling)
    tokens = torch.tensor([c[0] for c in out.completion_ids])
    freq = torch.bincount(tokens, minlength=97).double() / n
    mu = torch.full((97,), float("-inf"), dtype=torch.float64)
    for c, lp in zip(out.completion_ids, out.logprobs):
        mu[c[0]] = lp[0]
    return freq, mu.exp()


def peaky_model():
    model = tiny("qwen2", num_layers=4)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # a few likely tokens, so penalties and truncation matter
    return model


def test_checkpoint_generation_config_does_not_change_the_sampler():
    """Thousands of one-token samples: the empirical frequencies match the reported μ and the plain
    softmax(logits / T), although the checkpoint asks for repetition_penalty 3 and top_k 2."""
    model = peaky_model()
    model.generation_config.repetition_penalty = 3.0
    model.generation_config.top_k = 2
    assert checkpoint_sampler_settings(model) == {"repetition_penalty": 3.0, "top_k": 2}
    engine = HFEngine(model, _Tok(), eos_token_ids=[96], batch_size=20000)
    prompt = list(range(1, 97, 4))  # a quarter of the vocabulary, the likeliest tokens among them: a penalty would show
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1:].double()
    plain = torch.softmax(logits[0], -1)
    freq, mu = first_token_frequencies(engine, prompt, SamplingSpec(max_new_tokens=1, seed=0))
    seen = freq > 0
    torch.testing.assert_close(mu[seen], plain[seen], atol=1e-5, rtol=0)  # reported μ = plain softmax
    assert max_z(freq, plain) < 5  # the sampler is the plain softmax too
    leaked = torch.softmax(RepetitionPenaltyLogitsProcessor(3.0)(torch.tensor([prompt]), logits.clone())[0], -1)
    assert max_z(leaked, plain) > 25  # had the checkpoint's penalty leaked in, this test would see it
    assert model.generation_config.repetition_penalty == 3.0  # restored after sampling


def processed_probs(logits, prompt, spec):
    """The distribution `spec` asks for, computed here with transformers' own processors in vLLM's
    order (penalty, temperature, min-p, top-k, top-p), independently of the engine."""
    scores = logits.clone().reshape(1, -1)
    ids = torch.tensor([prompt])
    if spec.get("repetition_penalty", 1.0) != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(spec["repetition_penalty"])(ids, scores)
    scores = scores / spec.get("temperature", 1.0)
    if spec.get("min_p", 0.0) > 0:
        scores = MinPLogitsWarper(spec["min_p"])(ids, scores)
    if spec.get("top_k", 0) > 0:
        scores = TopKLogitsWarper(spec["top_k"])(ids, scores)
    if spec.get("top_p", 1.0) < 1.0:
        scores = TopPLogitsWarper(spec["top_p"])(ids, scores)
    return torch.softmax(scores[0], -1)


@pytest.mark.parametrize("spec", [
    dict(repetition_penalty=2.0),
    dict(top_k=3, temperature=0.8),
    dict(top_p=0.6, repetition_penalty=1.5),
    dict(min_p=0.2),
])
def test_requested_processors_are_applied_to_the_sampler_and_to_mu(spec):
    """What the config asks for is applied to both: the reported μ is the processed, truncated and
    renormalised distribution (computed independently here), and the frequencies of thousands of
    samples match it; a sampler or a μ that drops any requested processor fails."""
    model = peaky_model()
    engine = HFEngine(model, _Tok(), eos_token_ids=[96], batch_size=20000)
    # a penalty only shows on tokens in the context: give it a quarter of the vocabulary
    prompt = list(range(1, 97, 4)) if "repetition_penalty" in spec else [3, 4, 5]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].float()
    plain = torch.softmax(logits.double() / spec.get("temperature", 1.0), -1)
    expected = processed_probs(logits, prompt, spec).double()
    # the spec must change the distribution, or this test could not tell a dropped processor
    assert (expected - plain).abs().max() > 0.02, spec
    freq, mu = first_token_frequencies(engine, prompt, SamplingSpec(max_new_tokens=1, seed=1, **spec))
    seen = freq > 0
    torch.testing.assert_close(mu[seen], expected[seen], atol=1e-5, rtol=0)  # reported μ
    assert max_z(freq, expected) < 5, spec  # what was sampled (never outside the kept set)


def test_top_k_minus_one_means_off():
    assert SamplingSpec(top_k=-1).top_k == 0 and not SamplingSpec(top_k=-1).truncates
    with pytest.raises(ValueError, match="-2"):
        SamplingSpec(top_k=-2)


def test_rescore_source_agrees_with_sampler_and_refuses_truncation():
    model = tiny("qwen2", num_layers=4)
    prompts = [[5, 6], [7, 8, 9]]
    sampler = HFEngine(model, _Tok(), eos_token_ids=[96])
    rescore = HFEngine(model, _Tok(), eos_token_ids=[96], logprobs_source="rescore")
    for e in (sampler, rescore):
        e.set_skip((1,))
    spec = SamplingSpec(max_new_tokens=6, temperature=1.3, seed=2)
    a, b = sampler.generate(prompts, spec), rescore.generate(prompts, spec)
    assert a.completion_ids == b.completion_ids
    for x, y in zip(a.logprobs, b.logprobs):
        torch.testing.assert_close(torch.tensor(x), torch.tensor(y), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="top_k=4"):
        rescore.generate(prompts, SamplingSpec(max_new_tokens=2, top_k=4))


def test_generate_leaves_the_global_rng_alone_and_replays_for_a_seed():
    model = tiny("qwen2", num_layers=4)
    engine = HFEngine(model, _Tok(), eos_token_ids=[96])
    torch.manual_seed(123)
    state = torch.get_rng_state()
    spec = SamplingSpec(max_new_tokens=5, seed=7)
    first = engine.generate([[5, 6]] * 4, spec).completion_ids
    assert torch.equal(torch.get_rng_state(), state)
    assert engine.generate([[5, 6]] * 4, spec).completion_ids == first


def test_seeds_are_distinct_across_rounds_ranks_turns_and_requests():
    seeds = [s for rnd, rank, turn in itertools.product(range(40), range(8), (0, 1, 2, MAX_TURNS - 1))
             for s in request_seeds(round_seed(0, rnd, rank, turn), 64)]
    assert len(set(seeds)) == len(seeds) == 40 * 8 * 4 * 64
    assert all(0 <= s < 2**63 for s in seeds)
    assert round_seed(1, 0) != round_seed(0, 0)  # the run seed matters
    with pytest.raises(ValueError, match="turn"):
        round_seed(0, 0, 0, MAX_TURNS)


def test_vllm_sampling_params_carry_the_request_seeds_and_processors():
    pytest.importorskip("vllm")
    from nested_reft.engines.vllm_engine import vllm_sampling_params

    spec = SamplingSpec(max_new_tokens=4, seed=round_seed(0, 3, 1), top_k=-1, min_p=0.1, repetition_penalty=1.2)
    params = vllm_sampling_params(spec, 5, eos_ids=[2], logprobs=True)
    assert [p.seed for p in params] == request_seeds(spec.seed, 5)
    assert all(p.min_p == 0.1 and p.repetition_penalty == 1.2 and p.top_k in (0, -1) for p in params)


def test_compacted_phases_drop_finished_rows_and_keep_mu_exact(monkeypatch):
    """Generating in phases of 3 tokens, rows that hit EOS leave the batch and the others continue
    from their cache: μ still equals an independent forward of the skipped model (a wrong cache
    row, position or mask after a phase fails this), every completion ends at EOS or the cap, and
    later phases really run on fewer rows."""
    model = tiny("qwen2", num_layers=6)
    eos = list(range(82, 97))  # about 15% of the vocabulary ends a completion: rows finish at different phases
    engine = HFEngine(model, _Tok(), eos_token_ids=eos, compact_every=3)
    engine.set_skip((2,))
    sizes = []
    real = engine._generate_phase
    monkeypatch.setattr(engine, "_generate_phase", lambda ids, *a, **k: (sizes.append(ids.size(0)), real(ids, *a, **k))[1])
    prompts = [[5, 6, 7, 8, 9], [11], [12, 13], [14, 15, 16], [17, 18], [19], [20, 21, 22], [23]]
    out = engine.generate(prompts, SamplingSpec(max_new_tokens=10, temperature=0.9, seed=3))
    assert sizes[0] == 8 and len(sizes) >= 2 and sizes == sorted(sizes, reverse=True) and sizes[-1] < 8
    lengths = [len(c) for c in out.completion_ids]
    assert max(lengths) > 3  # some row crossed a phase boundary
    ref = rebuilt_without(model, (2,))
    for prompt, completion, lps in zip(prompts, out.completion_ids, out.logprobs):
        assert completion[-1] in eos or len(completion) == 10
        assert all(t not in eos for t in completion[:-1])
        expected = teacher_forced_logps(ref, prompt, completion, 0.9)
        torch.testing.assert_close(torch.tensor(lps, dtype=torch.float64), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="compact_every must be >= 0"):
        HFEngine(model, _Tok(), compact_every=-1)
