"""DTRNet (SPEC §5): routed attention against transformers' LlamaAttention with the routed mask, the
all-routed limit against a whole Llama model, the bypass and aux-loss formulas by hand, the ragged decode
cache, and the shared family checks."""

import pytest
import torch
import torch.nn.functional as F
from family_checks import (
    assert_cache_owns_its_storage,
    assert_causal,
    assert_compacted_sampling_exact,
    assert_decode_matches_forward,
    assert_lora_trains,
    assert_nested_reft_corrects_exactly,
    assert_rows_independent,
    assert_save_load_round_trip,
    left_padded_batch,
    rebuilt_without_layers,
)
from transformers import LlamaConfig, LlamaForCausalLM, TrainerState
from transformers.models.llama.modeling_llama import LlamaAttention

from archs.dtrnet import DTRNetCache, DTRNetConfig, DTRNetForCausalLM, RoutedFractionCallback
from archs.skipping import skip_layers
from reft_kernels.routed_attention import (
    RoutedKV,
    pack_routed,
    routed_attention_mask,
    routed_attention_naive,
    unpack_routed,
    varlen_attention_flash,
    varlen_attention_torch,
)

SHAPE = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
PATHS = [("sdpa", "masked"), ("eager", "masked"), ("sdpa", "packed")]


def tiny(attn="sdpa", path="masked", router_std=1.0, seed=0, dtype=torch.float32, **overrides):
    """A random DTRNet whose routers give a mix of routed and bypassed tokens (large last-layer weights:
    the decisions are far from the 0.5 threshold, so float noise never flips one)."""
    torch.manual_seed(seed)
    config = DTRNetConfig(**{**SHAPE, "routed_attention": path, **overrides})
    model = DTRNetForCausalLM._from_config(config, attn_implementation=attn).eval()
    for layer in model.model.layers:
        if layer.routed:
            torch.nn.init.normal_(layer.router.weight_predictor[2].weight, std=router_std)
    return model.to(dtype)


def force_routes(model, attend: float):
    """Router output = constant logits (attend, -attend): p_attn = sigmoid(2·attend) for every token."""
    for layer in model.model.layers:
        if layer.routed:
            last = layer.router.weight_predictor[2]
            torch.nn.init.zeros_(last.weight)
            last.bias.data = torch.tensor([attend, -attend], dtype=last.bias.dtype)
    return model


def content_positions(mask):
    return (mask.long().cumsum(1) - mask.long()).clamp_min(0)


# --------------------------------------------------------------------------- configuration

@pytest.mark.parametrize("layers, dense, routed", [
    (8, [2, 4, 6], [0, 1, 3, 5, 7]),
    (12, [2, 4, 6, 8, 10], [0, 1, 3, 5, 7, 9, 11]),
])
def test_default_dense_layers_are_the_released_list(layers, dense, routed):
    # catches: reading the released list as the ROUTED layers (its comment says so; the code does the opposite)
    config = DTRNetConfig(**{**SHAPE, "num_hidden_layers": layers})
    assert config.dense_layers == dense and config.aux_loss_coef == 8e-4 and config.random_route_fraction == 0.0
    model = DTRNetForCausalLM(config)
    assert [i for i, layer in enumerate(model.model.layers) if layer.routed] == routed


@pytest.mark.parametrize("bad, names", [
    (dict(dense_layers=[1, 4]), "dense_layers"), (dict(dense_layers=[1, 1]), "dense_layers"),
    (dict(aux_loss_coef=-1.0), "aux_loss_coef"), (dict(random_route_fraction=1.5), "random_route_fraction"),
    (dict(routed_attention="dense"), "routed_attention"), (dict(attention_dropout=0.1), "attention_dropout"),
    (dict(hidden_size=33, num_attention_heads=1), "hidden_size"),
])
def test_bad_configs_fail_with_the_value_named(bad, names):
    with pytest.raises(ValueError, match=names):
        DTRNetConfig(**{**SHAPE, **bad})


# --------------------------------------------------------------------------- one routed layer vs oracles

