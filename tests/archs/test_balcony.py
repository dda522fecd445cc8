"""Balcony exits (SPEC.md §3) against transformers' own Llama / Qwen2 with copied weights.

The oracle for exit k: transformers' model with `output_hidden_states=True` gives `hidden_states[k]`;
a fresh decoder layer of the base's class loaded with the exit layer's weights runs on it (SDPA with
an explicit causal + padding mask), then a fresh RMSNorm with the exit norm's weight,
then the base's LM head. float64 throughout.
"""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from archs.balcony import (
    EXITS_FILE,
    BalconyConfig,
    add_exits,
    build_exits,
    default_exits,
    distillation_loss,
    exit_forward,
    exit_kl,
    exit_logits,
    load_exits,
    save_exits,
    use_exit,
)
from tests.archs.family_checks import (
    ATTENTION_IMPLEMENTATIONS,
    assert_causal,
    assert_compacted_sampling_exact,
    assert_decode_matches_forward,
    assert_rows_independent,
    left_padded_batch,
)

FAMILIES = ("qwen2", "llama")


def tiny(family: str, layers: int = 4, seed: int = 0, dtype=torch.float32, attn: str = "sdpa"):
    """Qwen2 (tied head, q/k/v biases) or Llama (untied head) with every norm weight and bias random,
    so a norm copied from the wrong place, or a wrong head, changes the numbers."""
    torch.manual_seed(seed)
    shared = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, initializer_range=0.1,
                  attn_implementation=attn)
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **shared))
    else:
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **shared))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.rand_like(p) + 0.5 if "norm" in name else torch.randn_like(p) * 0.1)
    return model.to(dtype).eval()


def perturb(module, scale=0.05, seed=1):
    """As if trained: the exit's weights move away from their initial copies."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def oracle_exit_logits(model, exits, k, ids, mask):
    """Exit k from transformers' own pieces: hidden_states[k] -> fresh layer -> fresh norm -> lm_head."""
    hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[k]
    trained = exits[k]
    layer = type(model.model.layers[-1])(model.config, layer_idx=k).to(hidden.dtype)
    layer.load_state_dict(trained.layer.state_dict())
    norm = LlamaRMSNorm(model.config.hidden_size, eps=model.config.rms_norm_eps).to(hidden.dtype)
    norm.weight.data.copy_(trained.norm.weight)
    t = ids.size(1)
    positions = torch.arange(t).unsqueeze(0).expand(ids.size(0), -1)  # the base's positions without position_ids
    allowed = torch.tril(torch.ones(t, t, dtype=torch.bool))[None] & mask.bool()[:, None, :]
    additive = torch.zeros(allowed.shape, dtype=hidden.dtype).masked_fill(~allowed, torch.finfo(hidden.dtype).min)
    cos_sin = model.model.rotary_emb(hidden, positions)
    out = layer(hidden, attention_mask=additive[:, None], position_embeddings=cos_sin, position_ids=positions)
    return model.get_output_embeddings()(norm(out))


# ------------------------------------------------------------------------------------------ structure


def test_default_exits_scale_the_released_15_18_21_of_32():
    """Catches: Python's half-to-even round (16 layers: 10.5 -> 10), no clamp, floor instead of rounding."""
    assert default_exits(32) == [15, 18, 21]
    assert default_exits(28) == [13, 16, 18]  # 13.1, 15.75, 18.4
    assert default_exits(16) == [8, 9, 11]  # 7.5, 9, 10.5: halves round up
    assert default_exits(8) == [4, 5]  # 3.75, 4.5, 5.25: two of them give 5, one exit
    assert default_exits(4) == [2, 3]  # 1.9, 2.25, 2.6
    assert default_exits(4, keep_first=3) == [3]  # clamped up to keep_first
    assert default_exits(3, keep_first=0) == [1, 2]
    with pytest.raises(ValueError, match="no exit depth"):
        default_exits(2, keep_first=2)


