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
        t.quality = lambda hyps, refs, srcs, metric, comet_model: [-0.7 for _ in hyps]
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