def llama_oracle_layer(layer, attn_impl, h, real, cos, sin):
    """The routed layer written with transformers' LlamaAttention (copied weights) under the 4-D mask
    diag ∪ (routed_i ∧ routed_j ∧ j < i) and per-token output scaling; the router by hand. (transformers'
    eager softmax runs in float32 even for float64 inputs, so each path is checked against the oracle
    with the same attention implementation.)"""
    w = layer.router.weight_predictor
    probs = F.linear(F.silu(F.linear(h, w[0].weight, w[0].bias)), w[2].weight, w[2].bias).softmax(-1)
    routed = (probs[..., 0] > 0.5) & real
    length = h.shape[1]
    lower = torch.ones(length, length, dtype=torch.bool).tril(-1)
    allowed = (routed[:, :, None] & routed[:, None, :] & lower) | torch.eye(length, dtype=torch.bool)
    mask = allowed[:, None]
    if attn_impl == "eager":
        mask = torch.zeros(mask.shape, dtype=h.dtype).masked_fill(~mask, torch.finfo(h.dtype).min)
    llama_config = LlamaConfig(**{**SHAPE, "attn_implementation": attn_impl})
    attn = LlamaAttention(llama_config, layer_idx=0).to(h.dtype)
    attn.load_state_dict(layer.self_attn.state_dict())
    out, _ = attn(layer.input_layernorm(h), (cos, sin), mask)
    scale = torch.where(routed, probs[..., 0], probs[..., 1])
    mid = h + out * scale[..., None]
    return mid + layer.mlp(layer.post_attention_layernorm(mid)), routed


