"""PoT behavior model: a quantized copy of the policy that follows the policy's updates."""

import pytest
import torch

from nested_reft.engines import SamplingSpec
from nested_reft.engines.hf import completion_logprobs
from nested_reft.engines.pot import PoTBehaviorModel, PoTHFEngine
from reft_kernels.pot.linear import PoTLinear
from reft_kernels.pot.search import quantize_pot_init


def _prompts(tok, n=3):
    return [tok("What is 2 + 3?")["input_ids"][: 4 + i] for i in range(n)]


def test_behavior_copy_is_quantized_and_policy_untouched(small_qwen2):
    policy = small_qwen2
    before = {n: p.clone() for n, p in policy.named_parameters()}
    b = PoTBehaviorModel(policy, bits=4, group_size=32)
    assert b.model is not policy and not any(isinstance(m, PoTLinear) for m in policy.modules())
    up = b.model.model.layers[2].mlp.up_proj
    want = quantize_pot_init(policy.model.layers[2].mlp.up_proj.weight.float(), 4, 32).dequantize()
    assert isinstance(up, PoTLinear) and torch.equal(up.dequantized_weight(), want)
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters())


def test_sync_requantizes_from_the_updated_policy(small_qwen2):
    policy = small_qwen2
    b = PoTBehaviorModel(policy, bits=4, group_size=32)
    assert not b.stale
    with torch.no_grad():  # an "optimizer step": in-place updates
        policy.model.layers[0].self_attn.q_proj.weight.mul_(-2.0)
        policy.model.norm.weight.add_(0.5)
    assert b.stale
    b.sync()
    assert not b.stale
    q = b.model.model.layers[0].self_attn.q_proj
    want = quantize_pot_init(policy.model.layers[0].self_attn.q_proj.weight.float(), 4, 32).dequantize()
    assert torch.equal(q.dequantized_weight(), want)
    assert torch.equal(b.model.model.norm.weight, policy.model.norm.weight)


def test_engine_returns_logprobs_of_the_quantized_copy_and_autosyncs(small_qwen2, chat_tokenizer):
    policy = small_qwen2.eval()
    engine = PoTHFEngine(policy, chat_tokenizer, bits=3, group_size=32, batch_size=2)
    prompts = _prompts(chat_tokenizer)
    spec = SamplingSpec(max_new_tokens=5, temperature=1.0, seed=0)
    r = engine.generate(prompts, spec)
    assert len(r.completion_ids) == 3 and all(1 <= len(c) <= 5 for c in r.completion_ids)
    pad = chat_tokenizer.pad_token_id
    mine = completion_logprobs(engine.behavior.model, prompts, r.completion_ids, 1.0, pad)
    full = completion_logprobs(policy, prompts, r.completion_ids, 1.0, pad)
    for got, want in zip(r.logprobs, mine):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=0, atol=1e-5)
    assert any(abs(a - b) > 1e-4 for g, f in zip(mine, full) for a, b in zip(g, f))  # not the policy's
    with torch.no_grad():
        policy.model.embed_tokens.weight.mul_(1.5)
    engine.generate(prompts, spec)  # re-quantizes first
    assert torch.equal(engine.behavior.model.model.embed_tokens.weight, policy.model.embed_tokens.weight)


def test_engine_load_weights_names_unknown_tensors(small_qwen2, chat_tokenizer):
    engine = PoTHFEngine(small_qwen2, chat_tokenizer, bits=4, group_size=32)
    w = small_qwen2.model.layers[1].mlp.down_proj.weight.detach() * 0.5
    engine.load_weights([("model.layers.1.mlp.down_proj.weight", w)])
    want = quantize_pot_init(w.float(), 4, 32).dequantize()
    assert torch.equal(engine.model.model.layers[1].mlp.down_proj.dequantized_weight(), want)
    with pytest.raises(KeyError, match="model.layers.1.mlp.nope"):
        engine.load_weights([("model.layers.1.mlp.nope", w)])
