"""Integral attention (SPEC §6): S = 1 is Llama bit for bit; the fused path and the S-signal computation
equal transformers' Llama at the equivalent attention scale; per-signal RoPE against the formula written
out; bad configs; the shared family checks."""

import math

import pytest
import torch
from family_checks import (
    ATTENTION_IMPLEMENTATIONS,
    assert_cache_owns_its_storage,
    assert_causal,
    assert_compacted_sampling_exact,
    assert_decode_matches_forward,
    assert_eager_equals_sdpa,
    assert_lora_trains,
    assert_nested_reft_corrects_exactly,
    assert_rows_independent,
    assert_save_load_round_trip,
    left_padded_batch,
    rebuilt_without_layers,
)
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from archs.integral import IntegralAttention, IntegralConfig, IntegralForCausalLM
from archs.skipping import skip_layers

# head_dim 16: S = 4 allows both rope modes (16 % 8 == 0)
SHAPE = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=64)


def tiny(attn="sdpa", dtype=torch.float32, seed=0, **overrides):
    torch.manual_seed(seed)
    config = IntegralConfig(**{**SHAPE, "num_signals": 4, **overrides})
    return IntegralForCausalLM._from_config(config, attn_implementation=attn).to(dtype).eval()


def llama_copy(model, attn="sdpa", scaling=None):
    """transformers' Llama with the same weights; `scaling` replaces self_attn.scaling in the integral layers."""
    llama = LlamaForCausalLM._from_config(LlamaConfig(**SHAPE), attn_implementation=attn).to(model.dtype).eval()
    llama.load_state_dict(model.state_dict(), strict=True)
    if scaling is not None:
        for i in model.config.integral_layers:
            llama.model.layers[i].self_attn.scaling = scaling
    return llama


def content_positions(mask):
    return (mask.long().cumsum(1) - mask.long()).clamp_min(0)


# --------------------------------------------------------------------------- configuration

def test_defaults_and_layer_placement():
    config = IntegralConfig(**{**SHAPE, "num_hidden_layers": 5})
    assert (config.integral_layers, config.num_signals, config.rope_mode, config.signal_scale) == (
        [2, 3, 4], 8, "full_head", "signal_dim")
    model = IntegralForCausalLM(IntegralConfig(**SHAPE, num_signals=4))
    assert [isinstance(layer.self_attn, IntegralAttention) for layer in model.model.layers] == [False, False, True, True]


@pytest.mark.parametrize("bad, names", [
    (dict(num_signals=3), "num_signals=3 must divide head_dim=16"),
    (dict(num_signals=16, rope_mode="per_signal"), "2 \\* num_signals=32"),
    (dict(num_signals=0), "num_signals=0"), (dict(rope_mode="rotary"), "rope_mode='rotary'"),
    (dict(signal_scale="model_dim"), "signal_scale='model_dim'"), (dict(integral_layers=[1, 4]), "integral_layers"),
    (dict(integral_path="flash"), "integral_path='flash'"),
])
def test_bad_configs_fail_with_the_value_named(bad, names):
    with pytest.raises(ValueError, match=names):
        IntegralConfig(**{**SHAPE, **bad})


# --------------------------------------------------------------------------- against Llama

@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("rope_mode", ["full_head", "per_signal"])
def test_one_signal_is_llama_bit_for_bit(attn, rope_mode):
    # catches: any reordering of Llama's arithmetic in the integral layers (scale, rotation, attention call)
    model = tiny(attn, num_signals=1, rope_mode=rope_mode)
    ids, mask = left_padded_batch(97, [9, 5])
    want = llama_copy(model, attn)(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, want)