@pytest.mark.parametrize("attn, path", PATHS)
def test_routed_layer_matches_llama_attention_with_routed_mask(attn, path):
    # catches: attending bidirectionally among routed tokens (the released eager path), mixing rows (the
    # released SDPA path), routing pads, scaling by the wrong probability, positions renumbered after gathering
    model = tiny(attn, path, dtype=torch.float64)
    layer = model.model.layers[0]
    ids, mask = left_padded_batch(97, [9, 5, 7])
    real = mask.bool()
    h = torch.randn(3, 9, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cos, sin = model.model.rotary_emb(h, content_positions(mask))
    got, take, _ = layer(h, real, (cos, sin))
    want, routed = llama_oracle_layer(layer, attn, h, real, cos, sin)
    assert torch.equal(take, routed)
    assert routed.any() and (real & ~routed).any(), "the test needs both routed and bypassed real tokens"
    torch.testing.assert_close(got[real], want[real], atol=1e-12, rtol=1e-12)


def test_bypass_token_output_is_p_byp_times_wo_of_its_value():
    # catches: a bypass that attends (to the routed tokens or the cache), scales by p_attn, or skips W_O
    model = tiny(dtype=torch.float64)
    layer = model.model.layers[0]
    h = torch.randn(2, 6, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    real = torch.ones(2, 6, dtype=torch.bool)
    cos, sin = model.model.rotary_emb(h, content_positions(real))
    got, take, p_attn = layer(h, real, (cos, sin))
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    v = attn.v_proj(x).view(2, 6, 2, 8).repeat_interleave(2, dim=2).reshape(2, 6, 32)  # repeat_kv on heads
    mid = h + (1 - p_attn)[..., None] * attn.o_proj(v)
    by_hand = mid + layer.mlp(layer.post_attention_layernorm(mid))
    bypass = ~take
    assert bypass.any() and take.any()
    torch.testing.assert_close(got[bypass], by_hand[bypass], atol=1e-12, rtol=1e-12)
    assert (got[take] - by_hand[take]).abs().max() > 1e-3  # routed tokens really attend


def test_reference_kernels_agree():
    # the per-token loop, the routed mask under SDPA, and packed segments (with a cache in front)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(3, h, 8, 4, dtype=torch.float64, generator=g) for h in (4, 2, 2))
    routed = torch.rand(3, 8, generator=g) > 0.4
    routed[2] = False  # a row with nothing routed
    want = routed_attention_naive(q, k, v, routed, 0.5)
    masked = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                            attn_mask=routed_attention_mask(routed), scale=0.5)
    torch.testing.assert_close(masked, want, atol=1e-12, rtol=0)
    # a cache holding the first 5 tokens' routed K/V, then the last 3 as a chunk
    store = RoutedKV.empty(k)
    store.append(k[:, :, :5], v[:, :, :5], routed[:, :5])
    store.append(k[:, :, 5:], v[:, :, 5:], routed[:, 5:])
    assert store.lengths.tolist() == routed.sum(1).tolist()
    segments = pack_routed(q[:, :, 5:], routed[:, 5:], store)
    out = unpack_routed(varlen_attention_torch(segments, 0.5), routed[:, 5:],
                        v[:, :, 5:].repeat_interleave(2, 1).transpose(1, 2))
    torch.testing.assert_close(out.transpose(1, 2), want[:, :, 5:], atol=1e-12, rtol=0)


def test_flash_varlen_path_is_guarded():
    # flash-attn is not installed here: the path says so instead of silently running something else
    try:
        import flash_attn  # noqa: F401
        pytest.skip("flash_attn is installed: this checks the guard only")
    except ImportError:
        pass
    k = torch.randn(1, 2, 3, 4)
    store = RoutedKV.empty(k)
    store.append(k, k, torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ImportError, match="flash_attn"):
        varlen_attention_flash(pack_routed(torch.randn(1, 4, 3, 4), torch.ones(1, 3, dtype=torch.bool), store), 0.5)


# --------------------------------------------------------------------------- whole models

def llama_copy(model):
    config = LlamaConfig(**{k: getattr(model.config, k) for k in SHAPE})
    llama = LlamaForCausalLM._from_config(config, attn_implementation="sdpa").to(model.dtype).eval()
    missing, unexpected = llama.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(".router." in key for key in unexpected)
    return llama


@pytest.mark.parametrize("attn, path", PATHS)
def test_all_routed_with_p_attn_one_is_exactly_llama(attn, path):
    # catches: any change of a routed token's attention (mask, positions, scale) when all tokens are routed
    model = force_routes(tiny(attn, path, dtype=torch.float64), attend=40.0)  # p_attn = 1 - 1.8e-35 = 1.0
    llama = llama_copy(model)  # (eager Llama in float64 turns fully masked pad rows into NaN)
    ids, mask = left_padded_batch(97, [8, 5])
    out = model(input_ids=ids, attention_mask=mask)
    assert out.routed_fraction.tolist() == [1.0] * 4
    want = llama(input_ids=ids, attention_mask=mask, position_ids=content_positions(mask)).logits
    real = mask.bool()
    tol = 1e-6 if attn == "eager" else 1e-12  # transformers' eager softmax is float32 even for float64 inputs
    torch.testing.assert_close(out.logits[real], want[real], atol=tol, rtol=tol)


def test_eager_sdpa_and_packed_paths_agree():
    ids, mask = left_padded_batch(97, [9, 4, 7])
    sdpa, eager, packed = (tiny(attn, path, dtype=torch.float64)(input_ids=ids, attention_mask=mask).logits
                           for attn, path in PATHS)
    real = mask.bool()
    torch.testing.assert_close(packed[real], sdpa[real], atol=1e-12, rtol=1e-12)
    # transformers' eager softmax is float32 even for float64 inputs
    torch.testing.assert_close(eager[real], sdpa[real], atol=1e-6, rtol=1e-6)


def test_aux_loss_and_routed_fraction_by_hand():
    # catches: f_l or mean(p_attn) over pads, a missing / Σ f_l, λ applied twice, aux added outside training
    model = tiny(dtype=torch.float64).train()
    ids, mask = left_padded_batch(97, [8, 5])
    real = mask.bool()
    probs = {}
    hooks = [layer.router.register_forward_hook(lambda m, i, o, idx=idx: probs.__setitem__(idx, o.softmax(-1)[..., 0]))
             for idx, layer in enumerate(model.model.layers) if layer.routed]
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    for hook in hooks:
        hook.remove()
    f = {i: ((p > 0.5) & real).sum().item() / real.sum().item() for i, p in probs.items()}
    m = {i: p[real].mean() for i, p in probs.items()}
    assert sorted(f) == [0, 1, 3] and 0 < min(f.values()) and max(f.values()) < 1
    assert [out.routed_fraction[i].item() for i in sorted(f)] == [f[i] for i in sorted(f)]
    assert out.routed_fraction[2].item() == 1.0  # the dense layer
    want_aux = 8e-4 * sum(f[i] * m[i] for i in f) / sum(f.values())
    torch.testing.assert_close(out.aux_loss, want_aux, atol=1e-15, rtol=1e-12)
    lm = F.cross_entropy(out.logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    # (transformers computes the LM loss from float32 logits)
    torch.testing.assert_close(out.loss, lm + want_aux, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.loss - out.aux_loss, lm, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        model.eval()
        plain = model(input_ids=ids, attention_mask=mask, labels=ids)
    assert plain.aux_loss is None
    torch.testing.assert_close(plain.loss.double(), lm, atol=1e-6, rtol=1e-6)
    # nothing routed anywhere: the router term is 0, not NaN
    force_routes(model.train(), attend=-5.0)
    assert model(input_ids=ids, attention_mask=mask, labels=ids).aux_loss.item() == 0.0


def test_random_route_fraction_routes_only_real_tokens_in_training():
    model = force_routes(tiny(random_route_fraction=0.15), attend=-5.0)  # nothing routed by the router
    ids, mask = left_padded_batch(97, [20, 9])  # 29 real tokens -> int(29 * 0.15) = 4 routed
    routed = {}
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda mod, inp, out, i=i: routed.__setitem__(i, out[1]))
    assert model(input_ids=ids, attention_mask=mask).routed_fraction[0].item() == 0.0  # eval: never random
    out = model.train()(input_ids=ids, attention_mask=mask)
    for i in (0, 1, 3):
        assert routed[i].sum().item() == 4 and not (routed[i] & ~mask.bool()).any()
        assert out.routed_fraction[i].item() == pytest.approx(4 / 29, rel=1e-6)


def test_routed_fraction_callback_logs_training_forwards():
    model = tiny().train()
    ids, mask = left_padded_batch(97, [8, 5])
    a = model(input_ids=ids, attention_mask=mask).routed_fraction
    b = model(input_ids=ids.flip(1), attention_mask=mask.flip(1)).routed_fraction
    model.eval()(input_ids=ids, attention_mask=mask)  # not a training forward: not logged
    state = TrainerState()
    state.log_history.append({"loss": 1.0})
    logs = {"loss": 1.0}
    RoutedFractionCallback().on_log(None, state, None, logs=logs, model=model)
    for i in (0, 1, 3):
        assert logs[f"routing/fraction_layer_{i}"] == pytest.approx((a[i].item() + b[i].item()) / 2)
        assert state.log_history[-1][f"routing/fraction_layer_{i}"] == logs[f"routing/fraction_layer_{i}"]
    assert "routing/fraction_layer_2" not in logs and model.model.pop_routing_log() == {}


# --------------------------------------------------------------------------- the decode cache

@pytest.mark.parametrize("attn, path", PATHS)
def test_decode_matches_forward_with_routed_and_bypassed_decode_tokens(attn, path):
    model = tiny(attn, path)
    for lengths in ([1, 3], [2, 1, 3], [3, 2]):
        assert_decode_matches_forward(model, prompt_lengths=lengths, new_tokens=6)
    # both kinds of token occur among the decoded ones, in every routed layer
    ids, mask = left_padded_batch(97, [1, 3, 2])
    with torch.no_grad():
        prefill = model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values.entry_counts()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                             pad_token_id=0, eos_token_id=None, return_dict_in_generate=True)
    decoded = out.past_key_values.entry_counts() - prefill  # 7 decode steps fed (the 8th token is not)
    for i in (0, 1, 3):
        assert 0 < decoded[i].sum() < 7 * 3, (i, decoded[i])
    assert decoded[2].tolist() == [7, 7, 7]


def test_cache_holds_exactly_the_routed_tokens_and_counts_seen_tokens():
    # catches: caching pads or every token in routed layers, positions from the cache length
    model = tiny()
    ids, mask = left_padded_batch(97, [7, 3, 5])
    taken = {}
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda mod, inp, out, i=i: taken.__setitem__(i, out[1]))
    with torch.no_grad():
        cache = model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
    assert isinstance(cache, DTRNetCache) and cache.get_seq_length() == 7
    assert cache.seen_tokens.tolist() == [7, 3, 5]
    counts = cache.entry_counts()
    for i in range(4):
        assert counts[i].tolist() == taken[i].sum(1).tolist()
    assert counts[2].tolist() == [7, 3, 5] and (counts[[0, 1, 3]] < counts[2]).any()


