"""Shared fixtures: a tokenizer trained on the synthetic chat corpus and small random Qwen2 models."""

import copy

import pytest
import torch

from archs.tiny.build import TinyMathRecipe, build_model, build_tokenizer


@pytest.fixture(scope="session")
def chat_tokenizer():
    return build_tokenizer(TinyMathRecipe(vocab_size=400), seed=0)


@pytest.fixture(scope="session")
def _small_qwen2(chat_tokenizer):
    torch.manual_seed(0)
    recipe = TinyMathRecipe(hidden_size=64, num_layers=6, num_heads=2, num_kv_heads=2, intermediate_size=128)
    return build_model(recipe, chat_tokenizer)


@pytest.fixture
def small_qwen2(_small_qwen2):
    """A fresh copy per test: 6 layers, hidden 64, the chat tokenizer's vocabulary."""
    return copy.deepcopy(_small_qwen2)


@pytest.fixture(scope="session")
def small_model_dir(_small_qwen2, chat_tokenizer, tmp_path_factory):
    """The small model and tokenizer saved as a checkpoint folder (what trainers load by path)."""
    path = tmp_path_factory.mktemp("small_qwen2")
    _small_qwen2.save_pretrained(path)
    chat_tokenizer.save_pretrained(path)
    return str(path)
