"""Resona (SPEC §8) on tiny instances: the retrieval ops against loops over content positions; the read
against SDPA over the gathered chunks and, at chunk size 1 with every chunk, against full causal
cross-attention; gate 0 is exactly plain ReGLA; causality; decode = full forward across chunk boundaries
(float32 and float64), pads are no-ops, rows independent; save/load, LoRA, skipping, phased rollouts,
Nested-ReFT; exact cache sizes (they grow with N)."""

import re

import pytest
import torch
import torch.nn.functional as F
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
from transformers import AutoConfig, DynamicCache

from archs.regla import ReglaCache, ReglaConfig, ReglaForCausalLM
from archs.resona import ResonaCache, ResonaConfig, ResonaForCausalLM
from archs.resona.modeling_resona import ResonaRetrieval
from archs.resona.retrieval import content_slots, update_summaries
from archs.skipping import skip_layers

VOCAB = 97
C = 3  # retrieval chunk size: short prompts cross C−1, C, C+1, 2C±1
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, chunk_size=4, gate_rank=8, initializer_range=0.2)
RESONA = dict(retrieval_chunk_size=C, retrieval_top_k=2, retrieval_gate_init=1.0)


def tiny_config(**overrides) -> ResonaConfig:
    # initializer_range 0.2 and α = 1: the read moves the logits well past 1e-4, so a wrong read shows
    return ResonaConfig(**{**BASE, **RESONA, **overrides})


def tiny(seed: int = 0, dtype=torch.float32, attn: str = "sdpa", **overrides) -> ResonaForCausalLM:
    torch.manual_seed(seed)
    return ResonaForCausalLM._from_config(tiny_config(**overrides), attn_implementation=attn).to(dtype).eval()


def retrieval_module(dtype=torch.float64, seed: int = 0, **overrides) -> ResonaRetrieval:
    torch.manual_seed(seed)
    return ResonaRetrieval(tiny_config(**overrides), layer_idx=0).to(dtype).eval()


