"""ECHO shared-KV family (SPEC §7): exactness against transformers' Llama / Qwen2, the hooked-Llama
oracle, parameter / FLOP / cache savings, the skipping rule, the gradual schedule, adapters, and the
shared family checks."""

import copy
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
)
from safetensors import safe_open
from torch.utils.flop_counter import FlopCounterMode
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from archs.echo import EchoCache, EchoConfig, EchoForCausalLM, convert_to_echo, upper_half_pairs
from archs.echo.convert import KVSharingSchedule
from archs.skipping import skip_layers, skippable_layers

VOCAB = 97
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)


def tiny_llama(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**SHAPE, **overrides})).eval()


def tiny_qwen2(**overrides) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**{**SHAPE, **overrides})).eval()


def content_positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def randomize_adapters(model, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".kv_adapter." in name:
                p.copy_(p + 0.3 * torch.randn(p.shape, generator=g))


# --------------------------------------------------------------------------- config


def test_upper_half_pairs_definition():
    assert upper_half_pairs(8) == {5: 4, 7: 6}
    assert upper_half_pairs(6) == {4: 3}
    assert upper_half_pairs(7) == {4: 3, 6: 5}
    assert upper_half_pairs(4) == {3: 2}
    assert upper_half_pairs(2) == {}
    assert upper_half_pairs(1) == {}
    assert EchoConfig(num_hidden_layers=8, kv_sharing="upper_half_pairs").kv_sharing == {5: 4, 7: 6}


def test_sharing_map_survives_json_with_int_keys():
    config = EchoConfig(**SHAPE, kv_sharing={5: 1, 3: 1})
    again = EchoConfig.from_dict(config.to_dict())
    assert again.kv_sharing == {3: 1, 5: 1} and all(isinstance(k, int) for k in again.kv_sharing)


@pytest.mark.parametrize("overrides, message", [
    (dict(kv_sharing={3: 3}), "sharer 3 must read an earlier layer, got owner 3"),
    (dict(kv_sharing={2: 4}), "got owner 4 >= 2"),
    (dict(kv_sharing={6: 1}), "sharer layer 6 is out of range for 6 layers"),
    (dict(kv_sharing={3: -1}), "owner layer -1 .* out of range"),
    (dict(kv_sharing={2: 1, 4: 2}), "owner 2 of sharer 4 is itself a sharer .* write 4: 1"),
    (dict(kv_sharing={"x": 1}), "integer layer indices, got 'x'"),
    (dict(kv_sharing={2: 1.5}), "integer layer indices, got 1.5"),
    (dict(kv_sharing="every_other"), "'every_other'"),
    (dict(kv_adapter="mlp"), "kv_adapter must be one of .* got 'mlp'"),
    (dict(kv_adapter="lowrank", kv_adapter_rank=0), "kv_adapter_rank must be a positive integer, got 0"),
    (dict(base_model_type="mistral"), "base_model_type must be one of .* got 'mistral'"),
    (dict(base_model_type="qwen2", attention_bias=True), "attention_bias and mlp_bias must be False"),
])
def test_bad_configs_fail_in_init_naming_the_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        EchoConfig(**{**SHAPE, **overrides})


def test_conversion_refuses_other_families_and_sliding_windows():
    from transformers import MistralConfig, MistralForCausalLM

    with pytest.raises(ValueError, match="model_type='mistral'"):
        convert_to_echo(MistralForCausalLM(MistralConfig(**SHAPE)))
    with pytest.raises(ValueError, match="sliding-window"):
        convert_to_echo(tiny_qwen2(use_sliding_window=True, sliding_window=4, max_window_layers=2))


# --------------------------------------------------------------------------- exactness against transformers


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
@torch.no_grad()
def test_empty_sharing_map_is_the_original_model_exactly(make):
    """Catches any drift from transformers' ops (Qwen2's q/k/v biases dropped, another norm or RoPE,
    positions other than the content positions, a missing copied weight)."""
    base = make()
    echo = convert_to_echo(base, kv_sharing={}).eval()
    assert sorted(echo.state_dict()) == sorted(base.state_dict())
    ids, mask = left_padded_batch(VOCAB, [3, 7, 5])
    pos = content_positions(mask)
    assert torch.equal(echo(ids).logits, base(ids).logits)
    assert torch.equal(echo(input_ids=ids, attention_mask=mask).logits,  # ECHO derives content positions itself
                       base(input_ids=ids, attention_mask=mask, position_ids=pos).logits)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, output_scores=True,
              return_dict_in_generate=True, pad_token_id=0)
    got, want = echo.generate(**kw), base.generate(**kw)
    assert torch.equal(got.sequences, want.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.scores, want.scores))


