"""SCOUT (SPEC §4) on tiny instances, both mixers: decode = full forward across every boundary, rows
independent, save/load, LoRA, skipping, Nested-ReFT; oracles with copied weights (SDPA with the
checkpoint mask, Llama attention for S = 1, Mistral's sliding window, transformers' MambaMixer);
exact cache entry counts."""

import pytest
import torch
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
from transformers import DynamicCache, LlamaConfig, MistralConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding
from transformers.models.mamba.modeling_mamba import MambaMixer
from transformers.models.mistral.modeling_mistral import MistralAttention

import archs.scout.modeling_scout as modeling_scout
from archs.scout import ScoutCache, ScoutConfig, ScoutForCausalLM
from archs.scout.modeling_scout import ScoutAttention, ScoutMambaMixer, ScoutSlidingWindowAttention
from archs.skipping import skip_layers

MIXERS = ("swa", "mamba")
S, W = 3, 4  # small segment and window, so short prompts cross S−1, S, S+1 and w−1, w, w+1


def tiny_config(mixer: str, **overrides) -> ScoutConfig:
    # initializer_range 0.2: attention far from uniform, so a wrong key set moves the logits well past 1e-4
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, segment_size=S, sliding_window=W, mixer=mixer, time_step_rank="auto",
                state_size=4, rope_theta=10_000.0, initializer_range=0.2)
    return ScoutConfig(**{**base, **overrides})


def tiny(mixer: str, seed: int = 0, **overrides) -> ScoutForCausalLM:
    torch.manual_seed(seed)
    return ScoutForCausalLM(tiny_config(mixer, **overrides)).eval()


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(1) - 1).clamp(min=0)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("bad, message", [
    (dict(segment_size=0), "segment_size"), (dict(sliding_window=0), "sliding_window"),
    (dict(mixer="rwkv"), "mixer"), (dict(num_attention_heads=5), "num_attention_heads"),
    (dict(num_key_value_heads=3), "num_key_value_heads"), (dict(time_step_rank=0), "time_step_rank"),
    (dict(head_dim=7), "head_dim"),
])
def test_config_rejects_bad_values_with_a_clear_error(bad, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**{"mixer": "swa", **bad})


def test_config_defaults_follow_the_spec():
    c = ScoutConfig()
    assert (c.segment_size, c.sliding_window, c.mixer, c.rope_parameters["rope_theta"]) == (10, 1024, "swa", 1e6)
    m = c.mamba_config()
    assert (m.expand, m.state_size, m.conv_kernel, m.time_step_rank, m.use_bias) == (2, 16, 4, 128, False)


# --------------------------------------------------------------------------- decode = full forward


@pytest.mark.parametrize("mixer", MIXERS)
def test_decode_matches_full_forward_across_segment_and_window_boundaries(mixer):
    """Prompt lengths 1..5 cover 1, 2, 3, S−1, S, S+1, w−1, w, w+1 (left-padded batch of 5); 8 new tokens
    cross several more. Catches: positions from the cache length, a checkpoint used before its own step
    ends or never appended, a window cache trimmed to w−2 or kept at w, a conv state off by one."""
    model = tiny(mixer)
    assert_decode_matches_forward(model, prompt_lengths=[1, 2, 3, 4, 5], new_tokens=8)
    assert_decode_matches_forward(model, prompt_lengths=[1], new_tokens=7)
    assert_decode_matches_forward(model, prompt_lengths=[2], new_tokens=5)
    assert_decode_matches_forward(model, prompt_lengths=[3, 1], new_tokens=5)


@pytest.mark.parametrize("mixer", MIXERS)
def test_causal_under_its_only_attention_interface(mixer):
    """SCOUT builds its own masks for its own kernels, and transformers lends it eager only (no SDPA
    support declared), so every family check here runs under eager. A later token never moves an
    earlier logit (tolerance 0)."""
    model = tiny(mixer)
    assert model.config._attn_implementation == "eager"
    assert_causal(model)