def content_positions(mask):
    return (mask.long().cumsum(1) - 1).clamp(min=0)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("bad, message", [
    (dict(retrieval_chunk_size=0), "retrieval_chunk_size"), (dict(retrieval_top_k=0), "retrieval_top_k"),
    (dict(retrieval_summary="median"), "retrieval_summary"), (dict(retrieval_query="state"), "retrieval_query"),
    (dict(retrieval_mixing="sum"), "retrieval_mixing"), (dict(mixer="lstm"), "mixer"),
    (dict(retrieval_layers=[2]), "retrieval_layers"), (dict(retrieval_layers=[1, 1]), "retrieval_layers"),
    (dict(retrieval_layers="last"), "retrieval_layers"), (dict(softmax_layers=[1], retrieval_layers=[1]), "softmax layers"),
    (dict(mixer="mamba", time_step_rank=0), "time_step_rank"), (dict(chunk_size=0), "chunk_size"),
])
def test_config_rejects_bad_values_with_a_clear_error(bad, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tiny_config(**bad)


def test_config_defaults():
    c = ResonaConfig()
    assert (c.mixer, c.retrieval_chunk_size, c.retrieval_top_k, c.retrieval_summary, c.retrieval_query,
            c.retrieval_score_bias, c.retrieval_own_chunk, c.retrieval_mixing, c.retrieval_gate_init) == (
        "regla", 64, 4, "mean", "mixer_output", True, False, "parallel_gate", 0.0)
    assert c.retrieval_layers == [11] and c.softmax_layers == []
    assert ResonaConfig(softmax_layers="half").retrieval_layers == [10]  # the last recurrent layer
    assert ResonaConfig(num_hidden_layers=4, softmax_layers=[1], retrieval_layers="all").retrieval_layers == [0, 2, 3]
    assert dict(c.auto_map) == {} and "auto_map" not in c.to_dict()
    assert isinstance(AutoConfig.for_model("resona"), ResonaConfig)


# --------------------------------------------------------------------------- the ops


def test_content_slots_hold_each_rows_real_tokens_in_order():
    """Left pads, pads inside a row, and a second chunk continuing the slots of the first: slot s holds the
    row's s-th real token, zeros from the seen count on. Catches pads taking a slot, a continuation written
    at the column count instead of the seen count, and a chunk overwriting the cached slots."""
    g = torch.Generator().manual_seed(0)
    valid = torch.tensor([[0, 0, 1, 1, 0, 1], [1, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    first = torch.randn(3, 2, 6, 5, generator=g, dtype=torch.float64)
    slots = content_slots(None, first, valid, torch.zeros(3, dtype=torch.long), 6)
    more_valid = torch.tensor([[1, 0], [0, 1], [1, 1]], dtype=torch.bool)
    second = torch.randn(3, 2, 2, 5, generator=g, dtype=torch.float64)
    slots2 = content_slots(slots, second, more_valid, valid.sum(1), 8)
    for row in range(3):
        real = torch.cat([first[row][:, valid[row]], second[row][:, more_valid[row]]], dim=1)
        n = real.size(1)
        assert torch.equal(slots2[row, :, :n], real)
        assert (slots2[row, :, n:] == 0).all()
        assert torch.equal(slots[row, :, :int(valid[row].sum())], first[row][:, valid[row]])


@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_summaries_cover_completed_chunks_only_and_are_computed_once(reduce):
    """Summaries equal the mean (max) of each completed chunk's C keys, by a loop; incomplete chunks are 0.
    Continuing from cached summaries (marked with a sentinel) only adds the chunks that complete now:
    catches a summary of a half-filled chunk and summaries recomputed (or shifted) on every call."""
    g = torch.Generator().manual_seed(1)
    # 9 columns cached (3 chunk slots), 3 new ones: rows complete chunk 0; chunk 1; chunk 3 (a new slot)
    seen_before, seen_after = torch.tensor([2, 5, 9]), torch.tensor([5, 8, 12])
    width = 12
    keys = torch.randn(3, 2, width, 4, generator=g, dtype=torch.float64)
    for row, n in enumerate(seen_after.tolist()):
        keys[row, :, n:] = 0
    old = torch.full((3, 2, 9 // C, 4), 123.0, dtype=torch.float64)  # the sentinel: what was cached
    summaries = update_summaries(keys, old, seen_before, seen_after, C, new_columns=width - 9, reduce=reduce)
    assert summaries.shape == (3, 2, width // C, 4)
    for row in range(3):
        for c in range(width // C):
            chunk = keys[row, :, c * C:(c + 1) * C]
            if (c + 1) * C <= int(seen_before[row]):
                want = torch.full_like(chunk[:, 0], 123.0)  # completed before: kept as cached
            elif (c + 1) * C <= int(seen_after[row]):
                want = chunk.mean(1) if reduce == "mean" else chunk.amax(1)
            elif c < 9 // C:
                want = torch.full_like(chunk[:, 0], 123.0)  # not complete: the cached entry is untouched
            else:
                want = torch.zeros_like(chunk[:, 0])
            torch.testing.assert_close(summaries[row, :, c], want, atol=1e-15, rtol=0)


# --------------------------------------------------------------------------- the read: oracles


def reference_read(module, x, mixer_out, valid):
    """SPEC §8 read literally, row by row and head by head on content positions, with the selected chunks
    gathered by hand and read by torch's SDPA (float mask = the chunk scores as logit bias)."""
    b, t, _ = x.shape
    heads = lambda y: y.view(b, t, module.num_heads, module.head_dim).transpose(1, 2)  # noqa: E731
    q, k, v = heads(module.q_proj(x)), heads(module.k_proj(x)), heads(module.v_proj(x))
    source = mixer_out if module.query_source == "mixer_output" else x
    r = heads(module.score_proj(source))
    out = torch.zeros(b, module.num_heads, t, module.head_dim, dtype=x.dtype)
    cs = module.chunk_size
    for row in range(b):
        cols = valid[row].nonzero().flatten().tolist()  # content position p lives in column cols[p]
        for head in range(module.num_heads):
            kr, vr = k[row, head, cols], v[row, head, cols]
            for p, col in enumerate(cols):
                done = p // cs  # chunks completed before p: 0 .. done−1
                summary = [kr[c * cs:(c + 1) * cs].mean(0) if module.summary == "mean" else kr[c * cs:(c + 1) * cs].amax(0)
                           for c in range(done)]
                scores = [float(r[row, head, col] @ s) * module.scale for s in summary]
                picked = sorted(range(done), key=lambda c: -scores[c])[:module.top_k or done]
                entries = [(j, scores[c] if module.score_bias else 0.0) for c in picked
                           for j in range(c * cs, (c + 1) * cs)]
                if module.own_chunk:
                    entries += [(j, 0.0) for j in range(done * cs, p + 1)]
                if not entries:
                    continue  # nothing to read: the read is 0
                idx = torch.tensor([j for j, _ in entries])
                bias = torch.tensor([[s for _, s in entries]], dtype=x.dtype)
                out[row, head, col] = F.scaled_dot_product_attention(
                    q[row, head, col][None, None, None], kr[idx][None, None], vr[idx][None, None],
                    attn_mask=bias[None, None], scale=module.scale)[0, 0, 0]
    return out


@pytest.mark.parametrize("overrides", [
    dict(), dict(retrieval_summary="max"), dict(retrieval_own_chunk=True), dict(retrieval_query="input"),
    dict(retrieval_score_bias=False), dict(retrieval_top_k=None), dict(retrieval_top_k=1, retrieval_chunk_size=2),
], ids=["default", "max-summary", "own-chunk", "query-from-input", "no-score-bias", "k-all", "k1-C2"])
def test_read_equals_sdpa_over_the_gathered_chunks(overrides):
    """The layer's read (before W_o) on a batch with left pads and pads inside a row (float64, 1e-12),
    the mixer output a separate random input: it, not x, scores the chunks. Catches a token reading its own
    or a later chunk (c ≤ p/C), summaries of the wrong keys, the scores taken from x, the top-k of the wrong
    end, a missing score bias, pads taking slots or forming chunks."""
    module = retrieval_module(**overrides)
    g = torch.Generator().manual_seed(2)
    _, mask = left_padded_batch(VOCAB, [14, 9, 2])
    mask[0, 4:6] = 0  # pads inside a row
    valid = mask.bool()
    x = torch.randn(3, mask.size(1), 32, generator=g, dtype=torch.float64)
    mixer_out = torch.randn(3, mask.size(1), 32, generator=g, dtype=torch.float64)
    with torch.no_grad():
        got = module.attend(x, mixer_out, valid)
        want = reference_read(module, x, mixer_out, valid)
    real = valid[:, None, :, None].expand_as(got)
    torch.testing.assert_close(got[real], want[real], atol=1e-12, rtol=1e-12)
    assert got[real].abs().sum() > 0


@pytest.mark.parametrize("own_chunk", [False, True])
@pytest.mark.parametrize("score_bias", [False, True])
def test_chunk_size_one_with_every_chunk_is_full_causal_cross_attention(own_chunk, score_bias):
    """C = 1, k = all: the read is softmax attention of each real token over the row's real tokens before
    it (j < t; j ≤ t with its own chunk), written here as one SDPA call per row with an explicit boolean
    mask over content positions (and, with the score bias, a float mask r_t·k_j/√D: a 1-token chunk's
    summary is its key; 0 for the own chunk). A token with nothing before it reads exactly 0."""
    module = retrieval_module(retrieval_chunk_size=1, retrieval_top_k=None, retrieval_own_chunk=own_chunk,
                              retrieval_score_bias=score_bias)
    g = torch.Generator().manual_seed(3)
    _, mask = left_padded_batch(VOCAB, [11, 6])
    valid = mask.bool()
    x = torch.randn(2, mask.size(1), 32, generator=g, dtype=torch.float64)
    mixer_out = torch.randn(2, mask.size(1), 32, generator=g, dtype=torch.float64)
    with torch.no_grad():
        got = module.attend(x, mixer_out, valid)
        b, t, h, d = 2, mask.size(1), module.num_heads, module.head_dim
        heads = lambda y: y.view(b, t, h, d).transpose(1, 2)  # noqa: E731
        q, k, v, r = (heads(p(y)) for p, y in ((module.q_proj, x), (module.k_proj, x), (module.v_proj, x),
                                                (module.score_proj, mixer_out)))
    for row in range(2):
        cols = valid[row]
        n = int(cols.sum())
        qr, kr, vr, rr = (y[row][:, cols] for y in (q, k, v, r))
        allowed = torch.ones(n, n, dtype=torch.bool).tril(diagonal=0 if own_chunk else -1)
        bias = (rr @ kr.transpose(-1, -2)) * module.scale if score_bias else torch.zeros(h, n, n, dtype=x.dtype)
        bias = bias.masked_fill(torch.eye(n, dtype=torch.bool), 0.0)  # the own chunk (here: itself) has bias 0
        bias = bias.masked_fill(~allowed, float("-inf"))
        sees = allowed.any(dim=1)
        want = F.scaled_dot_product_attention(qr[:, sees], kr, vr, attn_mask=bias[:, sees], scale=module.scale)
        torch.testing.assert_close(got[row][:, cols][:, sees], want, atol=1e-12, rtol=1e-12)
        assert (got[row][:, cols][:, ~sees] == 0).all()
    if own_chunk and not score_bias:  # j ≤ t over every real token is plain causal attention
        qr, kr, vr = (y[0][:, valid[0]] for y in (q, k, v))
        causal = F.scaled_dot_product_attention(qr, kr, vr, is_causal=True, scale=module.scale)
        torch.testing.assert_close(got[0][:, valid[0]], causal, atol=1e-12, rtol=1e-12)


def test_retrieval_branch_is_causal_in_chunks():
    """With the mixer output held fixed, perturbing the layer input at content position s changes the
    branch's output (read and gate) at another token t only once s's chunk is complete before t:
    (⌊s/C⌋ + 1)·C ≤ p_t. Exactly: tokens before that are bit-identical; at least one token after it does
    change. Catches a token reading its own chunk without the option, a chunk read before it completes,
    and a gate that mixes across tokens."""
    module = retrieval_module(retrieval_top_k=None)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 16, 32, generator=g, dtype=torch.float64)
    mixer_out = torch.randn(1, 16, 32, generator=g, dtype=torch.float64)
    valid = torch.ones(1, 16, dtype=torch.bool)
    with torch.no_grad():
        base = module(x, mixer_out, valid)
        for s in (0, 4, 5, 8):
            x2 = x.clone()
            x2[0, s] += 1.0
            moved = (module(x2, mixer_out, valid) - base).abs().amax(-1)[0]
            first_reader = (s // C + 1) * C
            others = [t for t in range(16) if t != s]
            assert all(moved[t] == 0 for t in others if t < first_reader), (s, moved)
            assert any(moved[t] > 0 for t in others if t >= first_reader), (s, moved)


def test_perturbing_a_token_changes_no_logit_before_it():
    """Whole model (own chunk on, so the read spans a token's own chunk too): changing token s leaves every
    logit before s bit-identical, and changes the logits at s."""
    model = tiny(retrieval_own_chunk=True, retrieval_layers="all")
    ids = torch.randint(1, VOCAB, (1, 13), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        base = model(input_ids=ids).logits
        for s in (1, 3, 7, 12):
            changed = ids.clone()
            changed[0, s] = (changed[0, s] % (VOCAB - 1)) + 1
            logits = model(input_ids=changed).logits
            assert torch.equal(logits[:, :s], base[:, :s]), s
            assert not torch.equal(logits[:, s], base[:, s])


@pytest.mark.parametrize("mixing", ["parallel_gate", "residual_gate"])
def test_branch_mixes_the_gated_read_into_the_mixer_output(mixing):
    """y = (1 − g) ⊙ M + g ⊙ R (parallel_gate) or M + g ⊙ R (residual_gate), R = W_o(read), g = tanh(α) ⊙
    σ(W_g x + b_g), with α and b_g random so that no term vanishes (float64, 1e-12)."""
    module = retrieval_module(retrieval_mixing=mixing)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        module.gate_scale.copy_(torch.randn(32, generator=g, dtype=torch.float64))
        module.gate_proj.bias.copy_(torch.randn(32, generator=g, dtype=torch.float64))
        x = torch.randn(2, 9, 32, generator=g, dtype=torch.float64)
        mixer_out = torch.randn(2, 9, 32, generator=g, dtype=torch.float64)
        valid = torch.ones(2, 9, dtype=torch.bool)
        read = module.o_proj(module.attend(x, mixer_out, valid).transpose(1, 2).reshape(2, 9, 32))
        gate = torch.tanh(module.gate_scale) * torch.sigmoid(x @ module.gate_proj.weight.T + module.gate_proj.bias)
        want = (1 - gate) * mixer_out + gate * read if mixing == "parallel_gate" else mixer_out + gate * read
        torch.testing.assert_close(module(x, mixer_out, valid), want, atol=1e-12, rtol=1e-12)
    assert read[:, C:].abs().min() > 0  # tokens from position C on read something


def test_layer_feeds_the_branch_the_normed_input_and_the_mixers_output():
    """The branch is parallel: it gets the same normed layer input as the mixer, and the mixer's output."""
    model = tiny()
    layer = model.model.layers[1]
    seen = {}
    layer.input_layernorm.register_forward_hook(lambda m, a, out: seen.__setitem__("x", out))
    layer.self_attn.register_forward_hook(lambda m, a, out: seen.__setitem__("mixer", out))
    layer.retrieval.register_forward_pre_hook(lambda m, args: seen.__setitem__("args", args))
    with torch.no_grad():
        model(input_ids=torch.randint(1, VOCAB, (2, 7)))
    assert seen["args"][0] is seen["x"] and seen["args"][1] is seen["mixer"]


# --------------------------------------------------------------------------- gate 0 is plain ReGLA


def regla_twin(model: ResonaForCausalLM) -> ReglaForCausalLM:
    """The plain ReGLA model with the same config and every shared weight."""
    config = {k: v for k, v in model.config.to_dict().items() if k in ReglaConfig().to_dict() or k == "softmax_layers"}
    regla = ReglaForCausalLM(ReglaConfig(**{**config, "model_type": "regla"})).to(model.dtype).eval()
    shared = {k: v for k, v in model.state_dict().items() if ".retrieval." not in k}
    regla.load_state_dict(shared, strict=True)
    return regla


@pytest.mark.parametrize("overrides", [
    dict(), dict(retrieval_mixing="residual_gate", retrieval_layers="all"),
    dict(softmax_layers=[0], retrieval_own_chunk=True),
], ids=["parallel", "residual-all-layers", "hybrid-own-chunk"])
def test_gate_zero_is_exactly_the_plain_regla_model(overrides):
    """α = 0 (the default initial value): forward logits and every generate() step equal plain ReGLA's
    with the same weights, bit for bit; α = 1 moves them (the branch is really there)."""
    model = tiny(**{**overrides, "retrieval_gate_init": 0.0})
    regla = regla_twin(model)
    ids, mask = left_padded_batch(VOCAB, [9, 4, 1])
    gen = dict(input_ids=ids, attention_mask=mask, max_new_tokens=7, do_sample=False, pad_token_id=0,
               eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, regla(input_ids=ids, attention_mask=mask).logits)
        assert torch.equal(torch.stack(model.generate(**gen).logits), torch.stack(regla.generate(**gen).logits))
        for layer in model.model.layers:
            if layer.retrieval is not None:
                layer.retrieval.gate_scale.fill_(1.0)
        moved = model(input_ids=ids, attention_mask=mask).logits - regla(input_ids=ids, attention_mask=mask).logits
    assert moved[mask.bool()].abs().max() > 1e-2


def test_mamba_mixer_with_gate_zero_is_the_model_without_retrieval():
    """mixer='mamba' (SCOUT's Mamba-1 mixer, its parameter names): α = 0 equals the same model without
    retrieval layers exactly, and the mixer's state_dict is a ScoutMambaMixer's."""
    from archs.scout.modeling_scout import ScoutMambaMixer

    mamba = dict(mixer="mamba", time_step_rank="auto", state_size=4, retrieval_gate_init=0.0)
    model = tiny(**mamba)
    plain = tiny(**mamba, retrieval_layers=[])
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if ".retrieval." not in k}, strict=True)
    assert isinstance(model.model.layers[0].mixer, ScoutMambaMixer)
    ids, mask = left_padded_batch(VOCAB, [7, 3])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, plain(input_ids=ids, attention_mask=mask).logits)


# --------------------------------------------------------------------------- decode = forward, pads, rows

CONFIGS = {
    "default": dict(), "own-chunk": dict(retrieval_own_chunk=True), "residual-all": dict(retrieval_mixing="residual_gate",
                                                                                        retrieval_layers="all"),
    "hybrid": dict(softmax_layers=[0]), "max-query-input": dict(retrieval_summary="max", retrieval_query="input"),
    "mamba": dict(mixer="mamba", time_step_rank="auto", state_size=4, retrieval_layers="all"),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_decode_matches_full_forward_across_chunk_boundaries(name):
    """Prompt lengths 1, 2, 3 = C, C+1, 2C−1, 2C, 2C+1, 3C+1 in one left-padded batch, 2C+2 new tokens (every
    row completes chunks during decode), and single-row prompts of 1 and 2 tokens (float32, 1e-4).
    Catches a chunk joining the cache before it completes, summaries lost between prefill and decode,
    chunk boundaries from column counts, and a read of the token's own chunk when the option is off."""
    model = tiny(**CONFIGS[name])
    assert_decode_matches_forward(model, prompt_lengths=[1, 2, 3, 4, 5, 6, 7, 10], new_tokens=2 * C + 2)
    assert_decode_matches_forward(model, prompt_lengths=[1], new_tokens=2 * C + 1)
    assert_decode_matches_forward(model, prompt_lengths=[2], new_tokens=C + 1)


@pytest.mark.parametrize("attn", ATTENTION_IMPLEMENTATIONS)
def test_hybrid_family_checks_under_each_attention_implementation(attn):
    """A softmax layer (ReGLA's mask) below a retrieval layer, under eager and SDPA: causal, decode = full
    forward across chunk boundaries, rows independent, phased rollouts exact. Catches a boolean mask
    under eager (it is added: True/False become +1/+0 and nothing is masked)."""
    model = tiny(attn=attn, **CONFIGS["hybrid"])
    assert model.config._attn_implementation == attn
    assert_causal(model)
    assert_decode_matches_forward(model, prompt_lengths=[1, 2, 3, 4, 7], new_tokens=2 * C + 2)
    assert_rows_independent(model)
    assert_compacted_sampling_exact(model)


def test_hybrid_eager_equals_sdpa():
    assert_eager_equals_sdpa(lambda attn: tiny(attn=attn, **CONFIGS["hybrid"]))


def stepwise_logits(model, ids, mask, pieces=None):
    """Feed the columns in pieces (default one at a time) through the cache."""
    bounds = pieces or [(t, t + 1) for t in range(ids.size(1))]
    cache, steps = None, []
    with torch.no_grad():
        for lo, hi in bounds:
            out = model(input_ids=ids[:, lo:hi], attention_mask=mask[:, :hi], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    return torch.cat(steps, 1), cache


@pytest.mark.parametrize("name", ["default", "own-chunk", "mamba"])
def test_token_by_token_decode_equals_the_forward_in_float64(name):
    """float64, every column through the cache one at a time (every chunk completes during decode) =
    one full forward at 1e-10, on a left-padded batch."""
    model = tiny(dtype=torch.float64, **CONFIGS[name])
    ids, mask = left_padded_batch(VOCAB, [11, 7, 1])
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
    steps, _ = stepwise_logits(model, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(steps[real], full[real], atol=1e-10, rtol=1e-10)


def test_chunked_prefill_on_a_non_empty_cache_equals_one_prefill():
    """Prefill in pieces of 1, 3 and 7 columns (each piece ends inside a chunk) = one prefill (1e-5), with
    the cache's seen counts and slots right; generate(prefill_chunk_size=2) = generate()."""
    model = tiny(retrieval_own_chunk=True)
    ids, mask = left_padded_batch(VOCAB, [11, 5, 1])
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
    parts, cache = stepwise_logits(model, ids, mask, pieces=[(0, 1), (1, 4), (4, 11)])
    real = mask.bool()
    torch.testing.assert_close(parts[real], full[real], atol=1e-5, rtol=1e-5)
    assert cache.seen_tokens.tolist() == [11, 5, 1] and cache.get_seq_length() == 11
    keys, _, summaries = cache.chunk_store(1)
    assert keys.shape[2] == 11 and summaries.shape[2] == 11 // C
    assert (summaries[1, :, 5 // C:] == 0).all() and (summaries[1, :, :5 // C] != 0).any()
    gen = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
               eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    whole, chunked = model.generate(**gen), model.generate(**gen, prefill_chunk_size=2)
    torch.testing.assert_close(torch.stack(chunked.logits), torch.stack(whole.logits), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["default", "own-chunk", "mamba"])
def test_left_padded_rows_equal_unpadded_rows(name):
    """A left-padded row, and a row with pads between its tokens, give the logits of their real tokens alone
    (float64, 1e-10), with the pad embedding made huge so a pad in a chunk or a summary would show. (Not
    pads inside a row for the Mamba mixer: SCOUT's conv reads such a pad as a zero input,
    docs/architectures/scout.md; left pads are exact.)"""
    model = tiny(dtype=torch.float64, **CONFIGS[name])
    with torch.no_grad():
        model.model.embed_tokens.weight[0].mul_(40.0)
    ids, mask = left_padded_batch(VOCAB, [10, 5])
    holes = torch.tensor([[1, 1, 0, 0, 1, 1, 1, 0, 1, 1]])
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=ids[1:, 5:]).logits
        torch.testing.assert_close(padded[1, 5:], alone[0], atol=1e-10, rtol=1e-10)
        if name == "mamba":
            return
        gappy = ids[:1].clone()
        gappy[holes == 0] = 0
        with_holes = model(input_ids=gappy, attention_mask=holes).logits
        compact = model(input_ids=gappy[holes.bool()][None]).logits
    torch.testing.assert_close(with_holes[holes.bool()], compact[0], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", ["default", "own-chunk", "mamba"])
def test_rows_are_independent_in_forward_and_in_decode(name):
    model = tiny(**CONFIGS[name])
    assert_rows_independent(model, lengths=(5, 9))
    ids, mask = left_padded_batch(VOCAB, [5, 8])
    other_ids, other_mask = ids.clone(), mask.clone()
    other_ids[1] = torch.randint(1, VOCAB, (8,), generator=torch.Generator().manual_seed(3))
    other_ids[1, :4], other_mask[1, :4] = 0, 0
    runs = [model.generate(input_ids=i, attention_mask=m, max_new_tokens=2 * C + 1, do_sample=False, pad_token_id=0,
                           eos_token_id=None, output_logits=True, return_dict_in_generate=True)
            for i, m in [(ids, mask), (other_ids, other_mask)]]
    assert isinstance(runs[0].past_key_values, ResonaCache)
    assert torch.equal(torch.stack(runs[0].logits)[:, 0], torch.stack(runs[1].logits)[:, 0])


# --------------------------------------------------------------------------- training


def test_the_score_bias_is_what_trains_the_selection():
    """Top-k has no gradient: without the score bias W_s gets none; with it W_s does, and every retrieval
    weight gets a finite gradient on a right-padded batch."""
    ids = torch.randint(1, VOCAB, (2, 13), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    for score_bias in (True, False):
        model = tiny(retrieval_score_bias=score_bias).train()
        model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        branch = model.model.layers[1].retrieval
        grads = {n: p.grad for n, p in branch.named_parameters()}
        score_grad = grads.pop("score_proj.weight")
        assert (score_grad is not None and score_grad.abs().sum() > 0) if score_bias else score_grad is None
        assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
        assert all(grads[n].abs().sum() > 0 for n in ("q_proj.weight", "k_proj.weight", "v_proj.weight",
                                                      "o_proj.weight", "gate_proj.weight", "gate_scale"))


def test_bfloat16_model_trains_and_decodes():
    """bf16 weights: forward, backward, generate finite; the cache stores the chunk K/V in bf16 and the
    summaries and the GLA state in float32."""
    model = tiny(dtype=torch.bfloat16)
    ids, mask = left_padded_batch(VOCAB, [8, 3])
    out = model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=True)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    keys, values, summaries = out.past_key_values.chunk_store(1)
    assert keys.dtype == values.dtype == torch.bfloat16 and summaries.dtype == torch.float32
    gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    assert gen.shape == (2, ids.size(1) + 4)


# --------------------------------------------------------------------------- save/load, LoRA, skipping


def test_save_load_round_trip(tmp_path):
    loaded = assert_save_load_round_trip(tiny(retrieval_layers="all", retrieval_own_chunk=True), tmp_path / "resona")
    c = loaded.config
    assert (c.retrieval_layers, c.retrieval_chunk_size, c.retrieval_top_k, c.retrieval_own_chunk) == ([0, 1], C, 2, True)
    assert float(loaded.model.layers[0].retrieval.gate_scale[0]) == 1.0


def test_lora_trains_only_the_adapters_in_the_mixer_and_the_retrieval_branch():
    model = tiny()
    assert_lora_trains(model, ["q_proj", "k_proj", "v_proj", "o_proj", "score_proj"])
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "score_proj"]))
    ids = torch.randint(1, VOCAB, (2, 10))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    trained = {n for n, p in peft_model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(".retrieval.q_proj.lora_B" in n for n in trained) and any(".retrieval.score_proj.lora_B" in n for n in trained)


def rebuilt_without(model, skip):
    return rebuilt_without_layers(model, skip, layer_lists=("softmax_layers", "retrieval_layers"))


def test_skipped_layers_equal_a_model_rebuilt_without_them():
    """Layers 1 and 2 of 4 (retrieval in 1 and 3) skipped: forward and cached generation equal a model
    rebuilt without them exactly; the cache has one slot per layer that ran, the kept retrieval layer's
    chunk store in the slot of its new index."""
    model = tiny(num_hidden_layers=4, retrieval_layers=[1, 3])
    ref = rebuilt_without(model, (1, 2))
    ids, mask = left_padded_batch(VOCAB, [7, 3])
    gen = dict(input_ids=ids, attention_mask=mask, max_new_tokens=2 * C, do_sample=False, pad_token_id=0,
               eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad(), skip_layers(model, [1, 2]):
        logits = model(input_ids=ids, attention_mask=mask).logits
        out = model.generate(**gen)
    with torch.no_grad():
        assert torch.equal(logits, ref(input_ids=ids, attention_mask=mask).logits)
        want = ref.generate(**gen)
    assert torch.equal(torch.stack(out.logits), torch.stack(want.logits))
    cache = out.past_key_values
    assert len(cache.layers) == 2 and cache.chunk_store(0)[0] is None and cache.chunk_store(1)[0] is not None
    assert model.model.layers[3].retrieval.layer_idx == 3


# --------------------------------------------------------------------------- rollouts, Nested-ReFT


@pytest.mark.parametrize("name", ["default", "own-chunk"])
def test_hf_engine_compacted_phases_keep_mu_exact(name):
    """Rows that finish leave the batch between phases (the cache's batch_select_indices drops their chunk
    K/V and summaries too); every sampled log-prob equals a teacher-forced forward of the row alone."""
    assert_compacted_sampling_exact(tiny(num_hidden_layers=3, retrieval_layers="all", **CONFIGS[name]))


@pytest.mark.slow
@pytest.mark.parametrize("name, attn", [("default", "sdpa"), ("hybrid", "eager")])
def test_nested_reft_corrects_exactly(name, attn, chat_tokenizer, tmp_path, monkeypatch):
    model = tiny(vocab_size=len(chat_tokenizer), num_hidden_layers=3, initializer_range=0.02,
                 retrieval_layers="all", pad_token_id=chat_tokenizer.pad_token_id,
                 eos_token_id=chat_tokenizer.eos_token_id, bos_token_id=chat_tokenizer.bos_token_id, **CONFIGS[name])
    model.save_pretrained(tmp_path / "model")
    chat_tokenizer.save_pretrained(tmp_path / "model")
    assert_nested_reft_corrects_exactly(str(tmp_path / "model"), chat_tokenizer, tmp_path, monkeypatch,
                                        attn_implementation=attn)


# --------------------------------------------------------------------------- the cache


def test_cache_holds_exactly_the_chunks_and_grows_with_n():
    """After the prompt and after each of 10 decode steps: the recurrent state is constant (ReGLA's S and m);
    each retrieval layer holds K/V for every column (B·H·columns·D each) and a summary per C columns,
    float32; the slots of the completed chunks are the row's keys in order. Memory grows with N."""
    model = tiny(num_hidden_layers=3, retrieval_layers=[0, 2])
    c = model.config
    b, lengths = 3, [2, 7, 5]
    ids, mask = left_padded_batch(VOCAB, lengths)
    h, d = c.num_attention_heads, c.head_dim
    state_bytes = 3 * b * h * (c.feature_dim * c.head_dim + 1) * 4
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = out.past_key_values
        for step in range(11):
            columns = ids.size(1) + step
            sizes = cache.nbytes()
            assert sizes["state"] == state_bytes and sizes["kv"] == 0
            assert sizes["retrieval"] == 2 * (2 * b * h * columns * d + b * h * (columns // C) * d) * 4
            assert cache.seen_tokens.tolist() == [n + step for n in lengths]
            mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype)], 1)
            out = model(input_ids=out.logits[:, -1].argmax(-1, keepdim=True), attention_mask=mask,
                        past_key_values=cache, use_cache=True)
    assert cache.nbytes()["state"] == state_bytes


def test_the_cache_holds_no_view_of_the_prefill():
    assert_cache_owns_its_storage(tiny(retrieval_layers="all"))
    assert_cache_owns_its_storage(tiny(**CONFIGS["mamba"]))


def test_generate_refuses_other_caches_and_bad_masks():
    model = tiny()
    ids, mask = left_padded_batch(VOCAB, [4, 2])
    with pytest.raises(ValueError, match="cache_implementation"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, cache_implementation="static",
                       pad_token_id=0)
    for wrong in (DynamicCache(), ReglaCache()):
        with pytest.raises(TypeError, match="ResonaCache"):
            model(input_ids=ids, attention_mask=mask, past_key_values=wrong)
    with pytest.raises(ValueError, match="columns"):
        model(input_ids=ids, attention_mask=mask[:, 1:])
    with pytest.raises(NotImplementedError, match="rolled back"):
        ResonaCache().crop(1)
