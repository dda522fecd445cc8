"""The ECHO conversion recipe end to end: a tiny random Qwen2, a 2-entry schedule, the synthetic corpus."""

import json
import math

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from archs.echo import EchoForCausalLM
from recipes.convert_echo import heldout_loss, main, synthetic_examples


def test_recipe_converts_gradually_and_saves_a_loadable_echo_model(small_model_dir, tmp_path):
    out = tmp_path / "echo"
    schedule = '[[0, {"4": 3}], [2, {"2": 1}]]'
    result = main(["--model_name_or_path", small_model_dir, "--schedule", schedule, "--steps", "4",
                   "--batch_size", "4", "--train_problems", "32", "--eval_sequences", "8", "--eval_every", "2",
                   "--warmup_steps", "1", "--output_dir", str(out), "--progress", "false"])
    saved = json.loads((out / "convert_echo.json").read_text())
    assert saved["kv_sharing"] == {"2": 1, "4": 3} == result["kv_sharing"]
    assert len(saved["train_losses"]) == 4 and all(math.isfinite(x) for x in saved["train_losses"])
    assert [e["step"] for e in saved["evals"]] == [2, 4]
    # each schedule step deletes exactly one sharer's k/v projections (hidden 64, kv width 64, with biases)
    per_sharer = 2 * (64 * 64 + 64)
    original = saved["parameters"]["original"]
    assert [e["step"] for e in saved["schedule_events"]] == [0, 2]
    assert [e["parameters"] for e in saved["schedule_events"]] == [original - per_sharer, original - 2 * per_sharer]
    # and the optimizer holds exactly the model's parameters (deleted ones dropped; tied embeddings once)
    assert all(e["optimizer_parameters"] == e["parameters"] for e in saved["schedule_events"])
    assert saved["parameters"]["echo"] == original - 2 * per_sharer
    # a real cache: 6 layers, 2 sharers -> 4 entries and exactly 4/6 of the bytes
    assert [c["tokens"] for c in saved["kv_cache"]] == [1, 16, 128, 512]
    for c in saved["kv_cache"]:
        assert (c["original"]["entries"], c["echo"]["entries"]) == (6, 4)
        assert c["echo"]["bytes"] * 6 == c["original"]["bytes"] * 4 and c["echo"]["bytes"] > 0
    assert (out / "loss_curve.png").stat().st_size > 0

    loaded = AutoModelForCausalLM.from_pretrained(out / "model")
    assert isinstance(loaded, EchoForCausalLM) and loaded.config.kv_sharing == {2: 1, 4: 3}
    with safe_open(str(out / "model" / "model.safetensors"), "pt") as f:
        assert not any(k.startswith(("model.layers.2.self_attn.k_proj", "model.layers.4.self_attn.v_proj"))
                       for k in f.keys())
    held = synthetic_examples(AutoTokenizer.from_pretrained(out / "model"), "test", 8, 1)
    assert heldout_loss(loaded, held) == saved["heldout"]["final"]
    assert torch.is_grad_enabled()
