"""Balcony exits (SPEC §3) on this project's own families: SCOUT, DTRNet, ReGLA, Resona, ECHO, Integral.

The oracle for exit k, built here rather than by `archs/balcony`: the base's `hidden_states[k]`
(`output_hidden_states=True`), a fresh decoder layer of the family (constructed for the layer the
exit copies, loaded strictly with the exit layer's weights) called with inputs made here from the
padding mask (content positions, RoPE, an additive causal + padding mask), a fresh RMSNorm with the
exit norm's weight, and the base's head. float32, 1e-5.
"""

import pytest
import torch
from family_checks import assert_decode_matches_forward, left_padded_batch
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from archs.balcony import (
    BalconyConfig,
    add_exits,
    build_exits,
    distillation_loss,
    exit_forward,
    exit_logits,
    use_exit,
)
from archs.dtrnet import DTRNetConfig, DTRNetForCausalLM
from archs.echo import convert_to_echo
from archs.integral import IntegralConfig, IntegralForCausalLM
from archs.regla import ReglaConfig, ReglaForCausalLM
from archs.resona import ResonaConfig, ResonaForCausalLM
from archs.scout import ScoutConfig, ScoutForCausalLM

VOCAB = 97
# initializer_range 0.2: peaked outputs, so a wrong input, mask or weight moves the logits well past 1e-5
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, initializer_range=0.2)
RECURRENT = dict(chunk_size=4, gate_rank=8)
RETRIEVAL = dict(retrieval_chunk_size=3, retrieval_top_k=2, retrieval_gate_init=1.0)  # on the last layer (default)
MAMBA = dict(mixer="mamba", time_step_rank="auto", state_size=4)
# ECHO: layers 4 and 5 read layer 3's K/V, so the last layer that computes its own K/V is 3
ECHO_SHARING = {4: 3, 5: 3}

# name: (build(attn), exit depths, the base layer the exit layer copies, attention interfaces)
CASES = {
    "scout-swa": (lambda attn: ScoutForCausalLM._from_config(
        ScoutConfig(**SHAPE, segment_size=3, sliding_window=4, rope_theta=10_000.0), attn_implementation=attn),
        [1, 2, 3], 3, ["eager"]),  # transformers lends SCOUT eager only
    "scout-mamba": (lambda attn: ScoutForCausalLM._from_config(ScoutConfig(**SHAPE, segment_size=3, **MAMBA),
                                                               attn_implementation=attn), [2, 3], 3, ["eager"]),
    "dtrnet": (lambda attn: routers_decisive(DTRNetForCausalLM._from_config(
        DTRNetConfig(**SHAPE, max_position_embeddings=64), attn_implementation=attn)), [1, 2, 3], 3, ["sdpa", "eager"]),
    "regla-pure": (lambda attn: ReglaForCausalLM._from_config(ReglaConfig(**SHAPE, **RECURRENT),
                                                              attn_implementation=attn), [1, 2, 3], 3, ["sdpa"]),
    "regla-hybrid": (lambda attn: ReglaForCausalLM._from_config(
        ReglaConfig(**SHAPE, **RECURRENT, softmax_layers="half"), attn_implementation=attn),  # softmax layers 1, 3
        [1, 2, 3], 3, ["sdpa", "eager"]),
    "resona": (lambda attn: ResonaForCausalLM._from_config(ResonaConfig(**SHAPE, **RECURRENT, **RETRIEVAL),
                                                           attn_implementation=attn), [1, 2, 3], 3, ["sdpa"]),
    "resona-mamba": (lambda attn: ResonaForCausalLM._from_config(
        ResonaConfig(**SHAPE, **RECURRENT, **RETRIEVAL, **MAMBA), attn_implementation=attn), [2, 3], 3, ["sdpa"]),
    "echo": (lambda attn: convert_to_echo(Qwen2ForCausalLM(Qwen2Config(**{**SHAPE, "num_hidden_layers": 6},
                                                                       attn_implementation=attn)),
                                          kv_sharing=ECHO_SHARING), [2, 3, 4], 3, ["sdpa", "eager"]),
    "integral": (lambda attn: IntegralForCausalLM._from_config(IntegralConfig(**SHAPE, num_signals=4),
                                                               attn_implementation=attn), [1, 2, 3], 3, ["sdpa"]),
}
PARAMS = [pytest.param(name, attn, id=f"{name}-{attn}") for name, case in CASES.items() for attn in case[3]]


def routers_decisive(model):
    """DTRNet routers with large last-layer weights: a mix of routed and bypassed tokens, far from 0.5."""
    for layer in model.model.layers:
        if layer.routed:
            torch.nn.init.normal_(layer.router.weight_predictor[2].weight, std=1.0)
    return model


def tiny(name: str, attn: str, seed: int = 0):
    """The family's tiny model with every norm weight random, so a norm taken from the wrong place shows."""
    torch.manual_seed(seed)
    model = CASES[name][0](attn).eval()
    assert model.config._attn_implementation == attn
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n and p.dim() == 1:
                p.copy_(torch.rand_like(p) + 0.5)
    return model


