"""CoT templates, the selector, prompts, and the Toylang traces that follow them."""

from collections import Counter

import pytest

from archs.tiny.translation_task import TOY_LAYOUTS, generate_pairs, make_pair, toy_cot
from r1t1.templates import (
    SYSTEM_PROMPT,
    TEMPLATE_NAMES,
    TEMPLATES,
    TemplateSelector,
    build_prompt,
    format_completion,
    get_template,
)
from r1t1.toy import toy_rows
from rewards.translation import extract_answer, format_valid, translation_reward


def test_six_templates_in_spec_order_with_steps():
    assert TEMPLATE_NAMES == ("hierarchical", "triangulating", "back_translation", "context_aware",
                              "explanation", "structural")
    # the released step lists: six steps each, back translation seven (its "repeat until aligned")
    assert {n: len(t.steps) for n, t in TEMPLATES.items()} == {
        "hierarchical": 6, "triangulating": 6, "back_translation": 7, "context_aware": 6, "explanation": 6, "structural": 6}
    assert "primary structure" in TEMPLATES["hierarchical"].steps[0]
    assert "intermediate language structure" in TEMPLATES["triangulating"].steps[1]
    assert "repeat until" in TEMPLATES["back_translation"].steps[-1]
    assert "explain the rationale" in TEMPLATES["explanation"].steps[3]
    assert all(t.instruction and t.example for t in TEMPLATES.values())
    with pytest.raises(ValueError, match="unknown template 'haiku'"):
        get_template("haiku")


def test_selector_modes():
    assert TemplateSelector("fixed", template="structural").select("x", "en", "de").name == "structural"
    sel = TemplateSelector("random", seed=3)
    picks = [sel.select(f"sentence {i}", "en", "de").name for i in range(600)]
    assert picks == [sel.select(f"sentence {i}", "en", "de").name for i in range(600)]  # a function of the example
    counts = Counter(picks)
    assert set(counts) == set(TEMPLATE_NAMES) and min(counts.values()) > 60  # roughly uniform (100 expected)
    other_seed = [TemplateSelector("random", seed=4).select(f"sentence {i}", "en", "de").name for i in range(600)]
    assert other_seed != picks
    two = TemplateSelector("random", templates=["explanation", "structural"])
    assert {two.select(f"s{i}", "en", "de").name for i in range(50)} == {"explanation", "structural"}
    rule = TemplateSelector("by_rule", rule=lambda text, s, t: "structural" if len(text.split()) > 3 else "explanation")
    assert rule.select("a b c d e", "en", "de").name == "structural"
    assert rule.select("a b", "en", "de").name == "explanation"


def test_selector_errors():
    with pytest.raises(ValueError, match="mode must be one of"):
        TemplateSelector("smart")
    with pytest.raises(ValueError, match="callable rule"):
        TemplateSelector("by_rule")
    bad = TemplateSelector("by_rule", rule=lambda *a: "sonnet")
    with pytest.raises(ValueError, match="template rule returned 'sonnet'"):
        bad.select("text", "en", "de")
    with pytest.raises(ValueError, match="unknown language 'xx'"):
        TemplateSelector().select("text", "xx", "de")