def test_manual_decode_without_position_ids_uses_the_seen_count():
    # the model's own positions (no position_ids passed) give the full forward's logits token by token
    model = tiny()
    ids, mask = left_padded_batch(97, [6, 2])
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        out = model(input_ids=ids[:, :3], attention_mask=mask[:, :3], use_cache=True)
        steps = [out.logits[:, -1]]
        for t in range(3, 6):
            out = model(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=out.past_key_values)
            steps.append(out.logits[:, -1])
    assert out.past_key_values.seen_tokens.tolist() == [6, 2]
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 2:], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- shared family checks

@pytest.mark.parametrize("attn, path", PATHS)
def test_rows_independent_exactly(attn, path):
    assert_rows_independent(tiny(attn, path))


@pytest.mark.parametrize("attn, path", PATHS)
def test_causal_under_each_path(attn, path):
    assert_causal(tiny(attn, path))


def test_save_load_round_trip(tmp_path):
    loaded = assert_save_load_round_trip(tiny(), tmp_path / "saved")
    assert loaded.config.dense_layers == [2] and loaded.model.layers[0].routed


def test_lora_on_attention_projections_trains():
    assert_lora_trains(tiny(), ["q_proj", "k_proj", "v_proj", "o_proj"])


def rebuilt_without(model, skip):
    return rebuilt_without_layers(model, skip, layer_lists=("dense_layers",), build=lambda c: DTRNetForCausalLM._from_config(
        DTRNetConfig(**c), attn_implementation="sdpa"))


