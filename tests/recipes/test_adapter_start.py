"""GRPO from an SFT cold start saved as a LoRA adapter (adapter_config.json, no config.json): the
recipes say so and how to merge it before any model loads, or merge it with --merge_adapter true
(PEFT's merge_and_unload) into `<adapter>-merged`, reused while the adapter is unchanged."""

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import recipes.translation_common as common
from recipes import math_reft, translate_r1t1

TOY = ["--toy_train_size", "8", "--eval_limit", "2", "--eval_max_new_tokens", "2", "--bf16", "false",
       "--report_to", "none", "--use_cpu", "true"]


class Stop(Exception):
    pass


@pytest.fixture
def adapter(small_model_dir, tmp_path):
    """A LoRA adapter on the small model (non-zero deltas), saved as an SFT run saves it: adapter
    files and the tokenizer. Returns (folder, the merged weights PEFT gives in memory)."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(small_model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    folder = tmp_path / "sft" / "final"
    peft_model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(small_model_dir).save_pretrained(folder)
    assert not (folder / "config.json").exists()
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == small_model_dir
    merged = {k: v.clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    return folder, merged


def test_grpo_from_an_adapter_says_how_to_merge_before_loading(adapter, tmp_path, monkeypatch):
    folder, _ = adapter

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(translate_r1t1, "load_model", no_load)
    with pytest.raises(ValueError, match=r"is a LoRA adapter .* on the base .*--merge_adapter true.*merge_and_unload"):
        translate_r1t1.main(["--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "grpo"), *TOY])
    with pytest.raises(ValueError, match=r"is a LoRA adapter .*--merge_adapter true"):
        math_reft.main(["--config", "recipes/configs/math_reft_tiny.yaml", "--model_name_or_path", str(folder),
                        "--output_dir", str(tmp_path / "math"), "--eval_limit", "2", "--use_cpu", "true"])


def test_merge_adapter_merges_once_and_starts_from_the_merged_model(adapter, tmp_path, monkeypatch):
    folder, expected = adapter
    started = []

    def stop_at_preflight(model_path, *args, **kwargs):
        started.append(model_path)
        raise Stop

    monkeypatch.setattr(translate_r1t1, "preflight", stop_at_preflight)
    argv = ["--model_name_or_path", str(folder), "--merge_adapter", "true", "--output_dir", str(tmp_path / "grpo"), *TOY]
    with pytest.raises(Stop):
        translate_r1t1.main(argv)
    merged_dir = Path(started[0])
    assert merged_dir == folder.parent / "final-merged"
    model = AutoModelForCausalLM.from_pretrained(merged_dir)
    got = model.state_dict()
    assert set(got) == set(expected)
    assert max((got[k] - expected[k]).abs().max().item() for k in expected) < 1e-6
    assert AutoTokenizer.from_pretrained(merged_dir)("die Katze")["input_ids"]  # the tokenizer came along

    def no_merge(*args, **kwargs):
        raise AssertionError("merged again")

    monkeypatch.setattr(common, "merge_adapter", no_merge)
    with pytest.raises(Stop):  # the same adapter: the merged folder is reused
        translate_r1t1.main(argv)
    assert started[1] == started[0]
    (folder / "adapter_config.json").write_text((folder / "adapter_config.json").read_text().replace('"r": 4', '"r": 4 '))
    with pytest.raises(AssertionError, match="merged again"):  # a changed adapter is merged anew
        translate_r1t1.main(argv)
