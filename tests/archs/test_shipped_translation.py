"""The shipped embedded Toylang model (untrained weights and the Toylang tokenizer): it is what the
toy recipes load by default, and a rebuild from the recipe reproduces its files."""

import json

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from archs.tiny.translation_build import (
    SHIPPED_TRANSLATION,
    TinyTranslationRecipe,
    build_tiny_translation_model,
)
from r1t1.toy import build_toy_model, toy_prompt_texts


def test_the_toy_recipes_load_the_shipped_folder_like_a_hub_checkpoint(tmp_path):
    info = json.loads((SHIPPED_TRANSLATION / "build_info.json").read_text())
    assert build_toy_model(tmp_path) == SHIPPED_TRANSLATION, (
        "the shipped Toylang model is not the current recipe's build: run `make tiny-models` and commit archs/tiny/models")
    assert not any(tmp_path.iterdir())  # nothing was built
    model = AutoModelForCausalLM.from_pretrained(SHIPPED_TRANSLATION)
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_TRANSLATION)
    assert model.config.num_hidden_layers == TinyTranslationRecipe().num_layers == info["recipe"]["num_layers"]
    assert len(tokenizer) == info["vocab"] and "Toylang" in tokenizer.decode(tokenizer("Toylang")["input_ids"])
    # another seed or other prompts are not the shipped build: they are built into the cache instead
    other = build_tiny_translation_model(tmp_path, seed=1, prompt_texts=toy_prompt_texts())
    assert other != SHIPPED_TRANSLATION and other.parent == tmp_path


def test_a_rebuild_reproduces_the_shipped_files(tmp_path):
    rebuilt = build_tiny_translation_model(tmp_path, prompt_texts=toy_prompt_texts(), rebuild=True)
    assert rebuilt != SHIPPED_TRANSLATION
    assert (rebuilt / "tokenizer.json").read_bytes() == (SHIPPED_TRANSLATION / "tokenizer.json").read_bytes()
    assert (rebuilt / "config.json").read_text() == (SHIPPED_TRANSLATION / "config.json").read_text()
    ours, shipped = load_file(rebuilt / "model.safetensors"), load_file(SHIPPED_TRANSLATION / "model.safetensors")
    assert ours.keys() == shipped.keys()
    for name in ours:
        assert torch.equal(ours[name], shipped[name]), name
