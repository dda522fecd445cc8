"""Anything that is not text (None, numbers, bytes, a bare dict, a list without a text message) is
malformed model output: it scores exactly 0 in every math and translation reward, never raises, and
leaves the scores of the well-formed completions batched with it unchanged."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rewards.math import accuracy_reward
from rewards.math import format_reward as math_format_reward
from rewards.translation import make_format_reward, make_translation_reward, translation_reward

VERDICT_TIMEOUT = 60.0  # as in test_math_rewards: one shared verifier, and no check is ever cut off

MATH_GOOD, MATH_GOLD = "<think>6 * 7</think> \\boxed{42}", "42"
TH_REF = "แมวแก่นอนบนเสื่ออุ่นในครัวทุกบ่าย"
TRANSLATION_GOOD = f"<think>t</think><answer>{TH_REF}</answer>"
PREFILLED_GOOD = TRANSLATION_GOOD[len("<think>"):]  # what a model writes after a pre-filled <think>

# Every reward, as (name, f(completions) -> scores, score of the well-formed completion).
REWARDS = [
    ("math accuracy", lambda cs: accuracy_reward(cs, [MATH_GOLD] * len(cs), timeout=VERDICT_TIMEOUT), MATH_GOOD, 1.0),
    ("math format", math_format_reward, MATH_GOOD, 1.0),
    ("chrF strict", lambda cs: translation_reward(cs, ["s"] * len(cs), [TH_REF] * len(cs)), TRANSLATION_GOOD, 1.2),
    ("BLEU th authors, pre-filled", lambda cs: make_translation_reward("bleu", gate="authors", prefix="<think>")(
        cs, src=["s"] * len(cs), ref=[TH_REF] * len(cs), tgt_lang=["th"] * len(cs)), PREFILLED_GOOD, 1.2),
    ("BLEU strict, no language", lambda cs: translation_reward(cs, ["s"] * len(cs), [TH_REF] * len(cs), metric="bleu"),
     TRANSLATION_GOOD, 0.2 + 1.0),
    ("translation format", lambda cs: make_format_reward()(cs), TRANSLATION_GOOD, 1.0),
]

# The well-formed completions in forms that are not text: bytes, a bare message, a list of strings,
# a message whose content is bytes, and the usual non-values.
NOT_TEXT = [None, 0, 42, 2.5, float("nan"), True, object(), b"", {}, [], (), [None], [[]],
            MATH_GOOD.encode(), TRANSLATION_GOOD.encode(), PREFILLED_GOOD.encode(),
            {"role": "assistant", "content": TRANSLATION_GOOD}, {"role": "assistant", "content": MATH_GOOD},
            [TRANSLATION_GOOD], [MATH_GOOD], (MATH_GOOD,),
            [{"role": "assistant", "content": TRANSLATION_GOOD.encode()}],
            [{"role": "assistant", "content": MATH_GOOD.encode()}],
            [{"role": "assistant", "content": None}], [{"role": "assistant", "content": 42}],
            [{"role": "assistant", "content": [{"type": "text", "text": MATH_GOOD}]}]]

_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.binary(max_size=40),
                  st.sampled_from([MATH_GOOD.encode(), TRANSLATION_GOOD.encode(), PREFILLED_GOOD.encode()]))
# strings appear only as message keys, so no generated value holds a text message
JUNK = st.recursive(_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.tuples(inner),
    st.dictionaries(st.sampled_from(["role", "content", "text"]), inner, max_size=2)), max_leaves=8)


@pytest.mark.parametrize(("name", "reward", "good", "good_score"), REWARDS, ids=[r[0] for r in REWARDS])
def test_each_listed_non_text_completion_scores_zero(name, reward, good, good_score):
    scores = reward([good, *NOT_TEXT, [{"role": "assistant", "content": good}]])
    assert scores[0] == pytest.approx(good_score) and scores[-1] == pytest.approx(good_score)
    assert [(repr(c)[:60], s) for c, s in zip(NOT_TEXT, scores[1:-1]) if s != 0.0] == []


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(junk=st.lists(JUNK, min_size=1, max_size=4))
def test_fuzzed_non_text_completions_score_zero_in_every_reward(junk):
    for _name, reward, good, good_score in REWARDS:
        scores = reward([good, *junk, good])
        assert len(scores) == len(junk) + 2
        assert scores[0] == pytest.approx(good_score) and scores[-1] == pytest.approx(good_score)
        assert scores[1:-1] == [0.0] * len(junk)