@pytest.mark.parametrize("signal_scale, constant", [
    ("signal_dim", lambda s, d: 1 / math.sqrt(s * d)),  # (1/S)·(d_h/S)^-½ = (S·d_h)^-½
    ("head_dim", lambda s, d: 1 / (s * math.sqrt(d))),
])
@pytest.mark.parametrize("num_signals", [2, 8])
def test_integral_layers_are_llama_at_the_equivalent_scale(signal_scale, constant, num_signals):
    # catches: a fused call that keeps Llama's d_h^-½ (the "changed scale" not passed), a wrong scale formula,
    # and a signal computation that is not Σ_s Q^s K^sᵀ / S
    ids, mask = left_padded_batch(97, [8, 6])
    fused = tiny(dtype=torch.float64, num_signals=num_signals, signal_scale=signal_scale)
    llama = llama_copy(fused, scaling=constant(num_signals, 16))
    want = llama(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(fused(input_ids=ids, attention_mask=mask).logits, want)
    signals = tiny(dtype=torch.float64, num_signals=num_signals, signal_scale=signal_scale, integral_path="signals")
    real = mask.bool()
    got = signals(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[real], want[real], atol=1e-12, rtol=1e-12)
    plain = llama_copy(fused)(input_ids=ids, attention_mask=mask).logits  # Llama's own scale: really different
    assert (plain[real] - want[real]).abs().max() > 1e-4


def per_signal_attention_by_hand(attn: IntegralAttention, x, positions):
    """Each signal rotated as its own (d_h/S)-dimensional RoPE vector (frequencies θ^(-2i/(d_h/S)), computed
    as transformers' default RoPE computes them), logits averaged over signals, causal softmax, V, W_O."""
    batch, length, _ = x.shape
    heads, kv_heads, d, s = 2, 1, attn.head_dim, attn.num_signals
    w = d // s
    q = attn.q_proj(x).view(batch, length, heads, d).transpose(1, 2)
    k = attn.k_proj(x).view(batch, length, kv_heads, d).transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
    v = attn.v_proj(x).view(batch, length, kv_heads, d).transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, w, 2, dtype=torch.float) / w))
    angles = positions[..., None].float() * inv_freq  # (B, T, w/2), float32 as LlamaRotaryEmbedding
    cos, sin = angles.cos().to(x.dtype)[:, None], angles.sin().to(x.dtype)[:, None]
    logits = 0
    for j in range(s):
        qs, ks = q[..., j * w:(j + 1) * w], k[..., j * w:(j + 1) * w]
        rot = []
        for t in (qs, ks):  # pairs (i, i + w/2) inside the signal
            a, b = t[..., : w // 2], t[..., w // 2:]
            rot.append(torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1))
        logits = logits + rot[0] @ rot[1].transpose(-1, -2)
    logits = logits * ((w ** -0.5) / s)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    out = logits.masked_fill(~causal, float("-inf")).softmax(-1) @ v
    return attn.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