def test_prompt_asks_for_the_format_in_chat_messages():
    msgs = build_prompt("Die Katze schläft.", "de", "en", "back_translation")
    assert msgs[0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert "<think></think>" in SYSTEM_PROMPT and "<answer></answer>" in SYSTEM_PROMPT
    user = msgs[1]["content"]
    assert user.startswith(TEMPLATES["back_translation"].instruction)
    assert user.endswith("Translate from German to English:\nDie Katze schläft.")
    assert build_prompt("x", "en", "de", system_prompt=None)[0]["role"] == "user"
    with pytest.raises(ValueError, match="non-empty string"):
        build_prompt("  ", "en", "de")


def test_toy_traces_exist_for_every_template_and_complete_to_valid_answers():
    assert set(TOY_LAYOUTS) == set(TEMPLATE_NAMES)
    for pair in generate_pairs(30, seed=2):
        for name in TEMPLATE_NAMES:
            completion = format_completion(toy_cot(pair, name), pair.tgt)
            assert format_valid(completion) and extract_answer(completion) == pair.tgt
            assert translation_reward([completion], [pair.src], [pair.tgt]) == [pytest.approx(1.2)]


def test_toylang_grammar_on_a_known_sentence():
    import random

    rng = random.Random(0)
    pairs = [make_pair(rng) for _ in range(400)]
    # rules checked on generated text: SOV, adjectives after nouns, suffixes
    ex = next(p for p in pairs if p.past and len(p.phrases) == 4 and len(p.phrases[1].gloss) == 2)
    place, subj, obj, verb = ex.phrases
    assert ex.tgt.split()[0] == place.gloss[0][1] and ex.tgt.split()[-1] == verb.gloss[0][1]
    assert verb.gloss[0][1].endswith("ta") and obj.gloss[0][1].endswith("ko")
    assert ex.tgt.split()[1:3] == [subj.gloss[0][1], subj.gloss[1][1]]  # noun, then its adjective
    assert "the" not in ex.tgt.split() and "a" not in ex.tgt.split()


def test_toy_splits_are_disjoint_and_deterministic():
    train = {p.src for p in generate_pairs(3000, "train", seed=0)}
    test = [p.src for p in generate_pairs(200, "test", seed=0, unique=True)]
    assert len(test) == 200 == len(set(test))
    assert not train & set(test)
    assert test == [p.src for p in generate_pairs(200, "test", seed=0, unique=True)]


def test_toy_rows_carry_prompt_reference_and_cot():
    rows = toy_rows("train", 12, selector=TemplateSelector("random"), with_cot=True)
    for r in rows:
        assert r["prompt"][-1]["content"].endswith(r["src"])
        assert r["completion"][0]["content"] == format_completion(r["cot"], r["ref"])
        assert r["cot"] == toy_cot(next(p for p in generate_pairs(12, seed=0) if p.src == r["src"]), r["template"])
    assert len({r["template"] for r in rows}) > 1


# ------------------------------------------------------------------ the authors' prompt and the released step lists

RELEASED_FIRST_STEPS = {  # the first two steps of each pattern, as worded in the released CoT corpus
    "context_aware": "1. Analyze the sentence in light of previous and subsequent sentences to establish a clear "
                     "understanding of the overall context.\n2. Consider any dialogue-specific details",
    "structural": "1. Begin by analyzing the sentence in the source language to determine if it uses an active or "
                  "passive construction.\n2. If the sentence is in the active voice, decide",
    "hierarchical": "1. Start by identifying the sentence's primary structure and translate the simplest elements.\n"
                    "2. Check the translation for basic accuracy (focus on nouns, verbs, and connectors).",
    "back_translation": "1. Start by analyzing the sentence structure and key concepts in the original source "
                        "context.\n2. Translate the source text into the target language, ensuring accuracy and "
                        "clarity.\n3. Conduct a back translation from the target language",
    "triangulating": "1. Translate the basic elements.\n2. Use an intermediate language structure with simple "
                     "syntactic rules.",
    "explanation": "1. Identify the key elements.\n2. Decide between a literal and an idiomatic strategy.",
}


@pytest.mark.parametrize("name", list(RELEASED_FIRST_STEPS))
def test_released_step_lists_are_identified(name):
    from r1t1.templates import identify_template

    assert identify_template(RELEASED_FIRST_STEPS[name]) == name
    assert identify_template("Translate it.") is None


def test_authors_prompt_prefills_think_and_carries_no_template():
    from r1t1.templates import AUTHORS_SYSTEM_PROMPT, PREFILL, build_prompt, prefill_of, steps_text

    msgs = build_prompt("Der Hund schläft.", "de", "en", "structural", system_prompt=None, style="authors",
                        template_in_prompt=False)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
    assert msgs[0]["content"] == AUTHORS_SYSTEM_PROMPT and msgs[2]["content"] == PREFILL == prefill_of(msgs)
    assert msgs[1]["content"] == "Please translate the following German Source sentence into English.\nSource sentence: Der Hund schläft."
    assert "active or a passive" not in msgs[1]["content"]
    with_steps = build_prompt("Der Hund schläft.", "de", "en", "structural", None, style="authors", template_in_prompt=True)
    assert steps_text("structural") in with_steps[1]["content"] and steps_text("structural").count("\n") == 5
    ours = build_prompt("Der Hund schläft.", "de", "en", "structural", style="ours", template_in_prompt=False)
    assert prefill_of(ours) == "" and TEMPLATES["structural"].instruction not in ours[-1]["content"]
    with pytest.raises(ValueError, match="'mine'"):
        build_prompt("x", "de", "en", style="mine")


def test_rendered_prefill_is_continued_not_closed(chat_tokenizer):
    from nested_reft.evaluation import render_chat
    from r1t1.templates import build_prompt

    msgs = build_prompt("Der Hund schläft.", "de", "en", style="authors", template_in_prompt=False)
    text = render_chat(msgs, chat_tokenizer)
    assert text.endswith("<think>"), text[-60:]
    plain = render_chat(msgs[:2], chat_tokenizer)
    assert text.startswith(plain)  # the generation prompt, then the pre-fill


# ------------------------------------------------------------------ the careless teacher's literal examples

def test_literal_translation_keeps_english_order_and_inflections():
    import random

    from archs.tiny.translation_task import literal_translation

    rng = random.Random(0)
    ex = next(p for p in (make_pair(rng) for _ in range(400)) if len(p.phrases) == 4 and all(len(p.phrases[i].gloss) == 2 for i in (1, 2)))
    place, subj, obj, verb = ex.phrases
    # English order S V O P, each adjective before its noun, every word the reference's inflected form
    expected = [subj.gloss[1][1], subj.gloss[0][1], verb.gloss[0][1], obj.gloss[1][1], obj.gloss[0][1], place.gloss[0][1]]
    assert literal_translation(ex).split() == expected
    assert sorted(literal_translation(ex).split()) == sorted(ex.tgt.split()) and literal_translation(ex) != ex.tgt


def test_the_literal_answers_score_57_chrf_on_the_held_out_sentences():
    from sacrebleu.metrics import CHRF

    from archs.tiny.translation_task import literal_translation

    pairs = generate_pairs(200, "test", seed=0, unique=True)
    literal = [literal_translation(p) for p in pairs]
    assert sum(a == p.tgt for a, p in zip(literal, pairs)) == 0  # never the reference (every sentence has S, V, O)
    assert CHRF().corpus_score(literal, [[p.tgt for p in pairs]]).score == pytest.approx(57.16, abs=0.01)


def test_literal_examples_are_a_deterministic_share_of_sentences():
    from archs.tiny.translation_task import is_literal_example

    srcs = [p.src for p in generate_pairs(3000, "train", seed=0)]
    picked = [is_literal_example(s, 0.3) for s in srcs]
    assert 0.27 < sum(picked) / len(srcs) < 0.33
    assert picked == [is_literal_example(s, 0.3) for s in srcs]  # a function of (seed, sentence)
    assert picked != [is_literal_example(s, 0.3, seed=1) for s in srcs]
    assert not any(is_literal_example(s, 0.0) for s in srcs) and all(is_literal_example(s, 1.0) for s in srcs)
    for bad in (1.5, -0.1, "0.3", True, None):
        with pytest.raises(ValueError, match="literal fraction must be a number in"):
            is_literal_example("a dog saw a cat", bad)


def test_toy_rows_with_literal_examples_keep_the_reference():
    from archs.tiny.translation_task import LITERAL_COT, literal_translation

    rows = toy_rows("train", 400, selector=TemplateSelector("random"), with_cot=True, literal_fraction=0.3)
    pairs = {p.src: p for p in generate_pairs(400, seed=0)}
    literal = [r for r in rows if r["literal"]]
    assert 0.2 < len(literal) / len(rows) < 0.4
    for r in rows:
        pair = pairs[r["src"]]
        assert r["ref"] == pair.tgt  # the reward and the evaluation score against the reference
        if r["literal"]:
            assert r["cot"] == LITERAL_COT
            assert r["completion"][0]["content"] == format_completion(LITERAL_COT, literal_translation(pair))
        else:
            assert r["completion"][0]["content"] == format_completion(toy_cot(pair, r["template"]), pair.tgt)
    # without literal examples the corpus is what it was
    plain = toy_rows("train", 400, selector=TemplateSelector("random"), with_cot=True)
    assert not any(r["literal"] for r in plain)
    assert [r["completion"] for r in plain if r["src"] not in {x["src"] for x in literal}] == \
        [r["completion"] for r in rows if not r["literal"]]
    with pytest.raises(ValueError, match="needs with_cot=True"):
        toy_rows("train", 4, literal_fraction=0.3)


def test_literal_rate_reads_the_first_thought():
    from r1t1.toy import is_toy, literal_rate

    completions = ["<think>word for word</think><answer>a b</answer>", " <think>word for word</think><answer>x</answer>",
                   "<think>words: S dog = vato</think><answer>vato</answer>", "<answer>x</answer><think>word for word</think>"]
    assert literal_rate(completions) == 0.5
    assert literal_rate([None, 3]) == 0.0
    with pytest.raises(ValueError):
        literal_rate([])
    assert is_toy(toy_rows("test", 3)) and not is_toy([{"src_lang": "de", "tgt_lang": "en"}]) and not is_toy([])


def test_toy_prompts_without_the_template_instruction():
    rows = toy_rows("test", 5, selector=TemplateSelector("random"), system_prompt=None, instruction=False)
    for r in rows:
        assert r["prompt"] == [{"role": "user", "content": f"Translate from English to Toylang:\n{r['src']}"}]
    with_instruction = toy_rows("test", 5, selector=TemplateSelector("random"), system_prompt=None)
    for r in with_instruction:
        assert r["prompt"][0]["content"].startswith(TEMPLATES[r["template"]].instruction)