def feed_owner_kv(llama, kv_sharing: dict[int, int]) -> list:
    """Forward hooks on transformers' Llama: each sharer's k_proj / v_proj output is replaced by its
    owner's. The sharer then rotates the owner's keys with the same cos/sin at the same positions, so it
    attends over exactly the owner's post-RoPE K and its V (RoPE is a fixed function of position)."""
    recorded = {}

    def record(key):
        return lambda module, args, out: recorded.__setitem__(key, out)

    def replay(key):
        return lambda module, args, out: recorded[key]

    handles = []
    for owner in set(kv_sharing.values()):
        for proj in ("k_proj", "v_proj"):
            handles.append(getattr(llama.model.layers[owner].self_attn, proj).register_forward_hook(record((owner, proj))))
    for sharer, owner in kv_sharing.items():
        for proj in ("k_proj", "v_proj"):
            handles.append(getattr(llama.model.layers[sharer].self_attn, proj).register_forward_hook(replay((owner, proj))))
    return handles


@pytest.mark.parametrize("kv_sharing", [{4: 3}, {2: 1, 4: 1, 5: 3}], ids=["default", "one_owner_two_sharers"])
@torch.no_grad()
def test_sharers_equal_hooked_llama_fed_the_owner_kv(kv_sharing):
    """Oracle (copied weights, tolerance 0). Catches a sharer reading pre-RoPE keys or rotating them
    twice, reading the wrong layer, or still using its own K/V."""
    llama = tiny_llama(num_hidden_layers=6)
    if kv_sharing == {4: 3}:
        assert upper_half_pairs(6) == kv_sharing
    echo = convert_to_echo(llama, kv_sharing=kv_sharing).eval()
    ids, mask = left_padded_batch(VOCAB, [4, 9, 6])
    pos = content_positions(mask)
    plain = llama(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    handles = feed_owner_kv(llama, kv_sharing)
    want = llama(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    for h in handles:
        h.remove()
    got = echo(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert torch.equal(got, want)
    assert (got - plain).abs().max() > 1e-3  # sharing really changed the model


# --------------------------------------------------------------------------- savings


@pytest.mark.parametrize("make, bias", [(tiny_llama, False), (tiny_qwen2, True)], ids=["llama", "qwen2"])
def test_parameters_and_flops_fall_by_exactly_the_deleted_projections(make, bias):
    base = make(num_hidden_layers=8)
    echo = convert_to_echo(base)  # default: {5: 4, 7: 6}
    sharers = list(echo.config.kv_sharing)
    assert sharers == [5, 7]
    hidden, kv_width = 32, 2 * 8
    per_projection = hidden * kv_width + (kv_width if bias else 0)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(base) - n(echo) == len(sharers) * 2 * per_projection
    for s in sharers:
        attn = echo.model.layers[s].self_attn
        assert not hasattr(attn, "k_proj") and not hasattr(attn, "v_proj") and attn.kv_source_idx == s - 1
    ids = torch.randint(1, VOCAB, (2, 10))

    def flops(model):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(ids)
        return counter.get_total_flops()

    # each deleted projection was a (20 x 32) @ (32 x 16) matmul: 2 * 20 * 32 * 16 FLOPs
    assert flops(base) - flops(echo) == len(sharers) * 2 * (2 * ids.numel() * hidden * kv_width)


@torch.no_grad()
def test_cache_holds_owners_only_and_counts_content_tokens_per_row():
    """Exact counts from real caches after generate(): entries = L - #sharers and bytes = (L - #sharers)/L of
    transformers' DynamicCache. Catches a sharer that writes (or copies) K/V into the cache."""
    base = tiny_llama(num_hidden_layers=8)
    echo = convert_to_echo(base).eval()
    ids, mask = left_padded_batch(VOCAB, [2, 6])
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
              pad_token_id=0)
    cache = echo.generate(**kw).past_key_values
    ref = base.generate(**kw).past_key_values
    assert isinstance(cache, EchoCache) and isinstance(ref, DynamicCache)
    assert cache.num_entries == 6 and len(ref.layers) == 8 and sorted(cache.slot_of) == [0, 1, 2, 3, 4, 6]
    assert cache.get_seq_length() == ref.get_seq_length() == 6 + 3
    ref_bytes = sum(layer.keys.numel() * 4 + layer.values.numel() * 4 for layer in ref.layers)
    assert cache.kv_bytes() * 8 == ref_bytes * 6
    assert cache.seen_tokens.tolist() == [2 + 3, 6 + 3]  # content tokens, not cached columns (9 each)


@torch.no_grad()
def test_manual_decoding_without_position_ids_takes_positions_from_the_seen_counts():
    """generate() passes position_ids; a caller that does not relies on the cache's per-row counts.
    Catches positions taken from the cache length (which counts the pad columns)."""
    model = convert_to_echo(tiny_llama()).eval()
    ids, mask = left_padded_batch(VOCAB, [4, 6])  # row 0: 2 pads, content starts inside the prefill
    full = model(input_ids=ids, attention_mask=mask).logits
    out = model(input_ids=ids[:, :3], attention_mask=mask[:, :3], use_cache=True)
    steps = [out.logits]
    for t in range(3, ids.size(1)):
        out = model(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=out.past_key_values)
        steps.append(out.logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, dim=1)[real], full[real], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- skipping


def rebuilt_without(model: EchoForCausalLM, skip) -> EchoForCausalLM:
    """An independent reference: an ECHO model built with fewer layers, its sharing map renumbered."""
    kept = [i for i in range(model.config.num_hidden_layers) if i not in skip]
    remap = {old: new for new, old in enumerate(kept)}
    config = model.config.to_dict()
    config["num_hidden_layers"] = len(kept)
    config["kv_sharing"] = {remap[s]: remap[o] for s, o in model.config.kv_sharing.items() if s in remap}
    ref = EchoForCausalLM(EchoConfig.from_dict(config)).eval()
    state = {}
    for key, value in model.state_dict().items():
        m = re.match(r"model\.layers\.(\d+)\.(.*)", key)
        if m is None:
            state[key] = value
        elif int(m[1]) in remap:
            state[f"model.layers.{remap[int(m[1])]}.{m[2]}"] = value
    ref.load_state_dict(state, strict=True)
    return ref


@pytest.fixture
def shared_llama():
    return convert_to_echo(tiny_llama(), kv_sharing={2: 1, 5: 3}).eval()


def test_skippable_layers_exclude_the_owners(shared_llama):
    assert shared_llama.model.skippable_layers() == [0, 2, 4, 5]
    assert skippable_layers(shared_llama) == (0, 2, 4, 5)
    from nested_reft.skipping import LayerSkipPolicy

    policy = LayerSkipPolicy(6, skip_ratio=0.34, keep_first=0, keep_last=0, skippable=skippable_layers(shared_llama))
    assert all(not {1, 3} & set(policy.draw()) for _ in range(50))


@pytest.mark.parametrize("skip", [(2,), (4,), (0, 2), (0, 4, 5)])
@torch.no_grad()
def test_skipping_sharers_and_unshared_layers_equals_the_rebuilt_model(shared_llama, skip):
    """Skipping layer 0 shifts both owners down: catches a kv_source_idx that is not renumbered."""
    ref = rebuilt_without(shared_llama, skip)
    ids, mask = left_padded_batch(VOCAB, [5, 8])
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, output_scores=True,
              return_dict_in_generate=True, pad_token_id=0)
    with skip_layers(shared_llama, skip):
        got = shared_llama(input_ids=ids, attention_mask=mask).logits
        gen = shared_llama.generate(**kw)
        assert gen.past_key_values.num_entries == len(ref.model.layers) - len(ref.config.kv_sharing)
    assert torch.equal(got, ref(input_ids=ids, attention_mask=mask).logits)
    ref_gen = ref.generate(**kw)
    assert torch.equal(gen.sequences, ref_gen.sequences)
    assert all(torch.equal(a, b) for a, b in zip(gen.scores, ref_gen.scores))
    assert [layer.self_attn.kv_source_idx for layer in shared_llama.model.layers] == [None, None, 1, None, None, 3]


@pytest.mark.parametrize("skip", [(1,), (3,), (2, 3)])
def test_skipping_an_owner_is_refused(shared_llama, skip):
    with pytest.raises(ValueError, match="may not be skipped"):
        with skip_layers(shared_llama, skip):
            pass


# --------------------------------------------------------------------------- the gradual schedule


@torch.no_grad()
def test_schedule_before_its_step_is_the_original_and_after_it_the_sharing_model():
    base = tiny_llama()
    schedule = KVSharingSchedule.parse('[[2, {"5": 4}], [4, {"3": 2}]]', num_layers=6)
    assert schedule.kv_sharing == {3: 2, 5: 4}
    model = convert_to_echo(base, kv_sharing={}).eval()
    ids, mask = left_padded_batch(VOCAB, [4, 7])
    pos = content_positions(mask)
    original = base(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    first, both = (convert_to_echo(base, kv_sharing=m).eval()(input_ids=ids, attention_mask=mask).logits
                   for m in ({5: 4}, {3: 2, 5: 4}))
    n_before = sum(p.numel() for p in model.parameters())
    for step in range(6):
        removed, added = schedule.apply(model, step)
        got = model(input_ids=ids, attention_mask=mask).logits
        if step < 2:
            assert torch.equal(got, original) and not removed
        else:
            assert torch.equal(got, first if step < 4 else both)
        if step in (2, 4):  # exactly that sharer's k/v weights (and nothing else) are gone from then on
            assert len(removed) == 2 and not added and all(p.shape == (16, 32) for p in removed)
    assert model.config.kv_sharing == {3: 2, 5: 4}
    assert n_before - sum(p.numel() for p in model.parameters()) == 2 * 2 * 16 * 32
    assert not hasattr(model.model.layers[3].self_attn, "k_proj") and hasattr(model.model.layers[4].self_attn, "k_proj")


@pytest.mark.parametrize("spec, message", [
    ('[[3, {"5": 4}], [1, {"3": 2}]]', "distinct non-negative integers in increasing order"),
    ('[[0, {"5": 4}], [1, {"5": 3}]]', "sharer 5 appears twice"),
    ('[[0, {"5": 4}], [1, {"4": 3}]]', "owner 4 of sharer 5 is itself a sharer"),
    ('[[0, {}]]', "no pairs"),
    ('{"0": {"5": 4}}', "list of \\[step"),
])
def test_bad_schedules_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        KVSharingSchedule.parse(spec, num_layers=6)


def test_gradual_default_schedule_and_share_kv_refusals():
    assert KVSharingSchedule.gradual({5: 4, 7: 6}, over_steps=10).entries == [(0, {7: 6}), (5, {5: 4})]
    model = convert_to_echo(tiny_llama(), kv_sharing={5: 4})
    with pytest.raises(ValueError, match="already share"):
        model.model.share_kv({5: 3})
    with pytest.raises(ValueError, match="owner 5 of sharer 6|out of range"):
        model.model.share_kv({6: 5})
    with skip_layers(model, [0]), pytest.raises(RuntimeError, match="not inside skip_layers"):
        model.model.share_kv({2: 1})


# --------------------------------------------------------------------------- adapters, training


@pytest.mark.parametrize("adapter", ["scale", "lowrank"])
def test_adapters_start_as_the_identity_and_train(adapter):
    base = tiny_llama()
    plain = convert_to_echo(base).eval()
    model = convert_to_echo(base, kv_adapter=adapter, kv_adapter_rank=4).eval()
    ids, mask = left_padded_batch(VOCAB, [5, 8])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, plain(input_ids=ids, attention_mask=mask).logits)
    names = [n for n, _ in model.named_parameters() if ".kv_adapter." in n]
    assert names and all(n.startswith("model.layers.4.") for n in names)
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    grads = dict(model.named_parameters())
    # lowrank: `up` starts at zero so only it gets a gradient; scale: both gains do
    assert any(grads[n].grad is not None and grads[n].grad.abs().sum() > 0 for n in names)
    randomize_adapters(model)
    with torch.no_grad():
        assert (model(input_ids=ids, attention_mask=mask).logits - plain(input_ids=ids, attention_mask=mask).logits).abs().max() > 1e-4


@torch.no_grad()
def test_scale_adapter_keeps_scores_relative_in_position():
    """Shifting every position by 7 leaves the logits unchanged (to float error) with a trained key
    scale, because it is tied per rotary pair. Catches an untied per-channel key scale (changes ~1e-1)."""
    model = convert_to_echo(tiny_llama(), kv_adapter="scale").eval()
    randomize_adapters(model)
    ids = torch.randint(1, VOCAB, (2, 9))
    pos = torch.arange(9)[None].expand(2, -1)
    torch.testing.assert_close(model(ids, position_ids=pos).logits, model(ids, position_ids=pos + 7).logits,
                               atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_keeps_the_sharers_gradient_into_the_owner():
    model = convert_to_echo(tiny_llama()).train()
    ids = torch.randint(1, VOCAB, (2, 8))
    owner_k = model.model.layers[3].self_attn.k_proj.weight

    def grad():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return owner_k.grad.clone()

    plain = grad()
    model.gradient_checkpointing_enable()
    torch.testing.assert_close(grad(), plain, atol=1e-7, rtol=1e-6)
    with pytest.raises(ValueError, match="non-reentrant"):
        model.gradient_checkpointing_enable({"use_reentrant": True})


def test_a_sharer_without_its_owner_fails_loudly():
    model = convert_to_echo(tiny_llama(), kv_sharing={4: 3})
    model.model.layers[4].self_attn.kv_source_idx = 5  # a later layer: not yet run
    with pytest.raises(RuntimeError, match="reads the K/V of layer 5"):
        model(torch.randint(1, VOCAB, (1, 4)))
    with pytest.raises(TypeError, match="EchoCache"):
        model(torch.randint(1, VOCAB, (1, 4)), past_key_values=DynamicCache(), use_cache=True)


# --------------------------------------------------------------------------- the shared family checks


def echo_for_checks(adapter: str = "none", attn: str = "sdpa") -> EchoForCausalLM:
    model = convert_to_echo(tiny_qwen2(num_hidden_layers=6, attn_implementation=attn), kv_sharing={2: 1, 4: 3, 5: 3},
                            kv_adapter=adapter)
    randomize_adapters(model)
    assert model.config._attn_implementation == attn
    return model


@pytest.mark.parametrize("attn", ATTENTION_IMPLEMENTATIONS)
@pytest.mark.parametrize("adapter", ["none", "lowrank"])
def test_family_checks(adapter, attn, tmp_path):
    model = echo_for_checks(adapter, attn)
    assert_causal(model)
    assert_decode_matches_forward(model, prompt_lengths=[1, 2, 3], new_tokens=5)
    assert_decode_matches_forward(model, prompt_lengths=[3, 1], new_tokens=3)
    assert_rows_independent(model)
    loaded = assert_save_load_round_trip(model, tmp_path / "saved")
    with safe_open(str(tmp_path / "saved" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    for s in (2, 4, 5):
        assert not any(k.startswith(f"model.layers.{s}.self_attn.{p}") for k in keys for p in ("k_proj", "v_proj"))
        assert not hasattr(loaded.model.layers[s].self_attn, "k_proj")
    assert "model.layers.3.self_attn.k_proj.bias" in keys and loaded.config.kv_sharing == {2: 1, 4: 3, 5: 3}
    assert_lora_trains(model, ["q_proj", "v_proj"])


def test_eager_equals_sdpa():
    assert_eager_equals_sdpa(lambda attn: echo_for_checks("lowrank", attn))


def test_nested_reft_corrects_exactly(small_qwen2, chat_tokenizer, tmp_path, monkeypatch):
    model = convert_to_echo(copy.deepcopy(small_qwen2))  # 6 layers: {4: 3}
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.config, key, getattr(chat_tokenizer, key))
    model.save_pretrained(tmp_path / "echo")
    chat_tokenizer.save_pretrained(tmp_path / "echo")
    assert_nested_reft_corrects_exactly(str(tmp_path / "echo"), chat_tokenizer, tmp_path, monkeypatch)


@pytest.mark.parametrize("attn", ATTENTION_IMPLEMENTATIONS)
def test_rollout_engine_phases_continue_exactly_from_a_row_selected_cache(attn):
    assert_compacted_sampling_exact(echo_for_checks("none", attn))


def test_the_cache_holds_no_view_of_the_prefill(shared_llama):
    assert_cache_owns_its_storage(shared_llama)