@pytest.mark.parametrize("family", FAMILIES)
def test_exit_is_a_copy_of_the_last_layer_and_norm_of_layer_k(family):
    """Catches: copying the final norm or layers[k-1]'s norm, copying layer k instead of the last,
    sharing tensors with the base, a stale cache slot."""
    model = tiny(family, layers=4)
    exits = add_exits(model, exits=[1, 2, 3])
    last = model.model.layers[-1].state_dict()
    for k in (1, 2, 3):
        got = exits[k].layer.state_dict()
        assert got.keys() == last.keys() and all(torch.equal(got[n], last[n]) for n in last)
        assert all(got[n].data_ptr() != last[n].data_ptr() for n in last)  # copies, not the base's tensors
        assert torch.equal(exits[k].norm.weight, model.model.layers[k].input_layernorm.weight)
        assert not torch.equal(exits[k].norm.weight, model.model.norm.weight)
        assert exits[k].layer.self_attn.layer_idx == k
    assert model.model.layers[-1].self_attn.layer_idx == 3  # the base's own slot untouched
    assert exits.config.exits == [1, 2, 3] and exits.config.base_num_hidden_layers == 4


def test_random_init_and_block_ablations():
    """init='random' re-draws the exit layer (matrices N(0, 0.1²), biases 0, norms 1); block='attention' /
    'mlp' drop the other branch and its norm (no parameters left behind to train)."""
    model = tiny("qwen2", layers=4)
    torch.manual_seed(3)
    exits = build_exits(model, [2], init="random")
    layer = exits[2].layer
    q = layer.self_attn.q_proj
    assert not torch.equal(q.weight, model.model.layers[-1].self_attn.q_proj.weight)
    assert abs(float(q.weight.detach().std()) - 0.1) < 0.02 and torch.all(q.bias == 0)
    assert torch.all(layer.input_layernorm.weight == 1) and torch.all(layer.post_attention_layernorm.weight == 1)
    assert torch.equal(exits[2].norm.weight, model.model.layers[2].input_layernorm.weight)  # the exit norm still copied
    attention_only = build_exits(model, [2], block="attention")[2].layer
    mlp_only = build_exits(model, [2], block="mlp")[2].layer
    assert not any("mlp" in n or "post_attention" in n for n, _ in attention_only.named_parameters())
    assert not any("self_attn" in n or "input_layernorm" in n for n, _ in mlp_only.named_parameters())


@pytest.mark.parametrize("block", ["attention", "mlp"])
def test_ablation_blocks_compute_one_branch(block):
    """Oracle: a full exit layer with the exit's weights whose removed branch has its output projection
    zeroed (MLP: down_proj; attention: o_proj, no bias), so it computes h + attn(ln1 h) or h + mlp(ln2 h)."""
    model = tiny("llama", layers=3, dtype=torch.float64)
    exits = add_exits(model, exits=[2], block=block)
    perturb(exits)
    ids, mask = left_padded_batch(101, [5, 3])
    real = mask.bool()
    _, got = exit_logits(model, ids, mask)
    reference = build_exits(model, [2])
    reference[2].layer.load_state_dict(exits[2].layer.state_dict(), strict=False)  # the kept branch, trained
    reference[2].norm.load_state_dict(exits[2].norm.state_dict())
    both = oracle_exit_logits(model, reference, 2, ids, mask)
    removed = reference[2].layer.mlp.down_proj if block == "attention" else reference[2].layer.self_attn.o_proj
    removed.weight.data.zero_()
    want = oracle_exit_logits(model, reference, 2, ids, mask)
    torch.testing.assert_close(got[2][real], want[real], atol=1e-10, rtol=0)
    assert not torch.allclose(both[real], want[real], atol=1e-4)  # the removed branch mattered


# ------------------------------------------------------------------------------------------ numbers


