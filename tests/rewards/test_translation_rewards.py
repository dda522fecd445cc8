"""R1-T1 translation rewards: the format gate, the formula, metrics, and adversarial model output."""

import math

import pytest
from sacrebleu.metrics import BLEU, CHRF

from rewards.translation import (
    extract_answer,
    format_valid,
    make_translation_reward,
    quality,
    translation_reward,
)

GOOD = "<think>dog = vato</think><answer>vato mira</answer>"


@pytest.mark.parametrize("text", [
    GOOD,
    "  <think>x</think>\n\n<answer>y</answer>\n",
    "<think>multi\nline</think><answer>la traduction</answer>",
])
def test_format_valid_accepts_one_think_then_one_answer(text):
    assert format_valid(text)
    assert format_valid([{"role": "assistant", "content": text}])


@pytest.mark.parametrize("text", [
    "",
    "vato mira",
    "<answer>vato</answer>",  # no think
    "<think>x</think>",  # no answer
    "<answer>y</answer><think>x</think>",  # wrong order
    "<think>x</think><answer>y</answer><answer>z</answer>",  # two answers
    "<think>x</think><think>x</think><answer>y</answer>",  # two thinks
    "<think>x<think>y</think><answer>z</answer>",  # nested open tag
    "<think>x</think>extra<answer>y</answer>",  # text between the blocks
    "<think>x</think><answer>y</answer> trailing",  # text after the answer
    "preamble <think>x</think><answer>y</answer>",  # text before
    "<think>x</think><answer>   </answer>",  # empty answer
    "<think> </think><answer>y</answer>",  # empty reasoning
    "<think>x</think><answer>y",  # unclosed answer
    "<think>x</think><answer>a</answer>b</answer>",  # stray closing tag
])
def test_format_valid_rejects_malformed(text):
    assert not format_valid(text)


@pytest.mark.parametrize("junk", [None, 3, 2.5, {"content": GOOD}, [None], [{"role": "assistant"}], b"\xff\xfe",
                                  "\ud800<think>x</think><answer>y</answer>", "<think>" * 10_000, object()])
def test_junk_completions_score_zero_and_never_raise(junk):
    assert translation_reward([junk], ["src"], ["ref"]) == [0.0]
    assert extract_answer(junk) == ""
    assert not format_valid(junk)


def test_reward_formula_with_chrf():
    ref = "hemade vatoli gor ponako sel mirata"
    hyp = "hemade vatoli ponako mira"
    q = CHRF().sentence_score(hyp, [ref]).score / 100
    assert 0.2 < q < 0.9  # a partial match, so rounding and the bonus both matter
    got = translation_reward([f"<think>t</think><answer>{hyp}</answer>"], ["src"], [ref])
    assert got == [pytest.approx(0.2 + round(q, 2), abs=1e-12)]
    perfect = translation_reward([f"<think>t</think><answer>{ref}</answer>"], ["src"], [ref])
    assert perfect == [pytest.approx(1.2)]


def test_valid_format_with_a_useless_answer_gets_only_the_bonus():
    assert translation_reward(["<think>t</think><answer>zzzz</answer>"], ["s"], ["abcd"]) == [pytest.approx(0.2)]


def test_invalid_format_gets_nothing_even_with_a_perfect_translation():
    assert translation_reward(["<answer>vato mira</answer>"], ["s"], ["vato mira"]) == [0.0]


def test_bleu_metric_matches_sacrebleu_sentence_bleu():
    ref, hyp = "the cat sat on the mat", "the cat sat on a mat"
    q = BLEU(effective_order=True).sentence_score(hyp, [ref]).score / 100
    got = translation_reward([f"<think>t</think><answer>{hyp}</answer>"], ["s"], [ref], metric="bleu")
    assert got == [pytest.approx(0.2 + round(q, 2))]
    assert 0 < q < 1


def test_batched_rewards_line_up_with_their_references():
    refs = ["vato mira", "miri kana", "pela oda"]
    comps = [f"<think>t</think><answer>{r}</answer>" for r in reversed(refs)]
    comps[1] = "<think>t</think><answer>miri kana</answer>"
    got = translation_reward(comps, ["a", "b", "c"], refs)
    assert got[1] == pytest.approx(1.2)
    assert got[0] < 1.2 and got[2] < 1.2


