"""Translation loaders on files written here in the real formats, malformed files included."""

import json

import pytest

from r1t1.data import (
    directions,
    flores_file,
    load_cot_jsonl,
    load_flores,
    load_parallel,
    load_parallel_jsonl,
    load_parallel_tsv,
    parse_direction,
    write_flores,
)
from r1t1.languages import TOY, language

EN = ["The cat sleeps.", "Two dogs run.", "It rains today."]
DE = ["Die Katze schläft.", "Zwei Hunde rennen.", "Heute regnet es."]


def test_language_codes_resolve_every_spelling():
    for name in ("de", "deu", "deu_Latn", "German", "GERMAN", " de "):
        assert language(name).code == "de"
    assert language("zho_simpl").flores200 == "zho_Hans"
    assert language("qtl") is TOY
    with pytest.raises(ValueError, match="unknown language 'klingon'"):
        language("klingon")
    with pytest.raises(ValueError, match="unknown language None"):
        language(None)


@pytest.mark.parametrize("naming", ["flores200", "flores101"])
def test_flores_folders_load_aligned_pairs(tmp_path, naming):
    write_flores(tmp_path, "devtest", {"en": EN, "de": DE}, naming=naming)
    expected = "deu_Latn.devtest" if naming == "flores200" else "deu.devtest"
    assert flores_file(tmp_path, "de").name == expected
    rows = load_flores(tmp_path, "de-en")
    assert [(r["src"], r["tgt"]) for r in rows] == list(zip(DE, EN))
    assert {(r["src_lang"], r["tgt_lang"]) for r in rows} == {("de", "en")}
    assert load_flores(tmp_path, "en→de", limit=2)[1] == {"src": EN[1], "tgt": DE[1], "src_lang": "en", "tgt_lang": "de"}


def test_flores_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_flores(tmp_path / "nope", "de-en")
    write_flores(tmp_path, "devtest", {"en": EN, "de": DE[:2]})
    with pytest.raises(ValueError, match=r"unequal line counts: .*deu_Latn.devtest has 2 lines, .*eng_Latn.devtest has 3"):
        load_flores(tmp_path, "de-en")
    with pytest.raises(FileNotFoundError, match="no Flores file for 'fr'"):
        load_flores(tmp_path, "fr-en")
    with pytest.raises(ValueError, match="unknown language 'xx'"):
        load_flores(tmp_path, "xx-en")
    with pytest.raises(ValueError, match="Flores split"):
        load_flores(tmp_path, "de-en", split="test")
    (tmp_path / "devtest" / "deu_Latn.devtest").write_text("a\n\nc\n")
    with pytest.raises(ValueError, match="line 2 is empty"):
        load_flores(tmp_path, "de-en")
    (tmp_path / "devtest" / "deu_Latn.devtest").write_bytes(b"\xff\xfe\x00bad\n" * 3)
    with pytest.raises(ValueError, match="not UTF-8"):
        load_flores(tmp_path, "de-en")


def test_directions():
    assert parse_direction("deu_Latn-eng_Latn") == ("de", "en")
    assert parse_direction(("French", "en")) == ("fr", "en")
    assert directions(["de", "fr", "en"]) == [("de", "en"), ("fr", "en")]
    assert directions(["de", "fr"], mode="en-xx") == [("en", "de"), ("en", "fr")]
    assert directions(["de", "fr"], mode="both") == [("de", "en"), ("fr", "en"), ("en", "de"), ("en", "fr")]
    assert sorted(directions(["de", "fr", "en"], mode="all")) == sorted(
        [("de", "fr"), ("de", "en"), ("fr", "de"), ("fr", "en"), ("en", "de"), ("en", "fr")])
    with pytest.raises(ValueError, match="into itself"):
        parse_direction("de-deu")
    with pytest.raises(ValueError, match="must look like"):
        parse_direction("deen")
    with pytest.raises(ValueError, match="direction mode"):
        directions(["de"], mode="star")
    with pytest.raises(ValueError, match="no directions"):
        directions(["en"])


def test_parallel_tsv(tmp_path):
    path = tmp_path / "p.tsv"
    path.write_text("src\ttgt\n" + "".join(f"{e}\t{d}\n" for e, d in zip(EN, DE)))
    rows = load_parallel(path, "en", "de")
    assert [r["tgt"] for r in rows] == DE and rows[0]["src_lang"] == "en"
    path.write_text("a\tb\tfr\ten\n")
    assert load_parallel_tsv(path)[0] == {"src": "a", "tgt": "b", "src_lang": "fr", "tgt_lang": "en"}
    path.write_text("a\tb\nonly one column\n")
    with pytest.raises(ValueError, match=r"p.tsv:2: expected 2 tab-separated columns .* got 1"):
        load_parallel_tsv(path, "en", "de")
    path.write_text("a\tb\n")
    with pytest.raises(ValueError, match="no src_lang/tgt_lang"):
        load_parallel_tsv(path)
    path.write_text("a\tb\tzz\ten\n")
    with pytest.raises(ValueError, match=r"p.tsv:1: unknown language 'zz'"):
        load_parallel_tsv(path)


