"""The shared family checks, run on the plain Qwen2 model they are modelled on: it must pass them
all, and each check must fail on a model that breaks the rule it names."""

import copy

import pytest
import torch
from family_checks import (
    assert_causal,
    assert_compacted_sampling_exact,
    assert_decode_matches_forward,
    assert_eager_equals_sdpa,
    assert_lora_trains,
    assert_nested_reft_corrects_exactly,
    assert_rows_independent,
    assert_save_load_round_trip,
)


def with_attention(model, attn):
    model = copy.deepcopy(model)
    model.set_attn_implementation(attn)
    return model


def test_qwen2_passes_every_family_check(small_qwen2, small_model_dir, chat_tokenizer, tmp_path, monkeypatch):
    assert_decode_matches_forward(small_qwen2, prompt_lengths=[1, 3], new_tokens=4)
    assert_decode_matches_forward(small_qwen2, prompt_lengths=[2], new_tokens=3)
    assert_rows_independent(small_qwen2)
    assert_causal(small_qwen2)
    assert_eager_equals_sdpa(lambda attn: with_attention(small_qwen2, attn))
    assert_save_load_round_trip(small_qwen2, tmp_path / "saved")
    assert_lora_trains(small_qwen2, ["q_proj", "v_proj"])
    assert_compacted_sampling_exact(small_qwen2)
    assert_nested_reft_corrects_exactly(small_model_dir, chat_tokenizer, tmp_path, monkeypatch)


def test_the_checks_catch_the_bugs_they_name(small_qwen2):
    model = small_qwen2.eval()
    # a model whose rows see each other: mix a little of the batch mean into every row's embeddings
    embed = model.get_input_embeddings()
    handle = embed.register_forward_hook(lambda m, i, out: out + 1e-3 * out.mean(0, keepdim=True))
    with pytest.raises(AssertionError):
        assert_rows_independent(model)
    handle.remove()
    # a model that looks ahead: mix a little of the sequence mean into every position's embedding
    handle = embed.register_forward_hook(lambda m, i, out: out + 1e-3 * out.mean(1, keepdim=True))
    with pytest.raises(AssertionError):
        assert_causal(model)
    handle.remove()
    # an interface that computes something else: eager's copy gets one weight moved a little
    def build(attn):
        built = with_attention(model, attn)
        if attn == "eager":
            built.model.layers[0].self_attn.o_proj.weight.data.mul_(1.001)
        return built
    with pytest.raises(AssertionError):
        assert_eager_equals_sdpa(build)
    # a cache that drifts from the full forward: perturb the hidden states only on 1-token (decode) steps
    layer = model.model.layers[0]
    handle = layer.register_forward_hook(
        lambda m, i, out: (out[0] + 1e-2 if out[0].size(1) == 1 else out[0],) + tuple(out[1:])
        if isinstance(out, tuple) else (out + 1e-2 if out.size(1) == 1 else out))
    with pytest.raises(AssertionError):
        assert_decode_matches_forward(model, prompt_lengths=[1, 3], new_tokens=3)
    handle.remove()
    assert_decode_matches_forward(model, prompt_lengths=[1, 3], new_tokens=3)
    assert torch.is_grad_enabled()
