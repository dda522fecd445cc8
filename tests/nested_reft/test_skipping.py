"""Layer-skip policies and the in-place skip context (SPEC §1)."""

import re

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from nested_reft.skipping import LayerSkipPolicy, decoder_stack, skip_layers, skippable_layers

# --------------------------------------------------------------------------- policy


def test_random_policy_draws_k_eligible_layers_and_is_seeded():
    p = LayerSkipPolicy(8, skip_ratio=0.25, seed=3)
    draws = [p.draw() for _ in range(200)]
    assert all(len(s) == 2 and list(s) == sorted(s) and set(s) <= {2, 3, 4, 5} for s in draws)
    assert len(set(draws)) == 6  # all C(4,2) subsets appear
    q = LayerSkipPolicy(8, skip_ratio=0.25, seed=3)
    assert [q.draw() for _ in range(200)] == draws
    assert p.history == draws


def test_contiguous_strided_fixed_and_k_range():
    c = LayerSkipPolicy(12, skip_ratio=0.25, mode="contiguous", seed=0)
    for _ in range(50):
        s = c.draw()
        assert len(s) == 3 and s[-1] - s[0] == 2 and s[0] >= 2 and s[-1] <= 9
    st = LayerSkipPolicy(12, skip_ratio=0.25, mode="strided", seed=0)
    for _ in range(50):
        s = st.draw()
        assert len(s) == 3 and set(s) <= set(range(2, 10))
        gaps = [b - a for a, b in zip(s, s[1:])]
        assert max(gaps) - min(gaps) <= 1  # evenly spaced over the 8 eligible layers
    f = LayerSkipPolicy(8, mode="fixed", layers=[5, 1])
    assert f.draw() == (1, 5) == f.draw()
    kr = LayerSkipPolicy(8, k_range=(0, 3), seed=1)
    sizes = {len(kr.draw()) for _ in range(200)}
    assert sizes == {0, 1, 2, 3}
    assert LayerSkipPolicy(8, skip_ratio=0.0).draw() == ()


def test_policy_state_round_trip():
    p = LayerSkipPolicy(8, seed=5)
    p.draw()
    state = p.state_dict()
    nxt = [p.draw() for _ in range(5)]
    q = LayerSkipPolicy(8, seed=99)
    q.load_state_dict(state)
    assert [q.draw() for _ in range(5)] == nxt


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_layers=8, skip_ratio=1.0), "skip_ratio must be in \\[0, 1\\), got 1.0"),
        (dict(num_layers=8, skip_ratio=-0.1), "got -0.1"),
        (dict(num_layers=8, skip_ratio=0.75), "cannot skip 6 layers: only 4 of 8"),
        (dict(num_layers=8, mode="fixed", layers=list(range(8))), "cannot skip all 8 layers"),
        (dict(num_layers=8, mode="fixed", layers=[3, 8]), "\\[8\\] are out of range"),
        (dict(num_layers=8, mode="fixed"), "needs `layers`"),
        (dict(num_layers=8, mode="sideways"), "'sideways'"),
        (dict(num_layers=8, k_range=(3, 1)), "\\(3, 1\\)"),
        (dict(num_layers=0), "got 0"),
        (dict(num_layers=8, layers=[1]), "only used with mode='fixed'"),
    ],
)
def test_invalid_policies_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LayerSkipPolicy(**kwargs)


# --------------------------------------------------------------------------- skip context

FAMILIES = {
    "qwen2": dict(model_type="qwen2"),
    "llama": dict(model_type="llama"),
    "mistral": dict(model_type="mistral"),
    "qwen3": dict(model_type="qwen3", head_dim=16),
}


def tiny(model_type, num_layers=6, **extra):
    torch.manual_seed(0)
    kw = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    kw.update(extra)
    config = AutoConfig.for_model(model_type, **kw)
    return AutoModelForCausalLM.from_config(config).eval()


