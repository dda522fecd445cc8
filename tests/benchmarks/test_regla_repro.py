"""The ReGLA reproduction at tiny settings: the files it writes and the numbers they must hold."""

import json

import pytest

from benchmarks import regla_repro


def test_tiny_run_writes_json_markdown_and_plot(tmp_path, capsys):
    out = tmp_path / "repro"
    regla_repro.main(["--steps", "2", "--eval_every", "1", "--batch_size", "4", "--hidden", "32", "--max_tokens", "40",
                      "--lengths", "8", "12", "--prompt_tokens", "4", "--mem_hidden", "32", "--mem_layers", "2",
                      "--mem_heads", "4", "--output_dir", str(out)])
    result = json.loads((out / "regla_repro.json").read_text())
    assert (out / "regla_repro.png").stat().st_size > 0 and "| step |" in (out / "regla_repro.md").read_text()
    for name in ("refining", "plain"):
        curve = result["saturation"][name]["curve"]
        assert [p["step"] for p in curve] == [0, 1, 2]
        assert curve[0]["saturated"] > 0.99  # biases at ±6: every gate starts within 1e-2 of 0 or 1
        assert curve[0]["mean_bias_plus6"] == pytest.approx(6.0) and curve[0]["mean_bias_minus6"] == pytest.approx(-6.0)
        assert all(0 <= p["saturated"] <= 1 and p["loss"] > 0 for p in curve)
    # exact cache sizes: hidden 32, 4 heads of 8, 2 layers, batch 1, float32
    mem = result["memory"]["by_model"]
    state_per_layer = 4 * (8 * 8 + 1) * 4  # S (H·Dk·Dv) and m (H), float32
    kv_per_token_layer = 2 * 4 * 8 * 4
    assert [r["tokens"] for r in mem["regla"]] == [8, 12]
    assert all(r["state_bytes"] == 2 * state_per_layer and r["kv_bytes"] == 0 for r in mem["regla"])
    assert [r["kv_bytes"] for r in mem["llama"]] == [2 * n * kv_per_token_layer for n in (8, 12)]
    assert [r["kv_entries"] for r in mem["llama"]] == [16, 24]
    assert [(r["state_bytes"], r["kv_bytes"]) for r in mem["regla_hybrid"]] == [
        (state_per_layer, n * kv_per_token_layer) for n in (8, 12)]
    assert "Decode cache bytes" in capsys.readouterr().out


def test_bad_settings_name_the_value(tmp_path):
    with pytest.raises(ValueError, match="--steps"):
        regla_repro.main(["--steps", "0", "--output_dir", str(tmp_path)])
