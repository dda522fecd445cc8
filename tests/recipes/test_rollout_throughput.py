"""recipes.rollout_throughput on random weights of a real shape: only a tokenizer is built (the
embedded tiny model, which trains for minutes on first use, is never needed)."""

import json

from transformers import AutoConfig

import archs.tiny
import archs.tiny.build
from recipes import rollout_throughput


def test_random_init_builds_only_a_tokenizer(tmp_path, monkeypatch):
    def no_tiny_model(*args, **kwargs):
        raise AssertionError("the embedded tiny model was built")

    monkeypatch.setattr(archs.tiny, "build_tiny_math_model", no_tiny_model)
    monkeypatch.setattr(archs.tiny.build, "build_tiny_math_model", no_tiny_model)
    # Qwen2.5-0.5B's shape (architecture, head ratio, tying, rope) at a size a test can hold
    small = dict(rollout_throughput.SHAPES["Qwen2.5-0.5B"], hidden_size=64, intermediate_size=128, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=1024)
    monkeypatch.setitem(rollout_throughput.SHAPES, "Qwen2.5-test", small)
    summary = rollout_throughput.main(["--random_init_config", "Qwen2.5-test-shaped", "--num_layers", "4",
                                       "--engines", "hf", "--skip_ratios", "0,0.25", "--batch_sizes", "2",
                                       "--prompt_len", "4", "--new_tokens", "3", "--repeats", "1", "--warmup", "0",
                                       "--keep_first", "1", "--keep_last", "1", "--output_dir", str(tmp_path)])
    config = AutoConfig.from_pretrained(summary["path"])
    assert (config.num_hidden_layers, config.vocab_size, config.num_key_value_heads) == (4, 1024, 1)
    assert [(r["k"], r["batch_size"]) for r in summary["rows"]] == [(0, 2), (1, 2)]
    assert all(r["tokens_per_s"] > 0 for r in summary["rows"])
    assert json.loads((tmp_path / "throughput.json").read_text())["model"].startswith("Qwen2.5-test-shaped")

