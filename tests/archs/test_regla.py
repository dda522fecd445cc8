"""ReGLA (SPEC §9) on tiny instances, pure and hybrid: the refining gate's log is finite and ≤ 0, the
running key max folds into the gate by one rule on both paths, pads are no-ops; decode = full forward
across chunk boundaries, rows independent, save/load, LoRA, skipping, phased rollouts, Nested-ReFT;
oracles: fla's naive recurrent GLA on the layer's own features, transformers' Llama for an all-softmax
hybrid; exact decode-state sizes."""

import math
import re

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
from transformers import (
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
)

import archs.regla.modeling_regla as modeling_regla
from archs.regla import ReglaCache, ReglaConfig, ReglaForCausalLM
from archs.regla.feature_maps import refined_log_gate, shifted_keys, variance_scale
from archs.skipping import skip_layers
from nested_reft.engines import HFEngine, SamplingSpec

C = 4  # chunk size: short prompts cross C−1, C, C+1 and 2C±1
KINDS = ("pure", "hybrid")
VOCAB = 97


def tiny_config(kind: str = "pure", **overrides) -> ReglaConfig:
    # initializer_range 0.2: outputs far from uniform, so a wrong state moves the logits well past 1e-4
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, chunk_size=C, gate_rank=8, initializer_range=0.2,
                softmax_layers="half" if kind == "hybrid" else None)
    return ReglaConfig(**{**base, **overrides})


def tiny(kind: str = "pure", seed: int = 0, dtype=torch.float32, attn: str = "sdpa", **overrides) -> ReglaForCausalLM:
    torch.manual_seed(seed)
    return ReglaForCausalLM._from_config(tiny_config(kind, **overrides), attn_implementation=attn).to(dtype).eval()


