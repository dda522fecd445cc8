"""Tests for nested_reft.data: small files in the real dataset layouts, written to tmp_path."""

from __future__ import annotations

import json
import re
import time

import datasets
import huggingface_hub.constants
import pytest

from archs.tiny.math_task import SYSTEM_PROMPT, generate_problems
from nested_reft import data
from nested_reft.data import load_math_dataset


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Keep the `datasets` cache of every test inside its tmp_path."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def chat(question: str, system: str = SYSTEM_PROMPT) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GSM8K_ROWS = [
    {
        "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
    },
    {
        "question": "A shop sells 1,234 pens. How many pens?",
        "answer": "It says so #### in the text.\n#### 1,234",
    },
]

MATH_ROWS = [
    {
        "problem": "What is $\\frac{2}{4}$ simplified?",
        "level": "Level 1",
        "type": "Prealgebra",
        "solution": "We divide by $2$: $\\boxed{2/4}$ is $\\boxed{\\frac{1}{2}}$.",
    },
    {
        "problem": "Compute $\\sqrt{16}$.",
        "level": "Level 2",
        "type": "Algebra",
        "solution": "Since $4^2 = 16$, the answer is $\\boxed{ 4 }$.",
    },
]

SVAMP_ROWS = [
    {"ID": "chal-1", "Body": "Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each pack ",
     "Question": " How much do you have to pay to buy each pack?", "Equation": "( 76.0 - 25.0 )",
     "Answer": 51.0, "Type": "Subtraction"},
    {"ID": "chal-2", "Body": "Dan has 5 apples.", "Question": "He cuts each in half. How many halves over 2?",
     "Equation": "( 5.0 / 2.0 )", "Answer": 2.5, "Type": "Common-Division"},
]


# --------------------------------------------------------------------------- formats


def test_gsm8k_jsonl_inferred(tmp_path):
    ds = load_math_dataset(str(write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)))
    assert ds.column_names == ["prompt", "solution"]
    assert ds[0]["prompt"] == chat(GSM8K_ROWS[0]["question"])
    assert ds["solution"] == ["72", "1234"]


def test_gsm8k_parquet_folder_layout_picks_split_and_main(tmp_path):
    root = tmp_path / "gsm8k"
    for config in ("main", "socratic"):
        (root / config).mkdir(parents=True)
        for split, rows in (("train", GSM8K_ROWS), ("test", GSM8K_ROWS[1:])):
            tagged = [dict(r, question=f"[{config}] {r['question']}") for r in rows]
            datasets.Dataset.from_list(tagged).to_parquet(str(root / config / f"{split}-00000-of-00001.parquet"))
    test = load_math_dataset(str(root), "test")
    assert test["prompt"] == [chat("[main] A shop sells 1,234 pens. How many pens?")]
    assert test["solution"] == ["1234"]
    train = load_math_dataset(str(root), "train", config="socratic")
    assert len(train) == 2 and train[0]["prompt"][1]["content"].startswith("[socratic] Natalia")
    assert train["solution"] == ["72", "1234"]


def test_math_jsonl_nested_boxed_keeps_level_and_type(tmp_path):
    ds = load_math_dataset(str(write_jsonl(tmp_path / "math" / "test.jsonl", MATH_ROWS)), "test")
    assert ds["solution"] == ["\\frac{1}{2}", "4"]
    assert ds[0]["prompt"] == chat("What is $\\frac{2}{4}$ simplified?")
    assert ds["level"] == ["Level 1", "Level 2"] and ds["type"] == ["Prealgebra", "Algebra"]


def test_last_boxed():
    assert data.last_boxed("\\boxed{a} then \\boxed{\\frac{\\sqrt{3}}{2}} end") == "\\frac{\\sqrt{3}}{2}"
    assert data.last_boxed("no box here") is None
    assert data.last_boxed("\\boxed{unbalanced") is None


def test_svamp_json_list(tmp_path):
    path = tmp_path / "svamp.json"
    path.write_text(json.dumps(SVAMP_ROWS))
    ds = load_math_dataset(str(path))
    assert ds[0]["prompt"] == chat(
        "Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each pack "
        "How much do you have to pay to buy each pack?"
    )
    assert ds[1]["prompt"][1]["content"] == "Dan has 5 apples. He cuts each in half. How many halves over 2?"
    assert ds["solution"] == ["51", "2.5"]


def test_svamp_csv_answers_are_plain_numbers(tmp_path):
    path = tmp_path / "svamp.csv"
    path.write_text("ID,Body,Question,Equation,Answer,Type\nx,Ann has 8 pens.,How many?,( 8.0 ),8.0,Id\n")
    assert load_math_dataset(str(path)).to_list() == [
        {"prompt": chat("Ann has 8 pens. How many?"), "solution": "8"}
    ]