def test_quality_is_clipped_at_zero_by_the_formula():
    # a metric value below zero (COMET can give one) must not push the reward below the bonus
    from rewards import translation as t

    orig = t.quality
    try:
        t.quality = lambda hyps, refs, srcs, **kw: [-0.7 for _ in hyps]
        assert translation_reward([GOOD], ["s"], ["r"]) == [pytest.approx(0.2)]
    finally:
        t.quality = orig


def test_data_errors_are_reported_not_scored():
    with pytest.raises(ValueError, match="2 completions, 1 sources"):
        translation_reward([GOOD, GOOD], ["s"], ["r"])
    with pytest.raises(ValueError, match="ref must be strings, got None"):
        translation_reward([GOOD], ["s"], [None])
    with pytest.raises(ValueError, match="metric must be one of"):
        translation_reward([GOOD], ["s"], ["r"], metric="meteor")
    with pytest.raises(ValueError, match="metric must be one of"):
        make_translation_reward("rouge")


def test_comet_needs_a_local_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="comet_model"):
        make_translation_reward("comet")
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        make_translation_reward("comet", str(tmp_path / "does-not-exist"))
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"")
    try:
        import comet  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="unbabel-comet"):
            quality(["a"], ["b"], ["c"], metric="comet", comet_model=str(ckpt))


def test_trl_signature_and_name():
    f = make_translation_reward("chrf")
    assert f.__name__ == "translation_chrf"
    out = f(completions=[[{"role": "assistant", "content": GOOD}], "garbage"], src=["a", "b"],
            ref=["vato mira", "x"], prompts=None, completion_ids=None, trainer_state=None)
    assert out == [pytest.approx(1.2), 0.0]
    assert all(isinstance(x, float) and math.isfinite(x) for x in out)


def test_extract_answer_strict_and_lenient():
    assert extract_answer(GOOD) == "vato mira"
    broken = "<think>x</think><answer>one</answer> and <answer>two</answer>"
    assert extract_answer(broken) == ""
    assert extract_answer(broken, strict=False) == "two"
    assert extract_answer("no tags", strict=False) == ""


# ------------------------------------------------------------------ the authors' gate and the pre-fill


@pytest.mark.parametrize("text", [
    "Sure. <think>t</think> then <answer>x</answer> done",  # text before, between and after
    "<think></think><answer>x</answer>",  # an empty think
    "<think>t</think><answer></answer>",  # an empty answer: valid, earns the 0.2 only
])
def test_authors_gate_accepts_what_the_released_check_accepts(text):
    assert format_valid(text, gate="authors")
    assert not format_valid(text, gate="strict")


@pytest.mark.parametrize("text", [
    "<think>a</think><think>b</think><answer>x</answer>",  # a tag twice
    "<answer>x</answer><think>t</think>",  # out of order
    "<think>t</answer><answer>x</think>",  # interleaved
    "<think>t</think>x",  # no answer
])
def test_authors_gate_rejects_counts_and_order(text):
    assert not format_valid(text, gate="authors")


def test_authors_gate_reward_formula():
    # empty answer: 0.2, never Q; a real answer: 0.2 + round(chrF, 2), text around the tags ignored
    assert translation_reward(["<think>t</think><answer> </answer>"], ["s"], ["ref"], gate="authors") == [pytest.approx(0.2)]
    ref, hyp = "die Hunde sahen einen Ball", "die Hunde sahen Ball"
    q = round(CHRF().sentence_score(hyp, [ref]).score / 100, 2)
    got = translation_reward([f"ok <think>t</think>\n<answer>\n{hyp}\n</answer> bye"], ["s"], [ref], gate="authors")
    assert got == [pytest.approx(0.2 + q)]
    assert translation_reward([f"ok <think>t</think><answer>{hyp}</answer> bye"], ["s"], [ref]) == [0.0]


def test_prefilled_think_is_read_before_the_completion():
    # the prompt ends in "<think>": the completion starts inside the think block
    completion = "reasoning</think><answer>vato mira</answer>"
    assert translation_reward([completion], ["s"], ["vato mira"]) == [0.0]
    assert translation_reward([completion], ["s"], ["vato mira"], prefix="<think>") == [pytest.approx(1.2)]
    assert translation_reward([completion], ["s"], ["vato mira"], gate="authors", prefix="<think>") == [pytest.approx(1.2)]
    # a model that repeats the pre-filled tag has two <think>: invalid under both gates
    assert not format_valid("<think>" + completion, gate="authors", prefix="<think>")