def content_positions(mask):
    return (mask.long().cumsum(1) - 1).clamp(min=0)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("bad, message", [
    (dict(chunk_size=0), "chunk_size"), (dict(gate_axis="row"), "gate_axis"), (dict(norm_type="batchnorm"), "norm_type"),
    (dict(gla_backend="cuda"), "gla_backend"), (dict(gla_backend="triton", gate_axis="value"), "gate_axis='value'"),
    (dict(softmax_layers=[2]), "softmax_layers"), (dict(softmax_layers=[1, 1]), "softmax_layers"),
    (dict(softmax_layers="all"), "softmax_layers"), (dict(num_attention_heads=5), "num_attention_heads"),
    (dict(num_key_value_heads=3), "num_key_value_heads"), (dict(gate_rank=0), "gate_rank"),
    (dict(feature_dim=0), "feature_dim"), (dict(softmax_layers=[0], head_dim=7), "even head_dim"),
])
def test_config_rejects_bad_values_with_a_clear_error(bad, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tiny_config(**bad)


def test_config_defaults():
    c = ReglaConfig()
    assert (c.feature_dim, c.head_dim, c.gate_axis, c.refining_gate, c.gate_rank, c.output_gate, c.norm_type,
            c.chunk_size, c.gla_backend, c.softmax_layers) == (64, 64, "key", True, 16, True, "rmsnorm", 16, "torch", [])
    assert ReglaConfig(softmax_layers="half").softmax_layers == [1, 3, 5, 7, 9, 11]
    assert dict(c.auto_map) == {} and "auto_map" not in c.to_dict()  # what TRL's loader reads
    assert math.isclose(variance_scale(16), 1 / (math.e * math.sqrt(16 * (math.e**2 - 1))))


# --------------------------------------------------------------------------- the gate and the shift rule


def test_log_gate_is_finite_nonpositive_and_exact_for_extreme_logits():
    """log F for gate and refine logits in ±{0, 6, 30, 100} (float32): finite, ≤ 0, with finite
    gradients, equal to the log of the formula (1 − r) g² + r (1 − (1 − g)²) evaluated in float64
    where that is representable. Catches log of the direct formula (−inf at a = b = −100 in float32),
    a swapped refine term, and F = g instead of g² for the plain gate (r ≡ 0)."""
    values = torch.tensor([-100.0, -30.0, -6.0, 0.0, 6.0, 30.0, 100.0])
    a, b = torch.meshgrid(values, values, indexing="ij")
    a, b = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    log_f = refined_log_gate(a, b)
    log_f.sum().backward()
    assert torch.isfinite(log_f).all() and (log_f <= 0).all()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    g, r = torch.sigmoid(a.detach().double()), torch.sigmoid(b.detach().double())
    direct = torch.log((1 - r) * g**2 + r * (1 - (1 - g) ** 2))
    ok = a.detach().abs() <= 30
    torch.testing.assert_close(log_f.detach().double()[ok], direct[ok], atol=1e-9, rtol=1e-5)
    plain = refined_log_gate(a.detach(), None)
    torch.testing.assert_close(plain.double()[ok], torch.log(g**2)[ok], atol=1e-9, rtol=1e-5)
    assert torch.isfinite(plain).all() and (plain <= 0).all()


def running_max_by_loop(k, valid, m0):
    """SPEC §9 read literally: m_t = max(m_{t−1}, max_features k_t) over real tokens only."""
    b, h, t_len, _ = k.shape
    phi = torch.zeros_like(k)
    shift = torch.zeros(b, h, t_len, dtype=k.dtype)
    m = m0.clone()
    for row in range(b):
        for head in range(h):
            for t in range(t_len):
                if not valid[row, t]:
                    continue
                new = max(float(m[row, head]), float(k[row, head, t].max()))
                old = float(m[row, head])
                shift[row, head, t] = old - new if math.isfinite(old) else 0.0
                phi[row, head, t] = torch.exp(k[row, head, t] - new)
                m[row, head] = new
    return phi, shift, m


def test_shifted_keys_follow_the_running_max_over_real_tokens():
    """Against a loop: pads anywhere in the chunk, one row continuing a finite running max and one
    with nothing seen yet. Catches pads taken into the max, a max over features only (not past
    positions), a shift of the wrong sign, and a first token shifted against a −inf max."""
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 3, 7, 5, generator=g, dtype=torch.float64) * 3
    valid = torch.tensor([[1, 0, 1, 1, 0, 1, 1], [0, 0, 1, 1, 1, 0, 1]], dtype=torch.bool)
    k[:, :, 1] += 50  # a pad with huge keys: must not enter the max
    m0 = torch.tensor([[2.0, 9.0, -1.0], [float("-inf")] * 3], dtype=torch.float64)
    phi, shift, m = shifted_keys(k, valid, m0)
    want_phi, want_shift, want_m = running_max_by_loop(k, valid, m0)
    torch.testing.assert_close(phi, want_phi, atol=1e-14, rtol=1e-14)
    torch.testing.assert_close(shift, want_shift, atol=1e-14, rtol=1e-14)
    torch.testing.assert_close(m, want_m)
    assert (shift <= 0).all()


def add_constant(model, c, projections=("q_proj", "k_proj")):
    """Forward hooks adding c to the q and k projections of every ReGLA layer."""
    return [getattr(layer.self_attn, name).register_forward_hook(lambda mod, inp, out: out + c)
            for layer in model.model.layers if not layer.is_softmax for name in projections]


@pytest.mark.parametrize("kind", KINDS)
def test_queries_and_keys_offset_by_a_constant_leave_the_model_unchanged(kind):
    """k + c for c = ±20 (float64), and q + 100, k + 100 (float32): the logits do not move (1e-9 / 1e-4).
    The running max absorbs c in φ_k, the per-token max in φ_q. Without the running max (φ_k = exp(k))
    k − 20 shrinks the state by e^-20 below the norm's eps; either exp without its max overflows
    float32 at +100."""
    ids, mask = left_padded_batch(VOCAB, [7, 4])
    model = tiny(kind, dtype=torch.float64)
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
        for c in (-20.0, 20.0):
            hooks = add_constant(model, c, projections=("k_proj",))
            shifted = model(input_ids=ids, attention_mask=mask).logits
            for h in hooks:
                h.remove()
            torch.testing.assert_close(shifted, base, atol=1e-9, rtol=1e-9)
        model = tiny(kind)
        base = model(input_ids=ids, attention_mask=mask).logits
        add_constant(model, 100.0)
        shifted = model(input_ids=ids, attention_mask=mask).logits
    assert torch.isfinite(shifted).all()
    torch.testing.assert_close(shifted, base, atol=1e-4, rtol=1e-4)