def test_generic_csv_custom_fields(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("id,text,gold\n1,What is 2+2?,4\n2,\"Half of 7, as a decimal?\",3.5\n")
    ds = load_math_dataset(str(path), question_field="text", answer_field="gold", system_prompt="Be brief.")
    assert ds[1]["prompt"] == chat("Half of 7, as a decimal?", "Be brief.")
    assert ds["solution"] == ["4", "3.5"]


def test_generic_jsonl_folder_with_splits(tmp_path):
    write_jsonl(tmp_path / "d" / "train.jsonl", [{"q": "1+1?", "a": 2}, {"q": "2+3?", "a": 5}])
    write_jsonl(tmp_path / "d" / "test.jsonl", [{"q": "9-4?", "a": 5}])
    ds = load_math_dataset(str(tmp_path / "d"), "test", format="generic", question_field="q", answer_field="a")
    assert ds.to_list() == [{"prompt": chat("9-4?"), "solution": "5"}]


def test_question_answer_without_hashes_is_generic(tmp_path):
    ds = load_math_dataset(str(write_jsonl(tmp_path / "x.jsonl", [{"question": "6*7?", "answer": 42}])))
    assert ds.to_list() == [{"prompt": chat("6*7?"), "solution": "42"}]


def test_limit_and_shuffle(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [{"question": f"q{i}", "answer": i} for i in range(20)])
    assert load_math_dataset(str(path), limit=3)["solution"] == ["0", "1", "2"]
    shuffled = load_math_dataset(str(path), limit=5, shuffle=True, seed=1)["solution"]
    assert shuffled == load_math_dataset(str(path), limit=5, shuffle=True, seed=1)["solution"]
    assert shuffled != ["0", "1", "2", "3", "4"] and len(set(shuffled)) == 5


def test_synthetic_splits_disjoint_and_chat_rows():
    train = load_math_dataset("synthetic", "train", limit=300)
    test = load_math_dataset("synthetic", "test")
    assert len(train) == 300 and len(test) == 200
    assert set(train.column_names) == {"prompt", "solution", "level", "key"}
    assert not set(train["key"]) & set(test["key"])
    assert len({p[-1]["content"] for p in test["prompt"]}) == len(test)  # no question repeats
    expected = generate_problems(300, "train", 0)
    assert train["key"] == [p.key for p in expected]
    assert train[0]["prompt"] == chat(expected[0].question)
    assert train[0]["solution"] == expected[0].answer and train[0]["level"] == expected[0].level
    assert {p.key for p in generate_problems(500, "train", 0)}.isdisjoint(test["key"])


def test_synthetic_format_and_seed():
    a = load_math_dataset("ignored", "train", format="synthetic", limit=10, seed=3, system_prompt="S")
    assert a["key"] == [p.key for p in generate_problems(10, "train", 3)]
    assert all(p[0] == {"role": "system", "content": "S"} for p in a["prompt"])


def test_known_hub_ids_use_config_and_format(monkeypatch):
    calls = []

    def fake_load(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list([{"question": "Q?", "answer": "no hashes #### 3"}])

    monkeypatch.setattr(data.datasets, "load_dataset", fake_load)
    assert load_math_dataset("openai/gsm8k", "test")["solution"] == ["3"]
    assert calls == [("openai/gsm8k", "main", "test")]
    with pytest.raises(ValueError, match="'problem'"):  # hendrycks id implies the MATH format
        load_math_dataset("EleutherAI/hendrycks_math", "test", config="algebra")
    assert calls[-1] == ("EleutherAI/hendrycks_math", "algebra", "test")


# --------------------------------------------------------------------------- errors


def test_unknown_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match=r"'nobody-xyz/made-up-math'.*not a local file.*Hub.*: \w+"):
        load_math_dataset("nobody-xyz/made-up-math")
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("name", ["missing.jsonl", "./no_such_dir", "/abs/missing/data.parquet"])
def test_missing_local_path(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(repr(name))):
        load_math_dataset(name)


def test_no_file_for_split_lists_folder(tmp_path):
    write_jsonl(tmp_path / "d" / "train.jsonl", GSM8K_ROWS)
    with pytest.raises(FileNotFoundError, match=r"'validation'.*found: train\.jsonl"):
        load_math_dataset(str(tmp_path / "d"), "validation")


def test_missing_config_folder(tmp_path):
    write_jsonl(tmp_path / "d" / "main" / "train.jsonl", GSM8K_ROWS)
    with pytest.raises(FileNotFoundError, match="socratic"):
        load_math_dataset(str(tmp_path / "d"), config="socratic")


def test_ambiguous_split_folders(tmp_path):
    write_jsonl(tmp_path / "d" / "a" / "train.jsonl", GSM8K_ROWS)
    write_jsonl(tmp_path / "d" / "b" / "train.jsonl", GSM8K_ROWS)
    with pytest.raises(ValueError, match=r"several folders.*a, b"):
        load_math_dataset(str(tmp_path / "d"))


def test_unknown_format(tmp_path):
    with pytest.raises(ValueError, match=r"'gsm9k'.*gsm8k, math, svamp, generic, synthetic"):
        load_math_dataset("synthetic", format="gsm9k")


def test_unsupported_file_type(tmp_path):
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"'\.txt'"):
        load_math_dataset(str(tmp_path / "data.txt"))


