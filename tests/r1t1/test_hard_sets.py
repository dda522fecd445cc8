"""The authors' harder test sets: CommonMT's public CSVs and the flat file layout their evaluation
script reads (the files themselves are not released), loaded and evaluated per set."""

import csv

import pytest
from sacrebleu.metrics import CHRF

from r1t1.data import (
    AUTHORS_HARD_SETS,
    COMMONMT_FILES,
    authors_hard_sets,
    load_commonmt,
    load_flat_pair,
)
from recipes import evaluate_translation

ZH = ["他喜欢吃苹果。", "吃掉敌人一个师。", "春意盎然。"]
RIGHT = ["He likes to eat apples.", "Destroy a division of the enemy.", "Spring is full of vitality."]
WRONG = ["He likes to destroy apples.", "Eat a division of the enemy.", "Love is full of vitality."]


def write_commonmt(folder, files=None):
    folder.mkdir(parents=True, exist_ok=True)
    for name in files or COMMONMT_FILES.values():
        with (folder / name).open("w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["chinese_source", "english_target_correct", "english_target_wrong"])
            w.writerows(zip(ZH, RIGHT, WRONG))  # commas inside a field are quoted, as in the released files


def test_commonmt_csv_rows_and_errors(tmp_path):
    write_commonmt(tmp_path)
    rows = load_commonmt(tmp_path / "lexical ambiguity.csv")
    assert [(r["src"], r["tgt"], r["wrong"], r["src_lang"], r["tgt_lang"]) for r in rows] == \
        [(z, r, w, "zh", "en") for z, r, w in zip(ZH, RIGHT, WRONG)]
    assert len(load_commonmt(tmp_path / "lexical ambiguity.csv", limit=2)) == 2
    (tmp_path / "bad.csv").write_text("source,target\na,b\n")
    with pytest.raises(ValueError, match="no column 'chinese_source'"):
        load_commonmt(tmp_path / "bad.csv")
    (tmp_path / "empty_field.csv").write_text("chinese_source,english_target_correct,english_target_wrong\n他,,x\n")
    with pytest.raises(ValueError, match="empty_field.csv:2: empty english_target_correct"):
        load_commonmt(tmp_path / "empty_field.csv")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_commonmt(tmp_path / "none.csv")


def test_authors_flat_layout_pairs_each_source_with_its_reference(tmp_path):
    (tmp_path / "cul_en_es.en").write_text("the cat\nthe dog\n")
    (tmp_path / "cul_en_es.es").write_text("el gato\nel perro\n")
    (tmp_path / "term.en").write_text("the contract\n")
    found = authors_hard_sets(tmp_path)
    assert found == [("term", "term", "en", "de"), ("cul", "cul_en_es", "en", "es"), ("cul", "cul_en_es", "es", "en")]
    assert load_flat_pair(tmp_path, "cul_en_es", "es-en") == [
        {"src": "el gato", "tgt": "the cat", "src_lang": "es", "tgt_lang": "en"},
        {"src": "el perro", "tgt": "the dog", "src_lang": "es", "tgt_lang": "en"}]
    with pytest.raises(FileNotFoundError, match=r"no reference file term.de .*names only source files"):
        load_flat_pair(tmp_path, "term", "en-de")
    (tmp_path / "term.de").write_text("der Vertrag\nzu viel\n")
    with pytest.raises(ValueError, match="unequal line counts"):
        load_flat_pair(tmp_path, "term", "en-de")
    with pytest.raises(FileNotFoundError, match="holds none of the authors' hard test set files"):
        authors_hard_sets(_empty(tmp_path))
    assert len(AUTHORS_HARD_SETS) == 12  # the script's 12 files: 3 CommonMT, terminology, 6 cultural, 2 literature


def _empty(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


def test_evaluate_translation_reports_each_hard_set(tmp_path, monkeypatch):
    write_commonmt(tmp_path / "commonmt", ["lexical ambiguity.csv"])
    hard = tmp_path / "hard"
    hard.mkdir()
    (hard / "literature.en").write_text("the old man and the sea\n")
    (hard / "literature.zh").write_text("老人与海\n")

    def fake_generate(model, prompts, decoding, max_new_tokens, batch_size, seed, engine):
        outs = []
        for p in prompts:
            src = p[1]["content"].rsplit("Source sentence: ", 1)[-1]
            ref = dict(zip(ZH, RIGHT)).get(src) or {"the old man and the sea": "老人与海", "老人与海": "the old man"}[src]
            outs.append(f"<think>t</think><answer>{ref}</answer>")
        return outs

    monkeypatch.setattr(evaluate_translation, "generate_hf", fake_generate)
    results = evaluate_translation.main(["--model", "unused", "--commonmt_dir", str(tmp_path / "commonmt"),
                                         "--hard_dir", str(hard), "--output_dir", str(tmp_path / "out")])
    got = [(r["test_set"], r["direction"], r["n"]) for r in results]
    assert got == [("commonmt_la", "zh-en", 3), ("literature", "en-zh", 1), ("literature", "zh-en", 1)]
    assert results[0]["chrf"] == pytest.approx(100.0) and results[0]["format_rate"] == 1.0
    assert results[2]["chrf"] == pytest.approx(CHRF().corpus_score(["the old man"], [["the old man and the sea"]]).score)
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| zh-en (commonmt_la) | 3 |" in md and "| en-zh (literature) | 1 |" in md
    with pytest.raises(FileNotFoundError, match="holds none of"):
        evaluate_translation.main(["--model", "unused", "--commonmt_dir", str(hard), "--output_dir", str(tmp_path / "o")])