@pytest.mark.parametrize("mixer", MIXERS)
def test_chunked_prefill_on_a_non_empty_cache_equals_one_prefill(mixer):
    """Prefill in chunks of 1, 3 and 5 columns (chunk ends inside and across segments and windows)."""
    model = tiny(mixer)
    ids, mask = left_padded_batch(97, [9, 4, 1])
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
    # generate()'s own chunked prefill takes the same path
    gen = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
               eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    whole, chunked = model.generate(**gen), model.generate(**gen, prefill_chunk_size=2)
    torch.testing.assert_close(torch.stack(chunked.logits), torch.stack(whole.logits), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("segment", [S, 1])
@pytest.mark.parametrize("mixer", MIXERS)
def test_left_pads_are_no_ops(mixer, segment):
    """A row with 4 pads in front gives the logits of the same row alone. Catches pads counted in
    positions, pads that feed the Mamba state or the window, and (S = 1, where a pad's position 0 is
    ≡ S−1) pads that become checkpoints."""
    model = tiny(mixer, segment_size=segment)
    ids, mask = left_padded_batch(97, [7, 3])
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).logits[1, 4:]
        alone = model(input_ids=ids[1:, 4:]).logits[0]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- rows, save/load, LoRA, skipping


@pytest.mark.parametrize("mixer", MIXERS)
def test_rows_are_independent_in_forward_and_in_decode(mixer):
    model = tiny(mixer)
    assert_rows_independent(model, lengths=(5, 9))
    # decode: row 0's step logits do not move when row 1 changes its tokens and its padding (tolerance 0)
    ids, mask = left_padded_batch(97, [5, 7])
    other_ids, other_mask = ids.clone(), mask.clone()
    other_ids[1] = torch.randint(1, 97, (7,), generator=torch.Generator().manual_seed(3))
    other_ids[1, :4], other_mask[1, :4] = 0, 0
    runs = [model.generate(input_ids=i, attention_mask=m, max_new_tokens=6, do_sample=False, pad_token_id=0,
                           eos_token_id=None, output_logits=True, return_dict_in_generate=True)
            for i, m in [(ids, mask), (other_ids, other_mask)]]
    assert isinstance(runs[0].past_key_values, ScoutCache)
    assert torch.equal(torch.stack(runs[0].logits)[:, 0], torch.stack(runs[1].logits)[:, 0])


@pytest.mark.parametrize("mixer", MIXERS)
def test_rollout_engine_phases_continue_exactly_from_a_row_selected_cache(mixer):
    assert_compacted_sampling_exact(tiny(mixer))


@pytest.mark.parametrize("mixer", MIXERS)
def test_save_load_round_trip(mixer, tmp_path):
    loaded = assert_save_load_round_trip(tiny(mixer), tmp_path / "scout")
    assert loaded.config.mixer == mixer and loaded.config.segment_size == S


@pytest.mark.parametrize("mixer", MIXERS)
def test_lora_on_attention_projections_trains_only_the_adapters(mixer):
    assert_lora_trains(tiny(mixer), ["q_proj", "k_proj", "v_proj", "o_proj"])


def rebuilt_without(model, skip):
    """An independent reference: a fresh model with fewer double blocks and the kept weights."""
    return rebuilt_without_layers(model, skip)


@pytest.mark.parametrize("mixer", MIXERS)
def test_skipped_double_blocks_equal_a_model_rebuilt_without_them(mixer):
    """The unit is a whole double block; forward and cached generation match exactly, and the cache has
    one slot per block that ran."""
    model = tiny(mixer, num_hidden_layers=4)
    ref = rebuilt_without(model, (1, 2))
    ids, mask = left_padded_batch(97, [6, 3])
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
    assert len(model.model.layers) == 4 and model.model.layers[3].self_attn.layer_idx == 3


@pytest.mark.slow
@pytest.mark.parametrize("mixer", MIXERS)
def test_nested_reft_corrects_exactly(mixer, chat_tokenizer, tmp_path, monkeypatch):
    model = tiny(mixer, vocab_size=len(chat_tokenizer), num_hidden_layers=3, initializer_range=0.02,
                 pad_token_id=chat_tokenizer.pad_token_id, eos_token_id=chat_tokenizer.eos_token_id,
                 bos_token_id=chat_tokenizer.bos_token_id)
    model.save_pretrained(tmp_path / "model")
    chat_tokenizer.save_pretrained(tmp_path / "model")
    assert_nested_reft_corrects_exactly(str(tmp_path / "model"), chat_tokenizer, tmp_path, monkeypatch)


# --------------------------------------------------------------------------- oracles with copied weights