def stepwise_logits(model, ids, mask):
    """Feed the sequence one column at a time through the cache: every GLA step is the decode update."""
    cache, steps = None, []
    with torch.no_grad():
        for t in range(ids.size(1)):
            out = model(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    return torch.cat(steps, 1)


def global_max_rule(k, valid, running_max):
    """A plausible wrong chunked rule: subtract the chunk's overall max, no shift folded into the gate."""
    real = valid[:, None, :, None]
    top = k.masked_fill(~real, float("-inf")).amax(dim=(-1, -2))
    phi = torch.where(real, k - top[..., None, None], torch.full_like(k, float("-inf"))).exp()
    return phi, torch.zeros_like(k[..., 0]), top


def test_chunked_and_recurrent_paths_share_one_shift_rule(monkeypatch):
    """Keys scaled ×30 so the running max jumps by tens along the sequence: the full (chunked) forward
    equals the token-by-token decode to 1e-9 (float64). With the chunked path alone switched to another
    shift rule (the chunk's global max, no gate shift), the norm's eps makes them differ by > 1e-2:
    this is the mismatch the test exists to catch."""
    model = tiny("pure", dtype=torch.float64, num_hidden_layers=1)
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight.mul_(30.0)
    ids, mask = left_padded_batch(VOCAB, [11, 6])
    real = mask.bool()
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
    steps = stepwise_logits(model, ids, mask)
    torch.testing.assert_close(steps[real], full[real], atol=1e-9, rtol=1e-9)

    right = modeling_regla.shifted_keys
    monkeypatch.setattr(modeling_regla, "shifted_keys",
                        lambda k, valid, m: global_max_rule(k, valid, m) if k.size(2) > 1 else right(k, valid, m))
    with torch.no_grad():
        wrong = model(input_ids=ids, attention_mask=mask).logits
    assert (wrong[real] - steps[real]).abs().max() > 1e-2


def spec_formula(attn, x, valid):
    """SPEC §9 literally, without the running max: over the real tokens S*_t = F_t ⊙ S*_{t−1} + exp(k_t) v_tᵀ
    (F on the key or the value axis), o_t = c · S*_tᵀ φ_q(q_t), then the layer's Norm, gate and W_o."""
    b, t_len, _ = x.shape
    q = attn._heads(attn.q_proj(x), attn.feature_dim)
    k = attn._heads(attn.k_proj(x), attn.feature_dim)
    v = attn._heads(attn.v_proj(x), attn.head_dim)
    forget = attn.log_forget_gate(x).exp()
    o = torch.zeros(b, attn.num_heads, t_len, attn.head_dim, dtype=x.dtype)
    for row in range(b):
        state = torch.zeros(attn.num_heads, attn.feature_dim, attn.head_dim, dtype=x.dtype)
        for t in range(t_len):
            if valid[row, t]:
                f = forget[row, :, t]
                state = state * (f[:, :, None] if attn.gate_axis == "key" else f[:, None, :])
                state = state + k[row, :, t].exp()[:, :, None] * v[row, :, t][:, None, :]
            phi_q = (q[row, :, t] - q[row, :, t].amax(-1, keepdim=True)).exp()
            o[row, :, t] = attn.scale * torch.einsum("hk,hkv->hv", phi_q, state)
    return attn.output(o, x)


@pytest.mark.parametrize("gate_axis", ["key", "value"])
def test_layer_equals_the_spec_formula_without_the_running_max(gate_axis):
    """With the norm's eps negligible (1e-30) Norm is exactly scale-invariant, so folding the running max
    into the gate must give the unnormalised recurrence S* = F ⊙ S* + exp(k) vᵀ (float64, 1e-9; keys
    ×5 so the max moves; LayerNorm, since LlamaRMSNorm rounds through float32 even for float64). Catches the shift m_{t−1} − m_t left out of the gate (each key then keeps its
    own max) and a gate on the wrong axis."""
    model = tiny("pure", dtype=torch.float64, num_hidden_layers=1, gate_axis=gate_axis, feature_dim=6,
                 norm_type="layernorm", rms_norm_eps=1e-30)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        attn.k_proj.weight.mul_(5.0)
        _, mask = left_padded_batch(VOCAB, [10, 6])
        x = torch.randn(2, mask.size(1), 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        valid = mask.bool()
        torch.testing.assert_close(attn(x, valid)[valid], spec_formula(attn, x, valid)[valid], atol=1e-9, rtol=1e-9)


# --------------------------------------------------------------------------- fla oracle and the Llama oracle


def test_layer_equals_fla_naive_recurrent_gla_on_its_own_features():
    """flash-linear-attention's `naive_recurrent_gla` with q = φ_q (times c·√Dk for its Dk^-½ scale), k = φ_k,
    gk = log F̃ from the layer, on a left-padded batch with huge keys: the layer's output equals
    Norm/gate/W_o of fla's recurrence (float32). Also gk is finite and ≤ 0 as fla's kernels assume."""
    naive = pytest.importorskip("fla.ops.gla.naive", reason="flash-linear-attention (dev extra: fla-core) "
                                "is not importable here").naive_recurrent_gla
    model = tiny("pure", num_hidden_layers=1)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        attn.k_proj.weight.mul_(20.0)
    _, mask = left_padded_batch(VOCAB, [9, 5, 1])
    x = torch.randn(3, mask.size(1), 32, generator=torch.Generator().manual_seed(1))
    valid = mask.bool()
    with torch.no_grad():
        q, k, v, gk, gv, _ = attn.gla_inputs(x, valid, None)
        assert gv is None and torch.isfinite(gk).all() and (gk <= 0).all()
        o, _ = naive(*(t.transpose(1, 2) for t in (q * attn.scale * attn.feature_dim**0.5, k, v, gk)))
        want = attn.output(o.transpose(1, 2), x)
        got = attn(x, valid)
    torch.testing.assert_close(got[valid], want[valid], atol=1e-5, rtol=1e-5)


def test_all_softmax_hybrid_is_transformers_llama():
    """softmax_layers = every layer: the state_dict loads strictly into LlamaForCausalLM and the logits
    match in float64 on a left-padded batch (Llama given the content positions). Catches a wrong key
    mask, RoPE on column instead of content positions, and a mis-wired pre-norm/MLP."""
    model = tiny("pure", dtype=torch.float64, softmax_layers=[0, 1])
    c = model.config
    llama_config = LlamaConfig(vocab_size=VOCAB, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                               num_hidden_layers=2, num_attention_heads=c.num_attention_heads,
                               num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps,
                               rope_parameters=dict(c.rope_parameters), tie_word_embeddings=False)
    llama_config._attn_implementation = "sdpa"
    llama = LlamaForCausalLM(llama_config).double().eval()
    llama.load_state_dict(model.state_dict(), strict=True)
    ids, mask = left_padded_batch(VOCAB, [8, 3, 5])
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        theirs = llama(input_ids=ids, attention_mask=mask, position_ids=content_positions(mask)).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-10, rtol=1e-10)


# --------------------------------------------------------------------------- pads, decode = forward, rows


@pytest.mark.parametrize("kind", KINDS)
def test_pads_are_no_ops_at_the_left_and_inside_a_row(kind):
    """A row with left pads, and a row with pads between its tokens, give the logits of their real
    tokens alone (float64, 1e-10). The pad embedding is made huge so a pad in the running max would
    show. Catches pads in the max, a pad gate ≠ 1 or a pad value ≠ 0 (the pads inside a row), and
    positions counting pads (softmax layers)."""
    model = tiny(kind, dtype=torch.float64)
    with torch.no_grad():
        model.model.embed_tokens.weight[0].mul_(40.0)
    ids, mask = left_padded_batch(VOCAB, [9, 4])
    holes = torch.tensor([[1, 1, 0, 0, 1, 1, 1, 0, 1]])
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=ids[1:, 5:]).logits
        torch.testing.assert_close(padded[1, 5:], alone[0], atol=1e-10, rtol=1e-10)
        gappy = ids[:1].clone()
        gappy[holes == 0] = 0
        with_holes = model(input_ids=gappy, attention_mask=holes).logits
        compact = model(input_ids=gappy[holes.bool()][None]).logits
    torch.testing.assert_close(with_holes[holes.bool()], compact[0], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_decode_matches_full_forward_across_chunk_boundaries(kind):
    """Prompt lengths 1, 2, 3, C−1, C, C+1, 2C−1, 2C, 2C+1 in one left-padded batch, 9 new tokens, and
    single-row prompts of 1 and 2 tokens. Catches a state not carried from the chunked prefill into
    decode, a running max reset between prefill and decode, and positions from the cache length."""
    model = tiny(kind)
    assert_decode_matches_forward(model, prompt_lengths=[1, 2, 3, 4, 5, 7, 8, 9], new_tokens=9)
    assert_decode_matches_forward(model, prompt_lengths=[1], new_tokens=7)
    assert_decode_matches_forward(model, prompt_lengths=[2], new_tokens=5)


@pytest.mark.parametrize("attn", ATTENTION_IMPLEMENTATIONS)
def test_hybrid_family_checks_under_each_attention_implementation(attn):
    """The hybrid's softmax layers under eager and SDPA: causal (a later token never moves an earlier
    logit), decode = full forward (prompts 1, 2, 3, C, C+1), rows independent, phased rollouts exact.
    Catches a boolean mask under eager (it is added: True/False become +1/+0 and nothing is masked)."""
    model = tiny("hybrid", attn=attn)
    assert model.config._attn_implementation == attn
    assert_causal(model)
    assert_decode_matches_forward(model, prompt_lengths=[1, 2, 3, 4, 5], new_tokens=6)
    assert_rows_independent(model)
    assert_compacted_sampling_exact(model)


def test_hybrid_eager_equals_sdpa():
    assert_eager_equals_sdpa(lambda attn: tiny("hybrid", attn=attn))


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_prefill_on_a_non_empty_cache_equals_one_prefill(kind):
    """Prefill in pieces of 1, 3 and 5 columns (across chunk boundaries, continuing S and m) = one
    prefill (1e-5); generate(prefill_chunk_size=2) = generate()."""
    model = tiny(kind)
    ids, mask = left_padded_batch(VOCAB, [9, 4, 1])
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        cache, parts = None, []
        for lo, hi in [(0, 1), (1, 4), (4, 9)]:
            out = model(input_ids=ids[:, lo:hi], attention_mask=mask[:, :hi], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            parts.append(out.logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(parts, 1)[real], full[real], atol=1e-5, rtol=1e-5)
    assert cache.seen_tokens.tolist() == [9, 4, 1] and cache.get_seq_length() == 9
    gen = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
               eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    whole, chunked = model.generate(**gen), model.generate(**gen, prefill_chunk_size=2)
    torch.testing.assert_close(torch.stack(chunked.logits), torch.stack(whole.logits), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides", [
    dict(gate_axis="value"), dict(norm_type="layernorm", output_gate=False), dict(gate_rank=None, feature_dim=6),
    dict(refining_gate=False),
], ids=["value-gate", "layernorm-no-output-gate", "full-rank-gates-feature-dim-6", "plain-gate"])
def test_options_keep_decode_equal_to_forward(overrides):
    model = tiny("hybrid", **overrides)
    attn = model.model.layers[0].self_attn
    assert (attn.refine_proj is None) == (overrides.get("refining_gate") is False)
    assert attn.q_proj.out_features == 4 * overrides.get("feature_dim", 8)
    assert_decode_matches_forward(model, prompt_lengths=[1, 3, 4, 5, 9], new_tokens=6)


def test_decode_steps_run_the_recurrent_update_and_prefill_the_chunked_form(monkeypatch):
    """generate(): one chunked call per GLA layer for the prompt, then one decode_gla step per layer
    and token (so decode = forward compares two different code paths)."""
    calls = {"chunked": 0, "decode": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(modeling_regla, "chunked_gla", counting("chunked", modeling_regla.chunked_gla))
    monkeypatch.setattr(modeling_regla, "decode_gla", counting("decode", modeling_regla.decode_gla))
    model = tiny("pure", num_hidden_layers=3)
    ids, mask = left_padded_batch(VOCAB, [6, 2])
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                   eos_token_id=None)
    assert calls == {"chunked": 3, "decode": 4 * 3}


@pytest.mark.parametrize("kind", KINDS)
def test_rows_are_independent_in_forward_and_in_decode(kind):
    model = tiny(kind)
    assert_rows_independent(model, lengths=(5, 9))
    ids, mask = left_padded_batch(VOCAB, [5, 7])
    other_ids, other_mask = ids.clone(), mask.clone()
    other_ids[1] = torch.randint(1, VOCAB, (7,), generator=torch.Generator().manual_seed(3))
    other_ids[1, :4], other_mask[1, :4] = 0, 0
    runs = [model.generate(input_ids=i, attention_mask=m, max_new_tokens=6, do_sample=False, pad_token_id=0,
                           eos_token_id=None, output_logits=True, return_dict_in_generate=True)
            for i, m in [(ids, mask), (other_ids, other_mask)]]
    assert isinstance(runs[0].past_key_values, ReglaCache)
    assert torch.equal(torch.stack(runs[0].logits)[:, 0], torch.stack(runs[1].logits)[:, 0])


# --------------------------------------------------------------------------- backends


def test_triton_backend_equals_the_torch_backend(monkeypatch):
    """The model with gla_backend='triton' (Triton's interpreter on CPU): logits and parameter
    gradients equal the torch chunked form's (float32)."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch_model = tiny("pure")
    triton_model = ReglaForCausalLM(tiny_config("pure", gla_backend="triton")).eval()
    triton_model.load_state_dict(torch_model.state_dict())
    ids, mask = left_padded_batch(VOCAB, [19, 6])
    outs = []
    for model in (torch_model, triton_model):
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        outs.append((out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-5)
    assert outs[1][1].keys() == outs[0][1].keys()
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][name], grad, atol=1e-5, rtol=1e-4)


def test_fla_backend_refuses_cpu_tensors():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the fla path runs")
    model = ReglaForCausalLM(tiny_config("pure", gla_backend="fla")).eval()
    with pytest.raises(RuntimeError, match="CUDA"):
        model(input_ids=torch.ones(1, 3, dtype=torch.long))


# --------------------------------------------------------------------------- save/load, LoRA, skipping


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(kind, tmp_path):
    loaded = assert_save_load_round_trip(tiny(kind), tmp_path / "regla")
    assert loaded.config.softmax_layers == ([1] if kind == "hybrid" else [])


@pytest.mark.parametrize("kind", KINDS)
def test_lora_on_attention_projections_trains_only_the_adapters(kind):
    assert_lora_trains(tiny(kind), ["q_proj", "k_proj", "v_proj", "o_proj"])


def rebuilt_without(model, skip):
    """An independent reference: a fresh model with fewer layers (softmax layers renumbered) and the kept weights."""
    return rebuilt_without_layers(model, skip, layer_lists=("softmax_layers",))


@pytest.mark.parametrize("kind", KINDS)
def test_skipped_layers_equal_a_model_rebuilt_without_them(kind):
    """Layers 1 and 2 of 4 (hybrid: softmax in 1 and 3) skipped: forward and cached generation equal a
    model rebuilt without them exactly, and the cache has one slot per layer that ran."""
    model = tiny(kind, num_hidden_layers=4)
    ref = rebuilt_without(model, (1, 2))
    ids, mask = left_padded_batch(VOCAB, [6, 3])
    gen = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
               eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad(), skip_layers(model, [1, 2]):
        logits = model(input_ids=ids, attention_mask=mask).logits
        out = model.generate(**gen)
    with torch.no_grad():
        assert torch.equal(logits, ref(input_ids=ids, attention_mask=mask).logits)
        want = ref.generate(**gen)
    assert torch.equal(torch.stack(out.logits), torch.stack(want.logits))
    assert len(out.past_key_values.layers) == 2
    assert model.model.layers[3].self_attn.layer_idx == 3


# --------------------------------------------------------------------------- rollouts and Nested-ReFT


class _Tok:
    pad_token_id = 0
    eos_token_id = 96


def teacher_forced_logps(model, prompt, completion, temperature):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1: -1].double()
    return torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


@pytest.mark.parametrize("kind", KINDS)
def test_hf_engine_compacted_phases_keep_mu_exact(kind, monkeypatch):
    """HFEngine(compact_every=3), 10 tokens: rows that hit EOS leave the batch between phases (the
    cache's batch_select_indices drops their states, maxima, K/V and counts) and the rest continue
    from the cache; every sampled log-prob equals a teacher-forced forward of the row alone (1e-5).
    A row of another's state, a stale running max or seen count after a phase fails this."""
    model = tiny(kind, num_hidden_layers=3)
    eos = list(range(82, 97))  # about 15% of the vocabulary ends a completion
    engine = HFEngine(model, _Tok(), eos_token_ids=eos, compact_every=3)
    sizes = []
    real = engine._generate_phase
    monkeypatch.setattr(engine, "_generate_phase", lambda ids, *a, **k: (sizes.append(ids.size(0)), real(ids, *a, **k))[1])
    prompts = [[5, 6, 7, 8, 9], [11], [12, 13], [14, 15, 16], [17, 18], [19], [20, 21, 22], [23]]
    out = engine.generate(prompts, SamplingSpec(max_new_tokens=10, temperature=0.9, seed=3))
    assert sizes[0] == 8 and len(sizes) >= 2 and sizes[-1] < 8
    assert max(len(c) for c in out.completion_ids) > 3
    for prompt, completion, lps in zip(prompts, out.completion_ids, out.logprobs):
        assert completion[-1] in eos or len(completion) == 10
        expected = teacher_forced_logps(model, prompt, completion, 0.9)
        torch.testing.assert_close(torch.tensor(lps, dtype=torch.float64), expected, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("kind, attn", [("pure", "sdpa"), ("hybrid", "sdpa"), ("hybrid", "eager")])
def test_nested_reft_corrects_exactly(kind, attn, chat_tokenizer, tmp_path, monkeypatch):
    model = tiny(kind, vocab_size=len(chat_tokenizer), num_hidden_layers=3, initializer_range=0.02,
                 pad_token_id=chat_tokenizer.pad_token_id, eos_token_id=chat_tokenizer.eos_token_id,
                 bos_token_id=chat_tokenizer.bos_token_id)
    model.save_pretrained(tmp_path / "model")
    chat_tokenizer.save_pretrained(tmp_path / "model")
    assert_nested_reft_corrects_exactly(str(tmp_path / "model"), chat_tokenizer, tmp_path, monkeypatch,
                                        attn_implementation=attn)


# --------------------------------------------------------------------------- cache sizes


@pytest.mark.parametrize("kind", KINDS)
def test_decode_state_is_constant_in_length_and_exactly_counted(kind):
    """After the prompt and after each of 12 decode steps: each GLA layer holds S (B·H·Dk·Dv float32)
    and m (B·H float32), whatever the length; each softmax layer holds the K/V of every column
    (B·columns entries of 2·Hkv·D floats); seen counts advance by one per step."""
    model = tiny(kind, num_hidden_layers=4)
    c = model.config
    b, lengths = 3, [2, 7, 5]
    ids, mask = left_padded_batch(VOCAB, lengths)
    gla_layers = 4 - len(c.softmax_layers)
    state_bytes = gla_layers * b * c.num_attention_heads * (c.feature_dim * c.head_dim + 1) * 4
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = out.past_key_values
        for step in range(13):
            columns = ids.size(1) + step
            sizes = cache.nbytes()
            assert sizes["state"] == state_bytes
            assert cache.kv_entries() == len(c.softmax_layers) * b * columns
            assert sizes["kv"] == cache.kv_entries() * 2 * c.num_key_value_heads * c.head_dim * 4
            assert cache.seen_tokens.tolist() == [n + step for n in lengths] and cache.get_seq_length() == columns
            mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype)], 1)
            out = model(input_ids=out.logits[:, -1].argmax(-1, keepdim=True), attention_mask=mask,
                        past_key_values=cache, use_cache=True)
    assert cache.nbytes()["state"] == state_bytes


