"""What the trainer sends to an engine with its own weights: changed tensors, LoRA merged."""

import copy

import torch
from peft import LoraConfig, get_peft_model

from nested_reft.engines.weights import changed_weights


def test_plain_model_sends_its_trainable_parameters_under_checkpoint_names(small_qwen2):
    small_qwen2.model.layers[0].requires_grad_(False)
    with changed_weights(small_qwen2) as named:
        names = [n for n, _ in named]
        assert all(t.data_ptr() == dict(small_qwen2.named_parameters())[n].data_ptr() for n, t in named)
    assert "model.embed_tokens.weight" in names and "model.layers.1.self_attn.q_proj.weight" in names
    assert not any(n.startswith("model.layers.0.") for n in names)
    assert set(names) <= set(small_qwen2.state_dict())


def test_lora_sends_merged_weights_of_the_adapted_modules_and_their_fused_groups(small_qwen2):
    """q,v-only LoRA (PEFT's default targets): k_proj is sent too, unchanged, because vLLM reloads
    the fused qkv_proj whole; the MLP (no member adapted) is not sent."""
    base = copy.deepcopy(small_qwen2)
    peft = get_peft_model(small_qwen2, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    expected = copy.deepcopy(peft).merge_and_unload().state_dict()
    with changed_weights(peft) as named:
        sent = {n: t.clone() for n, t in named}
    assert set(sent) == {f"model.layers.{i}.self_attn.{m}.{k}" for i in range(6) for m in ("q_proj", "k_proj", "v_proj") for k in ("weight", "bias")}
    for name, tensor in sent.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert (sent[q] - base.state_dict()[q]).abs().max() > 1e-3  # the adapter really changed it
    # unmerged on exit: the PEFT model computes as before (base weight restored)
    torch.testing.assert_close(peft.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, base.state_dict()[q])


def test_a_changed_member_of_a_fused_group_brings_its_whole_group(small_qwen2):
    """Plain model with only q_proj and up_proj trainable: k_proj, v_proj and gate_proj come along
    (vLLM's qkv_proj / gate_up_proj are single parameters); other frozen modules do not."""
    small_qwen2.requires_grad_(False)
    layer = small_qwen2.model.layers[2]
    layer.self_attn.q_proj.requires_grad_(True)
    layer.mlp.up_proj.requires_grad_(True)
    with changed_weights(small_qwen2) as named:
        names = {n for n, _ in named}
    prefix = "model.layers.2."
    assert names == {prefix + f"self_attn.{m}.{k}" for m in ("q_proj", "k_proj", "v_proj") for k in ("weight", "bias")} | {
        prefix + f"mlp.{m}.weight" for m in ("gate_proj", "up_proj")}