def rule_checkpoint_mask(positions, valid, segment):
    """SPEC §4 read literally, as loops: i sees itself and real j with pos_j < pos_i, pos_j ≡ S−1 (mod S)."""
    b, t = positions.shape
    mask = torch.zeros(b, 1, t, t, dtype=torch.bool)
    for r in range(b):
        for i in range(t):
            for j in range(t):
                pi, pj = int(positions[r, i]), int(positions[r, j])
                mask[r, 0, i, j] = i == j or (bool(valid[r, i] and valid[r, j]) and pj < pi
                                               and pj % segment == segment - 1)
    return mask


def llama_twin(config: ScoutConfig, module, attn_implementation: str) -> LlamaAttention:
    llama_config = LlamaConfig(hidden_size=config.hidden_size, num_attention_heads=config.num_attention_heads,
                               num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
                               rope_parameters=dict(config.rope_parameters))
    llama_config._attn_implementation = attn_implementation
    twin = LlamaAttention(llama_config, layer_idx=0).double().eval()
    twin.load_state_dict(module.state_dict(), strict=True)
    return twin, llama_config


def attention_inputs(config, lengths, seed=0):
    torch.manual_seed(seed)
    _, mask = left_padded_batch(97, lengths)
    x = torch.randn(len(lengths), mask.size(1), config.hidden_size, dtype=torch.float64)
    positions = positions_of(mask)
    rope = LlamaRotaryEmbedding(LlamaConfig(hidden_size=config.hidden_size,
                                            num_attention_heads=config.num_attention_heads,
                                            head_dim=config.head_dim, rope_parameters=dict(config.rope_parameters)))
    return x, mask, positions, rope(x, positions)


@pytest.mark.parametrize("segment", [2, 3, 4])
def test_scout_attention_equals_sdpa_with_the_checkpoint_mask(segment):
    """transformers' LlamaAttention (SDPA) with copied weights and the boolean mask built from the rule:
    float64, GQA, left padding. Catches pos_j ≤ pos_i (a token seeing itself twice), checkpoints on
    index instead of content position, pads as checkpoints, a wrong scale or RoPE on part of the head."""
    config = tiny_config("swa", segment_size=segment)
    torch.manual_seed(1)
    ours = ScoutAttention(config, layer_idx=0).double().eval()
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.5)
    twin, _ = llama_twin(config, ours, "sdpa")
    x, mask, positions, rope = attention_inputs(config, [11, 7, 2])
    valid = mask.bool()
    allowed = rule_checkpoint_mask(positions, valid, segment)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, rope, positions, valid), twin(x, rope, allowed)[0], atol=1e-12, rtol=1e-12)


def test_segment_size_one_is_plain_causal_attention():
    """S = 1: every earlier token is a checkpoint, so ScoutAttn is Llama's causal attention, here with
    transformers' own causal mask (left padding) and SDPA: equal to float64 rounding. (Eager attention
    would not do: its softmax is float32 even for float64 inputs.)"""
    config = tiny_config("swa", segment_size=1)
    torch.manual_seed(2)
    ours = ScoutAttention(config, layer_idx=0).double().eval()
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.5)
    twin, llama_config = llama_twin(config, ours, "sdpa")
    x, mask, positions, rope = attention_inputs(config, [9, 5, 1])
    causal = create_causal_mask(config=llama_config, inputs_embeds=x, attention_mask=mask, past_key_values=None,
                                position_ids=positions)
    with torch.no_grad():
        got, want = ours(x, rope, positions, mask.bool()), twin(x, rope, causal)[0]
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-13, rtol=1e-13)


