"""recipes.generate_cot: teacher prompts carry the template's steps; only format-valid, reference-quality
answers are kept; the output is a CoT corpus the SFT recipe reads."""

import json

import pytest

from r1t1.data import load_cot_jsonl
from r1t1.templates import TEMPLATE_NAMES, steps_text
from recipes import generate_cot

DE = ["die Katze schläft", "zwei Hunde rennen schnell", "heute regnet es"]
EN = ["the cat sleeps", "two dogs run fast", "it rains today"]


@pytest.fixture
def parallel(tmp_path):
    path = tmp_path / "train.de-en.tsv"
    path.write_text("".join(f"{s}\t{t}\n" for s, t in zip(DE, EN)))
    return path


def test_keeps_format_valid_reference_quality_answers(tmp_path, parallel, monkeypatch):
    asked = []

    def fake_generate(model, prompts, decoding, max_new_tokens, batch_size, seed, engine):
        asked.extend(prompts)
        outs = []
        for p in prompts:
            src = p[-1]["content"].rsplit("Source sentence: ", 1)[-1]
            ref = EN[DE.index(src)]
            outs.append({0: f"<think>steps for {src}</think><answer>{ref}</answer>",  # perfect: kept
                         1: f"<think>r</think><answer>{ref.split()[0]}</answer>",  # poor answer: dropped
                         2: f"<answer>{ref}</answer>"}[DE.index(src)])  # no reasoning: dropped
        return outs

    monkeypatch.setattr(generate_cot, "generate_hf", fake_generate)
    out = tmp_path / "cot.jsonl"
    summary = generate_cot.main(["--model", "unused", "--parallel_path", str(parallel), "--src_lang", "de",
                                 "--tgt_lang", "en", "--template_mode", "fixed", "--templates", "structural",
                                 "--min_quality", "0.6", "--output", str(out)])
    assert all(steps_text("structural") in p[-1]["content"] for p in asked) and len(asked) == 3
    assert summary["kept"] == 1 and summary["dropped"] == {"invalid_format": 1, "below_min_quality": 1}
    (row,) = load_cot_jsonl(out)  # what translate_sft --cot_path reads
    assert (row["src"], row["tgt"], row["template"], row["cot"]) == (DE[0], EN[0], "structural", f"steps for {DE[0]}")
    saved = json.loads(out.read_text())
    assert saved["quality"] == pytest.approx(1.0) and saved["answer"] == EN[0]
    assert json.loads((tmp_path / "cot.summary.json").read_text())["per_template"] == {"structural": {"asked": 3, "kept": 1}}


def test_every_template_per_pair_and_input_errors(tmp_path, parallel, monkeypatch):
    monkeypatch.setattr(generate_cot, "generate_hf", lambda m, prompts, *a: ["x"] * len(prompts))
    summary = generate_cot.main(["--model", "unused", "--parallel_path", str(parallel), "--src_lang", "de",
                                 "--tgt_lang", "en", "--per_template", "--output", str(tmp_path / "c.jsonl")])
    assert summary["requests"] == 3 * len(TEMPLATE_NAMES) and summary["kept"] == 0
    with pytest.raises(ValueError, match="min_quality"):
        generate_cot.main(["--model", "unused", "--parallel_path", str(parallel), "--min_quality", "60",
                           "--output", str(tmp_path / "c.jsonl")])
    with pytest.raises(ValueError, match="--parallel_path"):
        generate_cot.main(["--model", "unused", "--output", str(tmp_path / "c.jsonl")])


def test_runs_a_real_model_end_to_end(tmp_path, parallel, small_model_dir):
    # a random small model writes no valid CoT: the run completes, keeps nothing and says why
    summary = generate_cot.main(["--model", small_model_dir, "--parallel_path", str(parallel), "--src_lang", "de",
                                 "--tgt_lang", "en", "--max_new_tokens", "8", "--limit", "2",
                                 "--output", str(tmp_path / "c.jsonl")])
    assert summary["requests"] == 2 and summary["kept"] == 0 and summary["dropped"]["invalid_format"] == 2