def test_unknown_gate_is_one_clear_error():
    with pytest.raises(ValueError, match="'lenient'"):
        make_translation_reward(gate="lenient")


# ------------------------------------------------------------------ BLEU tokenised for the target language


def test_bleu_uses_the_target_languages_tokenizer():
    from sacrebleu.metrics import BLEU

    from rewards.translation import bleu_tokenizer

    assert bleu_tokenizer("zh") == "zh" and bleu_tokenizer("ja") == "ja-mecab" and bleu_tokenizer("kr") == "ko-mecab"
    assert bleu_tokenizer("de") == "13a" and bleu_tokenizer("zh", "flores200") == "flores200"
    ref, hyp = "今天天气很好我们去公园", "今天天气好我们去公园"
    comp = f"<think>t</think><answer>{hyp}</answer>"
    zh = BLEU(tokenize="zh", effective_order=True).sentence_score(hyp, [ref]).score / 100
    plain = BLEU(effective_order=True).sentence_score(hyp, [ref]).score / 100
    assert round(zh, 2) != round(plain, 2)  # 13a sees one "word": the test can tell the tokenizers apart
    got = translation_reward([comp, comp], ["s", "s"], [ref, ref], metric="bleu", tgt_lang=["zh", "de"])
    assert got == [pytest.approx(0.2 + round(zh, 2)), pytest.approx(0.2 + round(plain, 2))]
    reward = make_translation_reward("bleu", target_languages=["zh"])
    assert reward([comp], src=["s"], ref=[ref], tgt_lang=["zh"]) == [pytest.approx(0.2 + round(zh, 2))]


def test_missing_or_unknown_bleu_tokenizer_fails_before_training():
    with pytest.raises(ValueError, match="'nonsense'"):
        make_translation_reward("bleu", bleu_tokenize="nonsense")


# One sentence per target language of the released 78-direction grid, plus Lao, Burmese and Khmer
# (written without spaces, as Thai), each with one word changed ("cat" -> "dog", or the like).
ONE_WORD_OFF = {
    "ar": ("القطة العجوز تنام كل مساء على السجادة الدافئة في المطبخ", "الكلبة"),
    "cs": ("Starý kocour spí každé odpoledne na teplé rohožce v kuchyni .", "pes"),
    "de": ("Die alte Katze schläft jeden Nachmittag auf der warmen Matte in der Küche .", "Maus"),
    "el": ("Η γέρικη γάτα κοιμάται κάθε απόγευμα στο ζεστό χαλάκι της κουζίνας .", "σκύλα"),
    "en": ("The old cat sleeps on the warm mat in the kitchen every afternoon .", "dog"),
    "es": ("El gato viejo duerme cada tarde sobre la alfombra caliente de la cocina .", "perro"),
    "fr": ("Le vieux chat dort chaque après-midi sur le tapis chaud de la cuisine .", "chien"),
    "id": ("Kucing tua itu tidur setiap sore di atas keset hangat di dapur .", "Anjing"),
    "it": ("Il vecchio gatto dorme ogni pomeriggio sul tappeto caldo della cucina .", "cane"),
    "ja": ("年老いた猫は毎日午後、台所の暖かいマットの上で眠ります。", "犬"),
    "ko": ("늙은 고양이는 매일 오후 부엌의 따뜻한 매트 위에서 잔다 .", "강아지는"),
    "ms": ("Kucing tua itu tidur setiap petang di atas tikar hangat di dapur .", "Anjing"),
    "nl": ("De oude kat slaapt elke middag op de warme mat in de keuken .", "hond"),
    "pl": ("Stary kot śpi każdego popołudnia na ciepłej macie w kuchni .", "pies"),
    "pt": ("O gato velho dorme todas as tardes no tapete quente da cozinha .", "cão"),
    "ru": ("Старый кот каждый день спит на тёплом коврике на кухне .", "пёс"),
    "th": ("แมวแก่นอนบนเสื่ออุ่นในครัวทุกบ่าย", "หมา"),
    "tl": ("Natutulog ang matandang pusa tuwing hapon sa mainit na banig sa kusina .", "aso"),
    "tr": ("Yaşlı kedi her öğleden sonra mutfaktaki sıcak paspasın üzerinde uyur .", "köpek"),
    "vi": ("Con mèo già ngủ mỗi buổi chiều trên tấm thảm ấm trong bếp .", "chó"),
    "zh": ("那只老猫每天下午都睡在厨房里温暖的垫子上。", "狗"),
    "lo": ("ແມວເຖົ້ານອນຢູ່ເທິງສາດອຸ່ນໃນເຮືອນຄົວທຸກຕອນບ່າຍ", "ໝາ"),
    "my": ("ကြောင်အိုသည်နေ့လယ်တိုင်းမီးဖိုချောင်ထဲရှိနွေးထွေးသောဖျာပေါ်တွင်အိပ်သည်။", "ခွေး"),
    "km": ("ឆ្មាចាស់ដេកលើកន្ទេលក្តៅក្នុងផ្ទះបាយរៀងរាល់រសៀល។", "ឆ្កែ"),
}
# the word each sentence has changed: its first "cat" (a word in spaced scripts, a character run otherwise)
_CAT = {"ar": "القطة", "cs": "kocour", "de": "Katze", "el": "γάτα", "en": "cat", "es": "gato", "fr": "chat",
        "id": "Kucing", "it": "gatto", "ja": "猫", "ko": "고양이는", "ms": "Kucing", "nl": "kat", "pl": "kot",
        "pt": "gato", "ru": "кот", "th": "แมว", "tl": "pusa", "tr": "kedi", "vi": "mèo", "zh": "猫", "lo": "ແມວ",
        "my": "ကြောင်", "km": "ឆ្មា"}