def test_missing_field_names_field_and_columns(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"q": "1+1?", "a": 2}])
    with pytest.raises(ValueError, match=r"'question'.*\['q', 'a'\]"):
        load_math_dataset(str(path))
    with pytest.raises(ValueError, match=r"'gold'.*\['q', 'a'\]"):
        load_math_dataset(str(path), question_field="q", answer_field="gold")
    gsm = write_jsonl(tmp_path / "gsm.jsonl", GSM8K_ROWS)
    with pytest.raises(ValueError, match=r"'problem'.*\['question', 'answer'\]"):
        load_math_dataset(str(gsm), format="math")


def test_math_row_without_boxed(tmp_path):
    rows = [MATH_ROWS[0], {"problem": "p", "solution": "The answer is 5."}]
    with pytest.raises(ValueError, match=r"MATH row 1.*boxed"):
        load_math_dataset(str(write_jsonl(tmp_path / "m.jsonl", rows)))


def test_gsm8k_row_without_hashes(tmp_path):
    rows = [GSM8K_ROWS[0], {"question": "q", "answer": "just 5"}]
    with pytest.raises(ValueError, match=r"GSM8K row 1.*'just 5'"):
        load_math_dataset(str(write_jsonl(tmp_path / "g.jsonl", rows)), format="gsm8k")


@pytest.mark.parametrize(("name", "content"), [("e.jsonl", ""), ("e.json", "[]"), ("e.csv", "question,answer\n")])
def test_empty_dataset(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=re.escape(name) + ".*empty"):
        load_math_dataset(str(tmp_path / name))


def test_bad_limit_and_synthetic_split():
    with pytest.raises(ValueError, match="limit.*0"):
        load_math_dataset("synthetic", limit=0)
    with pytest.raises(ValueError, match="'validation'"):
        load_math_dataset("synthetic", "validation")


def test_one_file_is_split_so_that_no_held_out_question_is_trained_on(tmp_path):
    from recipes.math_reft import MathReFTArguments, load_train_and_heldout

    rows = [{"question": f"What is {i % 150} + 1?", "answer": f"#### {i % 150 + 1}"} for i in range(400)]  # duplicates
    path = write_jsonl(tmp_path / "gsm8k.jsonl", rows)
    args = MathReFTArguments(dataset_path=str(path), holdout_fraction=0.2, eval_limit=None)
    train, test = load_train_and_heldout(args, seed=0)
    question = lambda r: r["prompt"][-1]["content"]  # noqa: E731
    train_q, test_q = {question(r) for r in train}, {question(r) for r in test}
    assert not train_q & test_q and len(train) + len(test) == 400
    assert 0.1 < len(test_q) / 150 < 0.3
    shuffled = write_jsonl(tmp_path / "shuffled.jsonl", rows[::-1])
    again = load_train_and_heldout(MathReFTArguments(dataset_path=str(shuffled), holdout_fraction=0.2,
                                                     eval_limit=None), seed=5)[1]
    assert {question(r) for r in again} == test_q  # same split whatever the order and the seed
    separate = write_jsonl(tmp_path / "eval.jsonl", rows[:10])
    train2, test2 = load_train_and_heldout(MathReFTArguments(dataset_path=str(path), eval_path=str(separate)), seed=0)
    assert len(train2) == 400 and len(test2) == 10
    with pytest.raises(ValueError, match="holdout_fraction must be in"):
        load_train_and_heldout(MathReFTArguments(dataset_path=str(path), holdout_fraction=1.0), seed=0)


def test_synthetic_levels_select_the_task_mix():
    from collections import Counter

    from nested_reft.data import load_math_dataset

    full = load_math_dataset("synthetic", "test")
    assert load_math_dataset("synthetic", "test", levels=(1, 2, 3, 4, 5))["prompt"] == full["prompt"]  # the default
    easy = load_math_dataset("synthetic", "train", levels=(1, 2), limit=2000)
    counts = Counter(easy["level"])
    assert set(counts) == {1, 2} and 0.42 < counts[1] / counts[2] < 0.58  # the task's 0.2 : 0.4
    hard = Counter(load_math_dataset("synthetic", "train", levels=(4, 5), limit=2000)["level"])
    assert set(hard) == {4, 5} and 0.85 < hard[4] / hard[5] < 1.15  # weight 0 in the task's mix: drawn evenly
    with pytest.raises(ValueError, match=r"unknown synthetic levels \[7\]"):
        load_math_dataset("synthetic", "train", levels=(1, 7))