@pytest.mark.parametrize("attn", ATTENTION_IMPLEMENTATIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_exit_matches_the_transformers_oracle(family, attn):
    """float64 (float32 under eager), left-padded batch, trained-looking exits: `exit_forward` (the model
    run as exit k) and `exit_logits` (all exits from one teacher forward) equal hidden_states[k] through a
    fresh copy.
    Catches: hidden_states[k ± 1] (running one layer too many or too few), the final norm instead of the
    exit norm, the base's last layer instead of the exit's, another head, a wrong mask for the exit."""
    # transformers' eager softmax runs in float32, where a float64 mask's minimum is -inf: a fully masked
    # pad row becomes NaN and poisons the next layer's keys, so eager runs in float32
    dtype, tol = (torch.float64, 1e-10) if attn == "sdpa" else (torch.float32, 1e-5)
    model = tiny(family, layers=5, dtype=dtype, attn=attn)
    exits = add_exits(model, exits=[1, 3, 4])
    perturb(exits)
    ids, mask = left_padded_batch(101, [7, 4, 1])
    real = mask.bool()
    full, by_exit = exit_logits(model, ids, mask)
    torch.testing.assert_close(full, model(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)
    for k in (1, 3, 4):
        want = oracle_exit_logits(model, exits, k, ids, mask)
        got = exit_forward(model, k, input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got[real], want[real], atol=tol, rtol=0)
        torch.testing.assert_close(by_exit[k][real], want[real], atol=tol, rtol=0)
        assert not torch.allclose(got[real], full[real], atol=1e-3)  # an exit is not the full model


@pytest.mark.parametrize("attn", ATTENTION_IMPLEMENTATIONS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("block", ["full", "attention", "mlp"])
def test_exit_decode_with_cache_matches_forward(family, block, attn):
    """`generate()` through exit k with its k + 1-layer cache = one full forward through exit k, for
    prompt lengths 1, 2, 3 left-padded in one batch; rows independent; the engine's phased sampling
    (rows dropped from the cache) stays exact. Catches: an exit layer sharing the slot of a base layer
    (its K/V overwrite it), a cache built for all L layers, positions taken from the cache length."""
    model = tiny(family, layers=4, attn=attn)
    exits = add_exits(model, exits=[1, 2], block=block)
    perturb(exits)
    for k in (1, 2):
        with use_exit(model, k):
            assert_causal(model)
            assert_decode_matches_forward(model, [1, 2, 3], new_tokens=5)
            assert_rows_independent(model)
            assert_compacted_sampling_exact(model)


@pytest.mark.parametrize("block, exit_entries", [("full", 6), ("mlp", 0)])
def test_cache_holds_k_plus_one_layers(block, exit_entries):
    """Exit 2 of 4: the cache has 3 layer slots (0, 1 and the exit's 2), each with one entry per token
    (6 here); an MLP-only exit caches nothing in its slot. Exact counts from the real cache."""
    model = tiny("qwen2", layers=4)
    add_exits(model, exits=[2], block=block)
    ids, mask = left_padded_batch(101, [6, 4])
    with use_exit(model, 2):
        cache = model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
    assert len(cache.layers) == 3
    assert [layer.get_seq_length() for layer in cache.layers] == [6, 6, exit_entries]


def test_use_exit_restores_the_model_also_on_errors():
    model = tiny("qwen2", layers=4)
    add_exits(model, exits=[2])
    ids, mask = left_padded_batch(101, [5, 3])
    before = model(input_ids=ids, attention_mask=mask).logits
    layers, norm = model.model.layers, model.model.norm
    with pytest.raises(RuntimeError, match="inside"):
        with use_exit(model, 2):
            assert len(model.model.layers) == 3 and model.config.num_hidden_layers == 3
            raise RuntimeError("inside")
    assert model.model.layers is layers and model.model.norm is norm and model.config.num_hidden_layers == 4
    assert len(model.config.layer_types) == 4
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)
    with pytest.raises(ValueError, match=r"no Balcony exit 3; this model's exits are \[2\]"):
        with use_exit(model, 3):
            pass


# ------------------------------------------------------------------------------------------ loss


def test_kl_reductions_by_hand():
    """KL(p_full ‖ p_exit) at one hand-computed point. token_mean: masked mean over real tokens;
    batchmean (released): the sum over all B·T tokens, pads included, / B. Catches: the reversed KL,
    dividing by B·T or B·T·V (reduction='mean'), the mask applied to batchmean or ignored by token_mean."""
    full = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]], [[0.0, 1.0, 3.0], [1.0, -2.0, 0.0]]])
    exit_ = torch.tensor([[[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]], [[0.0, 2.0, 1.0], [-1.0, 0.0, 2.0]]])
    mask = torch.tensor([[1, 1], [0, 1]])

    def kl(p_logits, q_logits):  # written out: Σ_v p_v (log p_v − log q_v)
        p = [float(x) for x in torch.softmax(p_logits.double(), -1)]
        q = [float(x) for x in torch.softmax(q_logits.double(), -1)]
        import math

        return sum(pv * (math.log(pv) - math.log(qv)) for pv, qv in zip(p, q))

    per = [[kl(full[b, t], exit_[b, t]) for t in range(2)] for b in range(2)]
    token_mean = (per[0][0] + per[0][1] + per[1][1]) / 3
    batchmean = (per[0][0] + per[0][1] + per[1][0] + per[1][1]) / 2
    assert exit_kl(full, exit_, mask, "token_mean").item() == pytest.approx(token_mean, rel=1e-6)
    assert exit_kl(full, exit_, mask, "batchmean").item() == pytest.approx(batchmean, rel=1e-6)
    assert exit_kl(full, exit_, None, "token_mean").item() == pytest.approx(batchmean / 2, rel=1e-6)
    assert exit_kl(full, full, mask).item() == pytest.approx(0.0, abs=1e-7)
    loss, each = distillation_loss(full, {3: exit_, 5: full}, mask)
    assert loss.item() == pytest.approx(token_mean / 2, rel=1e-6) and each[5] == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="'sum'"):
        exit_kl(full, exit_, mask, "sum")


