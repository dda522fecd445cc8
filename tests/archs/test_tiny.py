"""The embedded tiny model: synthetic task, tokenizer, build and cache."""

import json
import os
import platform
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from archs.tiny import (
    TinyMathRecipe,
    build_tiny_math_model,
    generate_problems,
    load_tiny_math_model,
)
from archs.tiny.build import BUILD_THREADS, pinned_environment
from archs.tiny.math_task import (
    LEVEL_WEIGHTS,
    LEVELS,
    MathProblem,
    column_steps,
    drill_text,
    is_quick,
    make_problem,
    worked_add,
    worked_div,
    worked_mul,
    worked_sub,
)
from archs.tiny.tokenizer import render_chat


def test_worked_solutions_spell_out_each_column():
    assert worked_add(47, 38) == "47+38: 7+8=15 c1 so 5; 4+3+1=8 so 85 =85"
    assert worked_add(999, 1) == "999+1: 9+1=10 c1 so 0; 9+0+1=10 c1 so 00; 9+0+1=10 c1 so 000 =1000"
    assert worked_sub(52, 27) == "52-27: 2-7 b1 12-7=5 so 5; 5-1-2=2 so 25 =25"
    assert worked_sub(30, 25) == "30-25: 0-5 b1 10-5=5 so 5; 3-1-2=0 so 05 =5"
    assert worked_mul(3, 47) == "3*47: 3*7=21 c2 so 1; 3*4+2=14 c1 so 41 =141"
    assert worked_div(72, 3) == "72/3: 7/3=2 r1 so 2; 12/3=4 r0 so 24 =24"


@pytest.mark.parametrize("level", LEVELS)
def test_every_problem_states_its_gold_answer_and_its_arithmetic_is_right(level):
    rng = random.Random(level)
    for _ in range(200):
        p = make_problem(level, rng)
        assert p.solution.endswith("\\boxed{" + p.answer + "}")
        # every "x op y=z" written in the worked solution is true
        steps = re.findall(r"(?<![\d+\-*/])(\d+(?:[+\-*/]\d+)+)=(\d+)", p.solution)
        assert steps, p.solution
        for expr, result in steps:
            assert eval(expr.replace("/", "//")) == int(result), (expr, p.solution)
        assert int(p.answer) >= 0


def test_every_problem_has_a_quick_answer_with_the_same_gold():
    rng = random.Random(0)
    for level in LEVELS:
        p = make_problem(level, rng)
        assert p.quick_solution == "<think>quick</think>\\boxed{" + p.answer + "}"
        assert is_quick(p.quick_solution) and not is_quick(p.solution)
    assert not is_quick("<think>quickly: 4+5=9 =9</think>\\boxed{9}")


def test_drills_are_the_column_steps_of_training_problems():
    two_steps = MathProblem("q", "74", f"<think>{worked_add(67, 12)} | {worked_sub(79, 5)}</think>\\boxed{{74}}", 5, "k")
    assert column_steps(two_steps) == ["7+2=9", "6+1=7", "9-5=4", "7-0=7"]
    assert column_steps(MathProblem("q", "24", f"<think>{worked_div(72, 3)}</think>", 3, "k")) == ["7/3=2 r1", "12/3=4 r0"]
    text = drill_text(random.Random(0), 30, levels=(1, 2, 3), level_weights=(0.2, 0.4, 0.4))
    steps = text.split("; ")
    assert len(steps) == 30
    for step in steps:  # every drilled fact is true; no operand header, no final result
        expr, _, result = step.partition("=")
        expr = expr.split(" b1 ")[-1]  # "2-7 b1 12-7" states the borrow, then the fact
        assert ":" not in step and eval(expr.replace("/", "//")) == int(result.split()[0]), step


def test_drill_rows_train_only_on_what_follows_each_equals_sign(chat_tokenizer):
    from archs.tiny.build import _drill_rows

    recipe = TinyMathRecipe(drill_batch=3, drill_steps=6)
    for ids, labels in _drill_rows(chat_tokenizer, recipe, random.Random(1)):
        text = chat_tokenizer.decode(ids)
        trained = "".join(chat_tokenizer.decode([i]) if lab != -100 else "|" for i, lab in zip(ids, labels))
        results = [step.split("=", 1)[1] for step in text.split("; ")]
        assert [r for r in trained.split("|") if r] == results, (text, trained)


def test_warm_up_replies_are_careful_then_mixed_at_the_recipe_fraction():
    from archs.tiny.build import _replies

    recipe = TinyMathRecipe(steps=100, careful_only=0.6, careful_fraction=0.4)
    careful, quick = list(range(1000)), list(range(1000, 2000))
    rng = random.Random(0)
    assert _replies(recipe, rng, 59, list(range(1000)), careful, quick) == careful
    mixed = _replies(recipe, rng, 60, list(range(1000)), careful, quick)
    assert all(m in (i, 1000 + i) for i, m in enumerate(mixed))
    assert 0.35 < sum(m < 1000 for m in mixed) / 1000 < 0.45


