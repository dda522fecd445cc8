"""The shipped embedded math model: the current recipe's build, reproduced by it, and a testbed
on which GRPO can learn (the warm model samples right answers sometimes, not reliably)."""

import hashlib
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from archs.tiny.build import (
    PREFIX_STEPS,
    SHIPPED_MATH,
    SHIPPED_SEED,
    TinyMathRecipe,
    _cache_key,
    build_tiny_math_model,
    prefix_fingerprint,
)
from archs.tiny.math_task import is_quick
from nested_reft.data import load_math_dataset
from nested_reft.evaluation import evaluate_pass_at_k

FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "build_info.json")


def shipped_info() -> dict:
    return json.loads((SHIPPED_MATH / "build_info.json").read_text())


def test_the_shipped_folder_is_the_default_recipes_build_and_loads_like_a_hub_checkpoint():
    for name in FILES:
        assert (SHIPPED_MATH / name).is_file(), name
    info = shipped_info()
    assert info["cache_key"] == _cache_key(TinyMathRecipe(), SHIPPED_SEED), (
        "the recipe changed since the shipped model was built: run `make tiny-models` and commit archs/tiny/models")
    assert build_tiny_math_model() == SHIPPED_MATH  # the default needs no build
    model = AutoModelForCausalLM.from_pretrained(SHIPPED_MATH)
    assert model.config.num_hidden_layers == TinyMathRecipe().num_layers
    assert sum(p.numel() for p in model.parameters()) == info["parameters"]
    AutoTokenizer.from_pretrained(SHIPPED_MATH)


def test_the_recipe_reproduces_the_shipped_build_bit_for_bit_over_its_first_steps():
    """The first PREFIX_STEPS steps of the build, rerun now (pinned threads and kernels, as the build
    runs), give the tokenizer file and the weights' hash the shipped build recorded."""
    fingerprint = prefix_fingerprint()
    info = shipped_info()
    assert info["prefix_steps"] == PREFIX_STEPS
    assert fingerprint["tokenizer_sha256"] == hashlib.sha256((SHIPPED_MATH / "tokenizer.json").read_bytes()).hexdigest()
    assert fingerprint["prefix_sha256"] == info["prefix_sha256"]


@pytest.fixture(scope="module")
def warm_samples():
    """16 samples (T = 1) for each of the first 48 held-out problems, with a fixed seed."""
    model = AutoModelForCausalLM.from_pretrained(SHIPPED_MATH).eval()
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_MATH)
    test = load_math_dataset("synthetic", "test", limit=48, seed=0)
    with torch.random.fork_rng():
        return evaluate_pass_at_k(model, tokenizer, test, k=16, max_new_tokens=96, seed=0)


def test_the_warm_model_samples_right_answers_sometimes_but_not_reliably(warm_samples):
    """What GRPO sharpens: sampled accuracy mid-range (groups of 16 then mostly carry signal), and
    nearly every problem solved by at least one of 16 samples."""
    assert 0.25 <= warm_samples.accuracy <= 0.50
    assert warm_samples.pass_at_k >= 0.85


def test_the_warm_model_answers_both_ways_and_the_careful_way_is_the_better_one(warm_samples):
    from rewards.math import accuracy_reward

    test = load_math_dataset("synthetic", "test", limit=48, seed=0)
    golds = [g for g in test["solution"] for _ in range(16)]
    scores = accuracy_reward(warm_samples.completions, golds)
    quick = [s for s, c in zip(scores, warm_samples.completions) if is_quick(c)]
    careful = [s for s, c in zip(scores, warm_samples.completions) if not is_quick(c)]
    assert 0.3 <= len(quick) / len(scores) <= 0.8  # the warm-up's mix, roughly
    assert sum(careful) / len(careful) > sum(quick) / len(quick) + 0.3