@pytest.mark.parametrize("family", FAMILIES)
def test_base_is_frozen_and_only_exits_train(family):
    """A distillation step: every exit parameter gets a gradient, no base parameter does (tied and
    untied heads), and an optimizer step moves the exits only. Also with a base that trains (as the
    RL policy does): the shared head is used detached, so the exit loss leaves no gradient on it."""
    model = tiny(family, layers=4)
    exits = add_exits(model, exits=[2, 3])
    base_before = {n: p.clone() for n, p in model.named_parameters() if not n.startswith("balcony_exits")}
    ids, mask = left_padded_batch(101, [6, 4])
    opt = torch.optim.AdamW(exits.parameters(), lr=1e-2)
    full, by_exit = exit_logits(model, ids, mask)
    loss, _ = distillation_loss(full, by_exit, mask)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in exits.parameters())
    assert all(p.grad is None and not p.requires_grad for n, p in model.named_parameters() if n in base_before)
    opt.step()
    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if n in base_before)

    trainable = tiny(family, layers=4)  # a policy: its parameters require grad
    own = build_exits(trainable, [2])
    perturb(own)
    full, by_exit = exit_logits(trainable, ids, mask, own)
    exit_kl(full, by_exit[2], mask).backward()
    assert all(p.grad is None for p in trainable.parameters())
    assert all(p.grad is not None for p in own.parameters())


# ------------------------------------------------------------------------------------------ files


def test_save_and_load_exits_alone(tmp_path):
    """The folder holds the exits' config and weights only (every tensor is an exit tensor, the base's
    embedding is not there); loaded onto a fresh copy of the base, the exits give the same logits
    exactly. A base of another depth, or a folder without exits, is refused with the reason."""
    from safetensors import safe_open

    model = tiny("qwen2", layers=4)
    base = copy.deepcopy(model)
    exits = add_exits(model, exits=[2, 3], init="random", block="attention")
    perturb(exits)
    save_exits(model, tmp_path / "exits")
    assert {p.name for p in (tmp_path / "exits").iterdir()} == {"config.json", EXITS_FILE}
    with safe_open(str(tmp_path / "exits" / EXITS_FILE), "pt") as f:
        keys = set(f.keys())
    assert keys == set(exits.state_dict()) and not any("embed" in k for k in keys)
    assert BalconyConfig.from_pretrained(tmp_path / "exits").to_dict()["block"] == "attention"

    loaded = load_exits(base, tmp_path / "exits")
    assert loaded.depths == [2, 3] and loaded.config.init == "random"
    ids, mask = left_padded_batch(101, [5, 2])
    for k in (2, 3):
        assert torch.equal(exit_forward(base, k, input_ids=ids, attention_mask=mask).logits,
                           exit_forward(model, k, input_ids=ids, attention_mask=mask).logits)
    assert not any(p.requires_grad for n, p in base.named_parameters() if not n.startswith("balcony_exits"))
    with pytest.raises(ValueError, match="4 layers of width 32; this model has 3"):
        load_exits(tiny("qwen2", layers=3), tmp_path / "exits")
    with pytest.raises(FileNotFoundError, match="no Balcony exits"):
        load_exits(tiny("qwen2", layers=4), tmp_path)


@pytest.mark.parametrize("kwargs, message", [
    (dict(exits=[0]), r"integers >= 1"),
    (dict(exits=[3, 2]), r"sorted and distinct"),
    (dict(exits=[4], base_num_hidden_layers=4), r"\[4\] are out of range .*\(1 <= k <= 3\)"),
    (dict(init="zeros"), r"init must be one of .* got 'zeros'"),
    (dict(block="moe"), r"block must be one of .* got 'moe'"),
])
def test_bad_exit_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BalconyConfig(**kwargs)