def _one_word_off(lang):
    ref, word = ONE_WORD_OFF[lang]
    assert ref.count(_CAT[lang]) == 1
    return ref.replace(_CAT[lang], word), ref


def test_thai_one_word_off_scores_its_character_bleu_not_zero():
    hyp, ref = _one_word_off("th")
    assert BLEU(tokenize="13a", effective_order=True).sentence_score(hyp, [ref]).score == 0.0  # the bug: one "word"
    char = BLEU(tokenize="char", effective_order=True).sentence_score(hyp, [ref]).score / 100
    assert char == pytest.approx(0.912, abs=1e-3)
    assert quality([hyp], [ref], metric="bleu", tgt_langs=["th"]) == [pytest.approx(char, abs=1e-12)]
    got = make_translation_reward("bleu", target_languages=["th"])(
        [f"<think>t</think><answer>{hyp}</answer>"], src=["s"], ref=[ref], tgt_lang=["th"])
    assert got == [pytest.approx(0.2 + 0.91)]


# sacrebleu's word segmenters where it has one, characters for the other scripts without spaces, else 13a
OWN_TOKENIZER = {"zh": "zh", "ja": "ja-mecab", "ko": "ko-mecab", "th": "char", "lo": "char", "my": "char", "km": "char"}


def test_every_target_language_of_the_grid_scores_one_word_off_above_zero():
    from r1t1.data import paper_directions

    targets = sorted({tgt for _, tgt in paper_directions()} | {"lo", "my", "km"})
    assert len(targets) == 24 and set(targets) == set(ONE_WORD_OFF)
    for lang in targets:
        hyp, ref = _one_word_off(lang)
        got = quality([hyp], [ref], metric="bleu", tgt_langs=[lang])[0]
        tokenize = OWN_TOKENIZER.get(lang, "13a")
        assert got == pytest.approx(BLEU(tokenize=tokenize, effective_order=True).sentence_score(hyp, [ref]).score / 100,
                                    abs=1e-12), (lang, tokenize)
        assert 0.7 < got < 1, (lang, got)


def test_evaluation_bleu_uses_the_target_languages_tokenizer():
    from r1t1.evaluation import score_translations

    pairs = [_one_word_off("th"), (ONE_WORD_OFF["th"][0], ONE_WORD_OFF["th"][0])]
    completions = [f"<think>t</think><answer>{h}</answer>" for h, _ in pairs]
    scores = score_translations(completions, ["s", "s"], [r for _, r in pairs], tgt_lang="th")
    corpus = BLEU(tokenize="char").corpus_score([h for h, _ in pairs], [[r for _, r in pairs]])
    assert scores.bleu == pytest.approx(corpus.score, abs=1e-9) and 90 < scores.bleu < 100
    assert "tok:char" in scores.bleu_signature


def test_a_target_language_that_is_not_a_code_is_a_clear_error():
    with pytest.raises(ValueError, match="language code such as 'th', got 5"):
        translation_reward([GOOD], ["s"], ["r"], metric="bleu", tgt_lang=[5])