def test_generate_refuses_other_caches_and_bad_masks():
    model = tiny("hybrid")
    ids, mask = left_padded_batch(VOCAB, [4, 2])
    with pytest.raises(ValueError, match="cache_implementation"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, cache_implementation="static",
                       pad_token_id=0)
    with pytest.raises(TypeError, match="ReglaCache"):
        model(input_ids=ids, attention_mask=mask, past_key_values=DynamicCache())
    with pytest.raises(ValueError, match="columns"):
        model(input_ids=ids, attention_mask=mask[:, 1:])
    with pytest.raises(ValueError, match="2-D"):
        model(input_ids=ids, attention_mask=mask[:, None, None, :].bool())
    with pytest.raises(NotImplementedError, match="rolled back"):
        ReglaCache().crop(1)
    cache = model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
    with torch.no_grad(), skip_layers(model, [1]), pytest.raises(ValueError, match="skip sets"):
        model(input_ids=ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1]], 1), past_key_values=cache)


def test_training_forward_has_finite_gradients_with_saturated_gates():
    """Gate biases at ±30 (g and r fully saturated), right-padded batch: loss and every gradient finite."""
    model = tiny("pure").train()
    for layer in model.model.layers:
        with torch.no_grad():
            modeling_regla.gate_bias(layer.self_attn.forget_proj).copy_(torch.linspace(-30, 30, 32))
            modeling_regla.gate_bias(layer.self_attn.refine_proj).fill_(-30.0)
    ids = torch.randint(1, VOCAB, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("norm_type", ["rmsnorm", "layernorm"])
def test_bfloat16_model_trains_and_decodes_with_a_float32_state(norm_type):
    """bf16 weights: forward, backward and generate run with finite values; the GLA state and the
    running max stay float32 in the cache."""
    model = tiny("hybrid", norm_type=norm_type, dtype=torch.bfloat16)
    ids, mask = left_padded_batch(VOCAB, [6, 3])
    out = model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=True)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    state, running_max = out.past_key_values.gla_state(0)
    assert state.dtype == running_max.dtype == torch.float32
    gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    assert gen.shape == (2, ids.size(1) + 4)


@pytest.mark.parametrize("kind", ["pure", "hybrid"])
def test_the_cache_holds_no_view_of_the_prefill(kind):
    """Found at N = 4096: the running maximum was a view of the prefill's per-position maxima."""
    assert_cache_owns_its_storage(tiny(kind))