def test_parallel_jsonl(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"src": e, "tgt": d, "src_lang": "en", "tgt_lang": "de"}) + "\n" for e, d in zip(EN, DE)))
    assert [r["src"] for r in load_parallel_jsonl(path)] == EN
    path.write_text('{"src": "a", "tgt": "b"}\n{"src": "a", "tgt": \n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: invalid JSON"):
        load_parallel_jsonl(path, "en", "de")
    path.write_text('{"src": "a", "tgt": ""}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1: field 'tgt' must be a non-empty string, got ''"):
        load_parallel_jsonl(path, "en", "de")
    path.write_text('["a", "b"]\n')
    with pytest.raises(ValueError, match="expected a JSON object, got list"):
        load_parallel_jsonl(path, "en", "de")
    path.write_text("\n\n")
    with pytest.raises(ValueError, match="no sentence pairs"):
        load_parallel_jsonl(path, "en", "de")
    with pytest.raises(ValueError, match="unknown parallel format '.csv'"):
        load_parallel(tmp_path / "x.csv")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_parallel(tmp_path / "missing.jsonl", "en", "de")


def test_cot_jsonl(tmp_path):
    path = tmp_path / "cot.jsonl"
    row = {"src": "the dog", "tgt": "vato", "template": "back_translation", "cot": "words: dog = vato",
           "src_lang": "en", "tgt_lang": "qtl"}
    path.write_text(json.dumps(row) + "\n")
    assert load_cot_jsonl(path) == [row]
    path.write_text(json.dumps({**row, "template": "poetic"}) + "\n")
    with pytest.raises(ValueError, match=r"cot.jsonl:1: unknown template 'poetic'"):
        load_cot_jsonl(path)
    path.write_text(json.dumps({k: v for k, v in row.items() if k != "cot"}) + "\n")
    with pytest.raises(ValueError, match="field 'cot' must be a non-empty string, got None"):
        load_cot_jsonl(path)


# ------------------------------------------------------------------ the paper's languages and the authors' corpus


def test_paper_languages_and_the_authors_tags():
    from r1t1.languages import PAPER_LANGUAGES

    assert len(PAPER_LANGUAGES) == 21 and "tl" in PAPER_LANGUAGES
    assert language("kr").code == "ko" and language("Tagalog").flores101 == "tgl"
    assert language("Malaysian").code == "ms" and language("tgl_Latn").code == "tl"


def test_flat_flores_files_only_for_devtest(tmp_path):
    from r1t1.data import flores_file

    (tmp_path / "flores.kr").write_text("고양이\n", encoding="utf-8")
    assert flores_file(tmp_path, "ko").name == "flores.kr"
    with pytest.raises(FileNotFoundError, match="no Flores file for 'ko' \\(dev\\)"):
        flores_file(tmp_path, "ko", "dev")  # the released flat files are devtest: never read them as dev


def test_paper_direction_grid():
    from r1t1.data import directions, paper_directions

    grid = paper_directions()
    assert len(grid) == len(set(grid)) == 78
    assert grid[:2] == [("ar", "en"), ("ar", "zh")] and grid[-2:] == [("zh", "en"), ("en", "zh")]
    assert all(("en" in d) or ("zh" in d) for d in grid) and ("ar", "de") not in grid
    assert directions(["en", "zh", "de"], mode="paper") == [("de", "en"), ("de", "zh"), ("en", "de"), ("zh", "de"),
                                                           ("zh", "en"), ("en", "zh")]


AUTHORS_ROW = {
    "instruction": "You are a helpful assistant. ... Translate the following sentence from Chinese to French and explain your reasoning:",
    "input": "特别委员会下一届会议将是有益的。",
    "source_lang": "Chinese", "target_lang": "French",
    "target_text": "Il serait utile que le Comité spécial commence.",
    "thought_chains": "1. Begin by analyzing the sentence in the source language to determine if it uses an active or "
                      "passive construction.\n2. If the sentence is in the active voice, decide ...",
    "output": "<think>I begin by analyzing the structure.</think>\n\n<answer>\nIl serait utile que le Comité spécial commence.\n</answer>",
}


def test_authors_cot_corpus_loads_as_released(tmp_path):
    from r1t1.data import load_authors_cot
    from rewards.translation import extract_answer

    path = tmp_path / "CoT_data.json"
    path.write_text(json.dumps([AUTHORS_ROW, {**AUTHORS_ROW, "thought_chains": "1. Do it."}], ensure_ascii=False), encoding="utf-8")
    rows = load_authors_cot(path)
    assert [r["template"] for r in rows] == ["structural", None]
    r = rows[0]
    assert (r["src_lang"], r["tgt_lang"]) == ("zh", "fr") and r["tgt"] == AUTHORS_ROW["target_text"]
    assert r["cot"] == "I begin by analyzing the structure." and r["completion"] == AUTHORS_ROW["output"]
    assert r["prompt_text"].endswith("explain your reasoning:\n" + AUTHORS_ROW["input"])
    assert extract_answer(r["completion"], gate="authors") == AUTHORS_ROW["target_text"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{**AUTHORS_ROW, "target_lang": "Klingon"}]))
    with pytest.raises(ValueError, match="example 0.*'Klingon'"):
        load_authors_cot(bad)
    bad.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(ValueError, match="JSON array"):
        load_authors_cot(bad)