@pytest.mark.parametrize("integral_path", ["fused", "signals"])
def test_per_signal_rope_matches_the_formula_written_out(integral_path):
    # catches: per_signal rotating the full head (or with the full head's first d_h/S frequencies), pairing
    # columns across signals, positions not applied per signal
    model = tiny(dtype=torch.float64, rope_mode="per_signal", integral_path=integral_path)
    attn = model.model.layers[3].self_attn
    x = torch.randn(2, 7, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    positions = torch.arange(7)[None].expand(2, 7) + torch.tensor([[0], [5]])  # per-row offsets
    cos, sin = model.model.rotary_emb(x, positions)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()[None, None]
    got, _ = attn(x, (cos, sin), causal)
    want = per_signal_attention_by_hand(attn, x, positions)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    attn.rope_mode = "full_head"
    assert (attn(x, (cos, sin), causal)[0] - want).abs().max() > 1e-4


@pytest.mark.parametrize("rope_mode", ["full_head", "per_signal"])
@pytest.mark.parametrize("signal_scale", ["signal_dim", "head_dim"])
def test_fused_path_equals_the_signal_by_signal_reference(rope_mode, signal_scale):
    ids, mask = left_padded_batch(97, [9, 4, 7])
    kw = dict(dtype=torch.float64, rope_mode=rope_mode, signal_scale=signal_scale)
    fused = tiny(**kw)(input_ids=ids, attention_mask=mask).logits
    signals = tiny(integral_path="signals", **kw)(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(fused[real], signals[real], atol=1e-12, rtol=1e-12)


# --------------------------------------------------------------------------- shared family checks

@pytest.mark.parametrize("attn", ATTENTION_IMPLEMENTATIONS)
@pytest.mark.parametrize("rope_mode, integral_path", [("full_head", "fused"), ("per_signal", "fused"),
                                                      ("per_signal", "signals")])
def test_decode_matches_forward(rope_mode, integral_path, attn):
    model = tiny(attn, rope_mode=rope_mode, integral_path=integral_path)
    assert_causal(model)
    for lengths in ([1, 3], [2, 1, 3]):
        assert_decode_matches_forward(model, prompt_lengths=lengths, new_tokens=4)
    out = model.generate(input_ids=torch.tensor([[5, 6]]), max_new_tokens=2, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True)
    assert type(out.past_key_values) is DynamicCache


@pytest.mark.parametrize("attn", ATTENTION_IMPLEMENTATIONS)
@pytest.mark.parametrize("integral_path", ["fused", "signals"])
def test_rows_independent_exactly(integral_path, attn):
    assert_rows_independent(tiny(attn, integral_path=integral_path))


@pytest.mark.parametrize("integral_path", ["fused", "signals"])
def test_eager_equals_sdpa(integral_path):
    assert_eager_equals_sdpa(lambda attn: tiny(attn, rope_mode="per_signal", integral_path=integral_path))


def test_save_load_round_trip(tmp_path):
    loaded = assert_save_load_round_trip(tiny(rope_mode="per_signal"), tmp_path / "saved")
    assert loaded.config.rope_mode == "per_signal" and loaded.model.layers[3].self_attn.scaling == 1 / 8


def test_lora_on_attention_projections_trains():
    assert_lora_trains(tiny(), ["q_proj", "k_proj", "v_proj", "o_proj"])


def rebuilt_without(model, skip):
    return rebuilt_without_layers(model, skip, layer_lists=("integral_layers",), build=lambda c: IntegralForCausalLM._from_config(
        IntegralConfig(**c), attn_implementation="sdpa"))


@pytest.mark.parametrize("skip", [(1,), (0, 3)])
def test_skipped_layers_equal_a_model_rebuilt_without_them(skip):
    model = tiny(rope_mode="per_signal")
    ref = rebuilt_without(model, skip)
    ids, mask = left_padded_batch(97, [7, 4])
    gen = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None,
               output_logits=True, return_dict_in_generate=True)
    with torch.no_grad(), skip_layers(model, skip):
        logits = model(input_ids=ids, attention_mask=mask).logits
        out = model.generate(input_ids=ids, attention_mask=mask, **gen)
    assert torch.equal(logits, ref(input_ids=ids, attention_mask=mask).logits)
    want = ref.generate(input_ids=ids, attention_mask=mask, **gen)
    assert torch.equal(out.sequences, want.sequences) and torch.equal(torch.stack(out.logits), torch.stack(want.logits))


@pytest.mark.slow  # about 25 s: two short GRPO runs
def test_nested_reft_corrects_exactly(chat_tokenizer, tmp_path, monkeypatch):
    torch.manual_seed(0)
    tok = chat_tokenizer
    config = IntegralConfig(**{**SHAPE, "vocab_size": len(tok), "num_hidden_layers": 3, "num_signals": 4,
                               "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
                               "bos_token_id": tok.bos_token_id})
    IntegralForCausalLM(config).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    assert_nested_reft_corrects_exactly(str(tmp_path / "model"), tok, tmp_path, monkeypatch)


@pytest.mark.parametrize("attn", ATTENTION_IMPLEMENTATIONS)
def test_rollout_engine_phases_continue_exactly_from_a_row_selected_cache(attn):
    assert_compacted_sampling_exact(tiny(attn))


def test_the_cache_holds_no_view_of_the_prefill():
    assert_cache_owns_its_storage(tiny())