def test_sliding_window_mixer_equals_mistral_sliding_window_attention():
    """transformers' MistralAttention with copied weights, its own sliding-window mask (`kv_idx > q_idx − w`,
    w keys including the query) and its own sliding-window DynamicCache: prefill of rows longer than w,
    then cached decode for 6 steps, float64. Catches a window of w−1 or w+1 keys and a non-causal prefill."""
    config = tiny_config("swa")
    torch.manual_seed(3)
    ours = ScoutSlidingWindowAttention(config, layer_idx=0).double().eval()
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.5)
    mistral_config = MistralConfig(hidden_size=config.hidden_size, num_attention_heads=config.num_attention_heads,
                                   num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
                                   sliding_window=W, num_hidden_layers=1, rope_parameters=dict(config.rope_parameters))
    mistral_config._attn_implementation = "sdpa"
    twin = MistralAttention(mistral_config, layer_idx=0).double().eval()
    twin.load_state_dict(ours.state_dict(), strict=True)

    steps = 6
    x, full_mask, full_positions, _ = attention_inputs(config, [9 + steps, 6 + steps, 2 + steps])
    rope = LlamaRotaryEmbedding(mistral_config)
    ours_cache, twin_cache = ScoutCache(config), DynamicCache(config=mistral_config)
    prompt = x.size(1) - steps
    got, want = [], []
    with torch.no_grad():
        for lo, hi in [(0, prompt)] + [(t, t + 1) for t in range(prompt, x.size(1))]:
            chunk, positions, mask = x[:, lo:hi], full_positions[:, lo:hi], full_mask[:, :hi]
            cos_sin = rope(chunk, positions)
            valid = mask[:, lo:hi].bool()
            ours_cache.begin(valid)
            got.append(ours(chunk, cos_sin, positions, valid, ours_cache))
            ours_cache.end()
            window = create_sliding_window_causal_mask(config=mistral_config, inputs_embeds=chunk, attention_mask=mask,
                                                       past_key_values=twin_cache, position_ids=positions)
            want.append(twin(chunk, cos_sin, window, past_key_values=twin_cache)[0])
    real = full_mask.bool()
    torch.testing.assert_close(torch.cat(got, 1)[real], torch.cat(want, 1)[real], atol=1e-12, rtol=1e-12)
    assert ours_cache.kv_entries()["window"] == 3 * (W - 1)


@pytest.mark.parametrize("lengths", [[6, 2, 1], [1], [2]])
def test_mamba_mixer_equals_transformers_mamba_mixer(lengths):
    """transformers' MambaMixer, its state_dict loaded 1:1: prefill on a left-padded batch (and 1- and 2-
    token prompts, where the conv state is easy to get wrong), then 5 cached decode steps with its own
    DynamicCache, float64. Catches a conv state of conv_kernel or conv_kernel − 2 columns, pads that feed
    the state, a missing D skip or gate, dt without softplus."""
    config = tiny_config("mamba")
    torch.manual_seed(4)
    theirs = MambaMixer(config.mamba_config(), layer_idx=0).double().eval()
    for name, p in theirs.named_parameters():
        if name != "A_log":
            torch.nn.init.normal_(p, std=0.3)
    ours = ScoutMambaMixer(config, layer_idx=0).double().eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert set(ours.state_dict()) == set(theirs.state_dict())

    steps = 5
    _, prompt_mask = left_padded_batch(97, lengths)
    prompt = prompt_mask.size(1)
    x = torch.randn(len(lengths), prompt + steps, config.hidden_size, dtype=torch.float64)
    ours_cache, their_cache = ScoutCache(config), DynamicCache(config=config.mamba_config())
    with torch.no_grad():
        ours_cache.begin(prompt_mask.bool())
        got = [ours(x[:, :prompt], prompt_mask.bool(), ours_cache)]
        ours_cache.end()
        want = [theirs(x[:, :prompt], cache_params=their_cache, attention_mask=prompt_mask)]
        for t in range(prompt, prompt + steps):
            step_valid = torch.ones(len(lengths), 1, dtype=torch.bool)
            ours_cache.begin(step_valid)
            got.append(ours(x[:, t:t + 1], step_valid, ours_cache))
            ours_cache.end()
            want.append(theirs(x[:, t:t + 1], cache_params=their_cache, attention_mask=None))
    # float64 on both sides, but transformers' scan casts A and B to float32: agreement to ~1e-7 relative (outputs ~50)
    torch.testing.assert_close(torch.cat(got, 1), torch.cat(want, 1), atol=1e-5, rtol=1e-6)


def test_mamba_mixer_keeps_transformers_initialisation():
    """S4D-real A, D = 1 and dt = softplus(bias) in [time_step_min, time_step_max] survive post_init
    (a plain Linear init would zero the dt bias: softplus(0) ≈ 0.69)."""
    mixer = tiny("mamba").model.layers[0].mixer
    n = mixer.ssm_state_size
    torch.testing.assert_close(mixer.A_log, torch.log(torch.arange(1, n + 1.0)).expand_as(mixer.A_log))
    assert torch.equal(mixer.D, torch.ones_like(mixer.D))
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 1e-4 - 1e-9 and dt.max() <= 0.1 + 1e-6