def test_train_and_test_sets_are_disjoint_and_deterministic():
    train = generate_problems(3000, "train", seed=0)
    test = generate_problems(300, "test", seed=0, unique=True)
    assert not {p.key for p in train} & {p.key for p in test}
    assert len({p.question for p in test}) == 300
    assert generate_problems(50, "test", seed=0, unique=True) == test[:50]
    assert generate_problems(50, "train", seed=1) != train[:50]
    assert {p.level for p in test} == {lv for lv, w in zip(LEVELS, LEVEL_WEIGHTS) if w > 0} == {1, 2, 3}


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="'dev'"):
        generate_problems(3, "dev")
    with pytest.raises(ValueError, match=r"\[9\]"):
        generate_problems(3, levels=(1, 9))


SMALL = TinyMathRecipe(train_problems=256, steps=3, batch_size=8, vocab_size=400, warmup_steps=1)


@pytest.fixture(scope="module")
def small_build(tmp_path_factory):
    cache = tmp_path_factory.mktemp("tiny")
    return cache, build_tiny_math_model(cache, seed=0, recipe=SMALL, progress=False)


def test_build_saves_a_loadable_qwen2_model_with_a_chat_tokenizer(small_build):
    _, path = small_build
    model, tok = load_tiny_math_model(path)
    assert model.config.model_type == "qwen2" and model.config.num_hidden_layers == SMALL.num_layers == 12
    assert model.config.hidden_size // model.config.num_attention_heads >= 32  # vLLM's minimum
    info = json.loads((path / "build_info.json").read_text())
    assert info["seed"] == 0 and info["recipe"]["steps"] == 3
    # digits are single tokens; the chat template matches the plain renderer
    assert tok.convert_ids_to_tokens(tok("12345", add_special_tokens=False)["input_ids"]) == list("12345")
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered == render_chat(msgs, add_generation_prompt=True) == "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nu<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    ids = tok("<think>x</think>", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "<think>x</think>"
    out = model.generate(**tok(rendered, return_tensors="pt", add_special_tokens=False), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > 0


def test_build_is_cached_and_deterministic(small_build, tmp_path):
    cache, path = small_build
    assert build_tiny_math_model(cache, seed=0, recipe=SMALL, progress=False) == path  # reused
    again = build_tiny_math_model(tmp_path, seed=0, recipe=SMALL, progress=False)
    a, _ = load_tiny_math_model(path)
    b, _ = load_tiny_math_model(again)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    other = build_tiny_math_model(tmp_path, seed=1, recipe=SMALL, progress=False)
    assert other != again


X86_AVX2 = platform.machine().lower() in ("x86_64", "amd64") and torch.cpu._is_avx2_supported()


def test_build_runs_on_pinned_kernels(small_build):
    _, path = small_build
    info = json.loads((path / "build_info.json").read_text())
    assert info["threads"] == BUILD_THREADS and info["version"] >= 3
    if X86_AVX2:  # the child process ran on AVX2 kernels, even on an AVX-512 machine
        assert info["cpu_capability"] == "AVX2" and info["mkl_cbwr"] == "AVX2"


# Builds in a fresh process on a given number of torch threads.
BUILD_ON_THREADS = """
import json, sys, torch
torch.set_num_threads(int(sys.argv[1]))
from archs.tiny.build import TinyMathRecipe, build_tiny_math_model
build_tiny_math_model(sys.argv[2], recipe=TinyMathRecipe(**json.loads(sys.argv[3])), progress=False)
"""


@pytest.mark.slow
def test_build_is_bit_identical_whatever_the_thread_count_and_kernels(tmp_path):
    # Measured without the pins: 3 threads split torch's and MKL's float sums differently from 1,
    # and scalar or AVX-512 kernels round differently from AVX2 ones: other weights after a few steps.
    recipe = {"train_problems": 500, "steps": 8, "batch_size": 8, "vocab_size": 400, "warmup_steps": 2}
    repo = Path(__file__).resolve().parents[2]
    pinned = {**os.environ, **pinned_environment(), "PYTHONPATH": str(repo)}
    runs = {  # the first two build in that process, on its threads; the third in a pinned child
        "1 thread": {**pinned, "RAYON_NUM_THREADS": "1", "threads": "1"},
        "3 threads": {**pinned, "RAYON_NUM_THREADS": "3", "threads": "3"},
    }
    if X86_AVX2:
        runs["scalar kernels"] = {**os.environ, "PYTHONPATH": str(repo), "ATEN_CPU_CAPABILITY": "default",
                                  "MKL_CBWR": "COMPATIBLE", "threads": "2"}
    folders = {}
    for name, env in runs.items():
        out = tmp_path / name.replace(" ", "_")
        subprocess.run([sys.executable, "-c", BUILD_ON_THREADS, env.pop("threads"), str(out),
                        json.dumps(recipe)], env=env, cwd=repo, check=True, timeout=900)  # a hang guard; builds take ~10 s alone, minutes on a loaded machine
        (folders[name],) = out.glob("tiny-math-*")
    first = folders.pop("1 thread")
    for name, folder in folders.items():
        for file in ("tokenizer.json", "model.safetensors"):
            assert (folder / file).read_bytes() == (first / file).read_bytes(), (name, file)