def rebuilt_without(model, skip):
    """An independent reference: a fresh model with fewer layers and the kept weights."""
    n = model.config.num_hidden_layers
    kept = [i for i in range(n) if i not in skip]
    config = model.config.to_dict()
    config.pop("layer_types", None)
    config["num_hidden_layers"] = len(kept)
    ref = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config)).eval()
    remap = {old: new for new, old in enumerate(kept)}
    state = {}
    for key, value in model.state_dict().items():
        m = re.match(r"model\.layers\.(\d+)\.(.*)", key)
        if m is None:
            state[key] = value
        elif int(m[1]) in remap:
            state[f"model.layers.{remap[int(m[1])]}.{m[2]}"] = value
    ref.load_state_dict(state, strict=True)
    return ref


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_skipped_model_equals_model_rebuilt_without_those_layers(family):
    cfg = dict(FAMILIES[family])
    model = tiny(cfg.pop("model_type"), **cfg)
    skip = (1, 3, 4)
    ids = torch.randint(0, 97, (2, 11))
    ref = rebuilt_without(model, skip)
    with torch.no_grad(), skip_layers(model, skip):
        got = model(ids).logits
        gen = model.generate(ids, max_new_tokens=8, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        want = ref(ids).logits
        ref_gen = ref.generate(ids, max_new_tokens=8, do_sample=False, output_scores=True,
                               return_dict_in_generate=True, pad_token_id=0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(gen.sequences, ref_gen.sequences)  # through the KV cache
    for a, b in zip(gen.scores, ref_gen.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # and the full model is really different from the skipped one
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, want, atol=1e-3)


def test_skip_context_restores_the_model_exactly_and_copies_nothing():
    model = tiny("qwen2")
    ids = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        before = model(ids).logits
    params_before = {n: p.data_ptr() for n, p in model.named_parameters()}
    layers_obj = decoder_stack(model).layers
    with skip_layers(model, [2, 3]):
        inner = decoder_stack(model)
        assert len(inner.layers) == 4 and model.config.num_hidden_layers == 4
        kept_ptrs = {p.data_ptr() for p in model.parameters()}
        assert kept_ptrs <= set(params_before.values())  # shared, not copied
    assert decoder_stack(model).layers is layers_obj
    assert model.config.num_hidden_layers == 6 and len(model.config.layer_types) == 6
    assert [layer.self_attn.layer_idx for layer in layers_obj] == list(range(6))
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == params_before
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_skip_context_restores_on_exception():
    model = tiny("llama")
    with pytest.raises(RuntimeError, match="boom"), skip_layers(model, [1]):
        raise RuntimeError("boom")
    assert model.config.num_hidden_layers == 6 and len(decoder_stack(model).layers) == 6
    assert [layer.self_attn.layer_idx for layer in decoder_stack(model).layers] == list(range(6))


def test_skipping_nothing_is_the_plain_model_and_bad_sets_fail():
    model = tiny("qwen2")
    ids = torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        plain = model(ids).logits
        with skip_layers(model, ()):
            assert torch.equal(model(ids).logits, plain)
    with pytest.raises(ValueError, match=r"\[6\] are out of range"), skip_layers(model, [6]):
        pass
    with pytest.raises(ValueError, match="cannot skip all 6"), skip_layers(model, range(6)):
        pass


def test_unsupported_architecture_names_its_class():
    with pytest.raises(TypeError, match="Linear"), skip_layers(torch.nn.Linear(2, 2), [0]):
        pass


def test_works_through_a_peft_wrapper():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny("qwen2"), LoraConfig(r=2, target_modules=["q_proj"]))
    ids = torch.randint(0, 97, (1, 5))
    with torch.no_grad(), skip_layers(model, [2]):
        assert len(decoder_stack(model).layers) == 5
        assert model(input_ids=ids).logits.shape == (1, 5, 97)
    assert len(decoder_stack(model).layers) == 6


def test_a_family_narrows_the_skippable_layers_and_the_policy_and_context_obey():
    model = tiny("qwen2")
    stack = decoder_stack(model)
    stack.skippable_layers = lambda: [1, 2, 4]  # as a family's decoder stack would say
    assert skippable_layers(model) == (1, 2, 4)
    with pytest.raises(ValueError, match=r"layers \[3\] .* may not be skipped"), skip_layers(model, [2, 3]):
        pass
    policy = LayerSkipPolicy(6, skip_ratio=0.34, keep_first=1, keep_last=1, skippable=skippable_layers(model))
    assert policy.eligible == (1, 2, 4)
    assert all(set(policy.draw()) <= {1, 2, 4} for _ in range(20))
    with pytest.raises(ValueError, match="only 3 of 6 are eligible"):
        LayerSkipPolicy(6, k_range=(0, 4), keep_first=1, keep_last=1, skippable=[1, 2, 4])
    with pytest.raises(ValueError, match=r"layers \[3\] may not be skipped"):
        LayerSkipPolicy(6, mode="fixed", layers=[3], skippable=[1, 2, 4])


def test_layer_references_are_renumbered_and_a_reference_to_a_skipped_layer_fails():
    model = tiny("qwen2")
    layers = decoder_stack(model).layers
    layers[4].self_attn.kv_source_idx = 3  # layer 4 reads layer 3's K/V (ECHO-style)
    with skip_layers(model, [1]):
        assert layers[4].self_attn.kv_source_idx == 2 and layers[4].self_attn.layer_idx == 3
    assert layers[4].self_attn.kv_source_idx == 3 and layers[4].self_attn.layer_idx == 4
    with pytest.raises(ValueError, match=r"layer 4 reads layer 3 \(kv_source_idx\), which is skipped"):
        with skip_layers(model, [3]):
            pass
    assert [layer.self_attn.layer_idx for layer in layers] == list(range(6))
    assert layers[4].self_attn.kv_source_idx == 3