def perturb(module, scale=0.05, seed=1):
    """As if trained: the exit's weights move away from their initial copies."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def input_norm(layer):
    return layer.mixer_norm if hasattr(layer, "mixer_norm") else layer.input_layernorm


def run_layer(model, layer, hidden, mask):
    """`layer` on `hidden` with its inputs made from the padding mask as each family's forward defines them."""
    valid = mask.bool()
    t = mask.size(1)
    kind = model.config.model_type
    if kind == "integral":  # a Llama forward without position_ids: column positions
        positions = torch.arange(t).expand(mask.size(0), t)
    else:  # content positions (pads' own are never read)
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    rotary = getattr(model.model, "rotary_emb", None)
    rope = rotary(hidden, positions) if rotary is not None else None
    allowed = (torch.tril(torch.ones(t, t, dtype=torch.bool))[None] & valid[:, None, :]) | torch.eye(t, dtype=torch.bool)
    additive = torch.zeros(allowed.shape, dtype=hidden.dtype).masked_fill(~allowed, torch.finfo(hidden.dtype).min)[:, None]
    if kind == "scout":
        return layer(hidden, rope, positions, valid)
    if kind == "dtrnet":
        return layer(hidden, valid, rope)[0]
    if kind in ("regla", "resona"):
        return layer(hidden, valid, position_embeddings=rope, attention_mask=additive)
    return layer(hidden, attention_mask=additive, position_embeddings=rope, position_ids=positions)


@torch.no_grad()
def oracle_exit_logits(model, exits, k, source, ids, mask):
    hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[k]
    base_layer = model.model.layers[source]
    layer = type(base_layer)(model.config, source).eval()  # the layer the exit copies, fresh
    layer.load_state_dict(exits[k].layer.state_dict(), strict=True)
    norm = LlamaRMSNorm(model.config.hidden_size, eps=model.config.rms_norm_eps)
    norm.weight.copy_(exits[k].norm.weight)
    return model.get_output_embeddings()(norm(run_layer(model, layer, hidden, mask)))


@pytest.mark.parametrize("name, attn", PARAMS)
def test_exit_trains_and_equals_the_oracle_on_each_family(name, attn):
    """Exits built on the family: each copies the layer it should (the last; ECHO: the last that computes
    its own K/V) and layer k's input norm; a distillation step runs, reaches every exit parameter and no
    base parameter; then (trained-looking exits) `exit_logits` and `exit_forward` equal the oracle, and
    decoding through an exit with the family's cache equals its full forward. Catches: the exit layer
    called without the family's positional inputs (padding validity, positions, routes), an ECHO exit
    that copies a sharer and reads the K/V of a layer it never runs, SCOUT's exit norm from another norm."""
    _, depths, source, _ = CASES[name]
    model = tiny(name, attn)
    exits = add_exits(model, exits=depths)
    for k in depths:
        copied = model.model.layers[source].state_dict()
        assert all(torch.equal(v, copied[n]) for n, v in exits[k].layer.state_dict().items())
        assert exits[k].layer.state_dict().keys() == copied.keys()
        assert torch.equal(exits[k].norm.weight, input_norm(model.model.layers[k]).weight)

    ids, mask = left_padded_batch(VOCAB, [7, 4, 1])
    real = mask.bool()
    base_before = {n: p.clone() for n, p in model.named_parameters() if not n.startswith("balcony_exits")}
    full, by_exit = exit_logits(model, ids, mask)
    loss, _ = distillation_loss(full, by_exit, mask)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in exits.parameters())
    torch.optim.AdamW(exits.parameters(), lr=1e-3).step()
    assert all(p.grad is None and torch.equal(p, base_before[n]) for n, p in model.named_parameters()
               if n in base_before)

    perturb(exits)
    with torch.no_grad():
        full, by_exit = exit_logits(model, ids, mask)
        for k in depths:
            want = oracle_exit_logits(model, exits, k, source, ids, mask)
            got = exit_forward(model, k, input_ids=ids, attention_mask=mask).logits
            torch.testing.assert_close(by_exit[k][real], want[real], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
            assert not torch.allclose(got[real], full[real], atol=1e-2)  # an exit is not the full model
    with use_exit(model, depths[-1]):
        assert_decode_matches_forward(model, prompt_lengths=[1, 2, 3], new_tokens=4)


@pytest.mark.parametrize("name", ["scout-swa", "dtrnet", "regla-hybrid", "resona"])
@pytest.mark.parametrize("block", ["attention", "mlp"])
def test_block_ablations_are_refused_on_families_whose_layers_take_their_own_arguments(name, block):
    """Their decoder layers call the mixer with positional arguments of their own, so a branch cannot be
    dropped by swapping a module: refused when the exits are built (and from a saved config), naming the
    family; the model is left as it was (no exits, not frozen)."""
    model = tiny(name, CASES[name][3][0])
    family = model.config.model_type
    with pytest.raises(ValueError, match=f"block='{block}' is not supported on a {family} base"):
        add_exits(model, exits=[2], block=block)
    assert not hasattr(model, "balcony_exits") and all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match=f"not supported on a {family} base"):
        BalconyConfig(exits=[2], block=block, base_model_type=family)
    assert build_exits(model, [2]).config.block == "full"
