"""benchmarks/skip_kl: the exact per-position KL, checked by number, and a short run's report."""

import json

import pytest
import torch

from benchmarks.skip_kl import main, parse_skip_sets, per_token_kl


def test_parse_skip_sets_and_its_error():
    assert parse_skip_sets("2;3;2,3") == [(2,), (3,), (2, 3)]
    with pytest.raises(ValueError, match="'2,x' is not a comma-separated list"):
        parse_skip_sets("1;2,x")


def test_per_token_kl_is_the_exact_kl_of_the_skipped_model(small_qwen2):
    """Against KL computed from a model with the layer removed by hand; 0 with nothing skipped."""
    prompt, completion = [5, 6, 7], [8, 9, 10, 11]
    total, count = per_token_kl(small_qwen2, [prompt], [completion], (2,))
    assert count == 4
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        log_pi = torch.log_softmax(small_qwen2(ids).logits[0, 2:6].double(), -1)
        layer = small_qwen2.model.layers[2]
        small_qwen2.model.layers = torch.nn.ModuleList([m for i, m in enumerate(small_qwen2.model.layers) if i != 2])
        small_qwen2.config.num_hidden_layers = 5
        log_mu = torch.log_softmax(small_qwen2(ids, use_cache=False).logits[0, 2:6].double(), -1)
    small_qwen2.model.layers.insert(2, layer)
    small_qwen2.config.num_hidden_layers = 6
    expected = float((log_mu.exp() * (log_mu - log_pi)).sum())
    assert expected > 1e-4 and total == pytest.approx(expected, rel=1e-6)
    assert per_token_kl(small_qwen2, [prompt], [completion], ()) == (0.0, 4)


def test_a_short_run_writes_its_table(small_model_dir, tmp_path):
    out = main(["--model", small_model_dir, "--skip_sets", "2;2,3", "--prompts", "3", "--max_new_tokens", "6",
                "--out", str(tmp_path)])
    assert [r["skip"] for r in out["results"]] == [[2], [2, 3]]
    assert all(r["kl_per_token"] > 0 and r["tokens"] > 0 for r in out["results"])
    assert json.loads((tmp_path / "skip_kl.json").read_text())["results"] == out["results"]
    assert "| {2, 3} |" in (tmp_path / "skip_kl.md").read_text()
    with pytest.raises(ValueError, match=r"\[\(6,\)\] name layers outside 0..5"):
        main(["--model", small_model_dir, "--skip_sets", "6", "--out", str(tmp_path)])