# --------------------------------------------------------------------------- cache sizes and shapes


def expected_entries(mixer, lengths, blocks=2):
    window = sum(min(n, W - 1) for n in lengths) if mixer == "swa" else 0
    return {"window": blocks * window, "checkpoint": blocks * sum(n // S for n in lengths)}


@pytest.mark.parametrize("mixer", MIXERS)
def test_cache_holds_exactly_the_window_and_the_checkpoints(mixer):
    """Rows of 1..10 real tokens (around w and multiples of S), then 4 decode steps: per block the last
    min(n, w−1) window K/V (the query's own K/V is the w-th key) and ⌊n/S⌋ checkpoints, bytes to match."""
    model = tiny(mixer)
    lengths = list(range(1, 11))
    ids, mask = left_padded_batch(97, lengths)
    config = model.config
    entry_bytes = 2 * config.num_key_value_heads * config.head_dim * 4
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = out.past_key_values
        for step in range(1, 5):
            counts = cache.kv_entries()
            want = expected_entries(mixer, [n + step - 1 for n in lengths])
            assert (counts["window"], counts["checkpoint"]) == (want["window"], want["checkpoint"]), step
            assert cache.nbytes()["kv"] == entry_bytes * counts["total"]
            assert cache.seen_tokens.tolist() == [n + step - 1 for n in lengths]
            mask = torch.cat([mask, torch.ones(len(lengths), 1, dtype=mask.dtype)], 1)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            out = model(input_ids=nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
    if mixer == "mamba":
        mixer_module = model.model.layers[0].mixer
        per_row = mixer_module.intermediate_size * ((mixer_module.conv_kernel_size - 1) + mixer_module.ssm_state_size)
        assert cache.nbytes()["recurrent"] == 2 * len(lengths) * per_row * 4


@pytest.mark.parametrize("mixer", MIXERS)
def test_decode_never_builds_an_n_by_n_mask(mixer, monkeypatch):
    """Each decode step scores one query against at most ⌊N/S⌋ + 1 checkpoint slots (ScoutAttn) and w keys
    (window), N the columns seen; an N × N (or 1 × N) decode would show N keys."""
    seen = []

    def record(fn, kind):
        def wrapped(q, k, v, *args):
            seen.append((kind, q.size(2), args[-2].size(-1)))  # (kind, queries, keys scored)
            return fn(q, k, v, *args)
        return wrapped

    monkeypatch.setattr(modeling_scout, "checkpoint_attention", record(modeling_scout.checkpoint_attention, "ck"))
    monkeypatch.setattr(modeling_scout, "masked_attention", record(modeling_scout.masked_attention, "swa"))
    model = tiny(mixer)
    ids, mask = left_padded_batch(97, [12, 5])
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=9, do_sample=False, pad_token_id=0,
                   eos_token_id=None)
    decode = [(kind, keys) for kind, queries, keys in seen if queries == 1]
    assert len(decode) == 8 * 2 * (2 if mixer == "swa" else 1)
    n_max = 12 + 8
    assert all(keys <= n_max // S + 1 for kind, keys in decode if kind == "ck")
    assert all(keys <= W for kind, keys in decode if kind == "swa")


def test_generate_refuses_other_caches_and_bad_masks():
    model = tiny("swa")
    ids, mask = left_padded_batch(97, [4, 2])
    with pytest.raises(ValueError, match="cache_implementation"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, cache_implementation="static",
                       pad_token_id=0)
    with pytest.raises(TypeError, match="ScoutCache"):
        model(input_ids=ids, attention_mask=mask, past_key_values=DynamicCache())
    with pytest.raises(ValueError, match="columns"):
        model(input_ids=ids, attention_mask=mask[:, 1:])
    with pytest.raises(ValueError, match="2-D"):
        model(input_ids=ids, attention_mask=mask[:, None, None, :].bool())
    with pytest.raises(NotImplementedError, match="rolled back"):
        ScoutCache(model.config).crop(1)


@pytest.mark.parametrize("mixer", MIXERS)
def test_the_cache_holds_no_view_of_the_prefill(mixer):
    """Found at N = 4096: the Mamba conv state was a view of the prefill window (8.6 MiB, not O(1))."""
    assert_cache_owns_its_storage(tiny(mixer))