@pytest.mark.parametrize("skip", [(1,), (0, 2)])
def test_skipped_layers_equal_a_model_rebuilt_without_them(skip):
    model = tiny()
    ref = rebuilt_without(model, skip)
    ids, mask = left_padded_batch(97, [7, 4])
    gen = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None,
               output_logits=True, return_dict_in_generate=True)
    with torch.no_grad(), skip_layers(model, skip):
        logits = model(input_ids=ids, attention_mask=mask).logits
        out = model.generate(input_ids=ids, attention_mask=mask, **gen)
    want = ref(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(logits, want)
    want_out = ref.generate(input_ids=ids, attention_mask=mask, **gen)
    assert torch.equal(out.sequences, want_out.sequences)
    assert torch.equal(torch.stack(out.logits), torch.stack(want_out.logits))
    assert len(out.past_key_values) == 4 - len(skip)
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4


@pytest.mark.slow  # about 25 s: two short GRPO runs
def test_nested_reft_corrects_exactly(chat_tokenizer, tmp_path, monkeypatch):
    torch.manual_seed(0)
    tok = chat_tokenizer
    config = DTRNetConfig(**{**SHAPE, "vocab_size": len(tok), "num_hidden_layers": 3, "pad_token_id": tok.pad_token_id,
                             "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id})
    model = DTRNetForCausalLM(config)
    for layer in model.model.layers:
        if layer.routed:
            torch.nn.init.normal_(layer.router.weight_predictor[2].weight, std=1.0)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    assert_nested_reft_corrects_exactly(str(tmp_path / "model"), tok, tmp_path, monkeypatch)


@pytest.mark.parametrize("attn, path", PATHS)
def test_rollout_engine_phases_continue_exactly_from_a_row_selected_cache(attn, path):
    assert_compacted_sampling_exact(tiny(attn, path))


def test_the_cache_holds_no_view_of_the_prefill():
    assert_cache_owns_its_storage(tiny())
