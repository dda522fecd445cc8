"""Math rewards: answer equivalence, format, adversarial model output, timeouts, concurrency.

Every expected score below was checked against math-verify 0.9.0 (see `rewards/math_check.py`);
where its behaviour is surprising the case says so.
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rewards.completions import completion_text
from rewards.math import accuracy_reward, format_reward, get_verifier, is_well_formatted
from rewards.math_check import MAX_PARSED_CHARS, check_answer, normalize_gold
from rewards.verifier import MathVerifier

logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # it logs every unparsable input
logging.getLogger("latex2sympy2_extended").setLevel(logging.CRITICAL)

# One timeout for every accuracy_reward call here, so the whole file shares one verifier.
TIMEOUT = 3.0
# A check that overruns costs its timeout plus a worker restart (about 1 s); generous for CI.
OVERRUN_BUDGET_S = 15.0

POWER_TOWER = "\\boxed{10^{10^{10^{10}}}}"  # sympy evaluates this for far longer than any timeout

GSM8K_NATALIA = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)
MATH_SOLUTION = "We have $3 + 4 = 7$, so the sum is $\\boxed{7}$."


def chat(text):
    return [{"role": "assistant", "content": text}]


# (completion, gold, expected score)
EQUIVALENCE_CASES = [
    # \boxed{} answers
    pytest.param("So the result is \\boxed{42}.", "42", 1.0, id="boxed-int"),
    pytest.param("So the result is \\boxed{41}.", "42", 0.0, id="boxed-int-wrong"),
    pytest.param("\\boxed{-3}", "-3", 1.0, id="negative"),
    pytest.param("\\boxed{3}", "-3", 0.0, id="negative-sign-missing"),
    pytest.param("\\boxed{-\\frac{1}{2}}", "-0.5", 1.0, id="negative-fraction-vs-decimal"),
    # GSM8K golds
    pytest.param("She sold \\boxed{72} clips.", GSM8K_NATALIA, 1.0, id="gsm8k-gold-boxed"),
    pytest.param("So she sold 72 clips.", GSM8K_NATALIA, 1.0, id="gsm8k-gold-plain-number"),
    pytest.param("She sold \\boxed{48} clips.", GSM8K_NATALIA, 0.0, id="gsm8k-gold-wrong"),
    pytest.param("\\boxed{1234}", "#### 1,234", 1.0, id="gsm8k-thousands-gold"),
    pytest.param("\\boxed{1,234}", "#### 1,234", 1.0, id="gsm8k-thousands-both"),
    pytest.param("The total is 1,234", "#### 1,234", 1.0, id="gsm8k-thousands-plain"),
    pytest.param("\\boxed{1243}", "#### 1,234", 0.0, id="gsm8k-thousands-wrong"),
    pytest.param("Adding up: 1,000 + 234.\n#### 1,234", "#### 1,234", 1.0, id="gsm8k-hashes-pred"),
    pytest.param("The answer is 41.\n#### 42", "42", 1.0, id="hashes-line-wins-over-text"),
    pytest.param("\\boxed{1000000}", "#### 1,000,000", 1.0, id="gsm8k-millions"),
    # '#### 72 clips' becomes \boxed{72 clips}, which does not parse to 72 (units=True knows no 'clips')
    pytest.param("#### 72 clips", "#### 72", 0.0, id="hashes-with-unit-word"),
    # plain final numbers
    pytest.param("The answer is 42", "42", 1.0, id="plain-number"),
    pytest.param("The answer is 42.", "42", 1.0, id="plain-number-period"),
    pytest.param("I first thought 41, but it is 42", "42", 1.0, id="plain-last-number-wins"),
    pytest.param("The answer is 7", "-7", 0.0, id="plain-number-wrong-sign"),
    pytest.param("no answer here", "42", 0.0, id="no-number"),
    pytest.param("", "42", 0.0, id="empty"),
    # fractions and decimals
    pytest.param("\\boxed{0.5}", "\\frac{1}{2}", 1.0, id="decimal-vs-frac"),
    pytest.param("\\boxed{\\frac{1}{2}}", "0.5", 1.0, id="frac-vs-decimal"),
    pytest.param("\\boxed{\\dfrac{3}{4}}", "\\frac34", 1.0, id="dfrac-vs-short-frac"),
    pytest.param("\\boxed{\\frac34}", "\\dfrac{3}{4}", 1.0, id="short-frac-pred"),
    pytest.param("\\boxed{\\frac 34}", "34", 0.0, id="spaced-short-frac-is-not-34"),
    pytest.param("\\boxed{1/2}", "\\frac12", 1.0, id="slash-vs-frac"),
    pytest.param("\\boxed{0.333}", "\\frac13", 0.0, id="rounded-decimal-vs-third"),
    pytest.param("\\boxed{3.50}", "3.5", 1.0, id="trailing-zero"),
    pytest.param("\\boxed{3.51}", "3.5", 0.0, id="decimal-wrong"),
    # percentages: math-verify accepts both the number and its fraction for a percentage
    pytest.param("\\boxed{50\\%}", "0.5", 1.0, id="percent-vs-fraction"),
    pytest.param("\\boxed{0.5}", "50\\%", 1.0, id="fraction-vs-percent"),
    pytest.param("\\boxed{50\\%}", "50", 1.0, id="percent-vs-number"),
    pytest.param("\\boxed{50}", "50\\%", 1.0, id="number-vs-percent"),
    pytest.param("\\boxed{40\\%}", "0.5", 0.0, id="percent-wrong"),
    # roots and symbolic expressions
    pytest.param("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", 1.0, id="sqrt-simplified"),
    pytest.param("\\boxed{\\sqrt 8}", "2\\sqrt{2}", 1.0, id="sqrt-without-braces"),
    pytest.param("\\boxed{\\sqrt 8}", "8", 0.0, id="sqrt-without-braces-is-not-8"),
    pytest.param("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}", 1.0, id="sqrt-over-2"),
    pytest.param("\\boxed{\\sqrt{3}}", "\\sqrt{2}", 0.0, id="sqrt-wrong"),
    pytest.param("\\boxed{x^2+2x+1}", "(x+1)^2", 1.0, id="polynomial-expanded"),
    pytest.param("\\boxed{\\pi}", "\\pi", 1.0, id="pi"),
    pytest.param("\\boxed{x=5}", "5", 1.0, id="equation-rhs"),
    pytest.param("\\boxed{5 \\text{ cm}}", "5", 1.0, id="unit-stripped"),
    pytest.param("\\boxed{\\$5}", "5", 1.0, id="dollar-sign"),
    # sets and intervals
    pytest.param("\\boxed{\\{2,1\\}}", "\\{1,2\\}", 1.0, id="set-order"),
    pytest.param("\\boxed{\\{1,3\\}}", "\\{1,2\\}", 0.0, id="set-wrong"),
    pytest.param("\\boxed{\\{1,2,3\\}}", "\\{1,2\\}", 0.0, id="set-superset"),
    pytest.param("\\boxed{(1,2]}", "(1,2]", 1.0, id="interval"),
    pytest.param("\\boxed{(1,2)}", "(1,2]", 0.0, id="interval-open-vs-half-open"),
    pytest.param("\\boxed{[1,2)}", "(1,2]", 0.0, id="interval-flipped"),
    pytest.param("\\boxed{x \\in (1,2]}", "(1,2]", 1.0, id="interval-membership"),
    # commas inside tuples, sets and intervals are not thousands separators
    pytest.param("\\boxed{(1,100)}", "(1,100)", 1.0, id="tuple-with-3-digit-part"),
    pytest.param("\\boxed{\\{1,234\\}}", "\\{1,234\\}", 1.0, id="set-with-3-digit-part"),
    pytest.param("\\boxed{(1,234]}", "(1,234]", 1.0, id="interval-with-3-digit-part"),
    pytest.param("\\boxed{1234}", "(1,234]", 0.0, id="interval-is-not-a-number"),
    # MATH-style golds (full solutions with \boxed{})
    pytest.param("\\boxed{7}", MATH_SOLUTION, 1.0, id="math-solution-gold"),
    pytest.param("\\boxed{8}", MATH_SOLUTION, 0.0, id="math-solution-gold-wrong"),
    pytest.param("\\boxed{(1,100)}", "The point is $\\boxed{(1,100)}$.", 1.0, id="math-solution-tuple"),
    pytest.param("\\boxed{2}", "\\boxed{2}", 1.0, id="boxed-gold"),
    # several boxes: the last one wins when they are apart ...
    pytest.param(
        "Initially I got \\boxed{3}. But let me double check the computation once more. "
        "The right value is \\boxed{7}",
        "7", 1.0, id="last-boxed-wins",
    ),
    pytest.param(
        "Initially I got \\boxed{3}. But let me double check the computation once more. "
        "The right value is \\boxed{7}",
        "3", 0.0, id="earlier-boxed-loses",
    ),
    # ... but math-verify joins boxes close together ('\boxed{3}, \boxed{7}') into one set {3, 7}
    pytest.param("First \\boxed{3}, actually \\boxed{7}", "7", 0.0, id="close-boxes-form-a-set"),
    pytest.param("\\boxed{3} and \\boxed{7}", "\\{3,7\\}", 1.0, id="close-boxes-set-gold"),
    pytest.param("First $\\boxed{3}$, actually $\\boxed{7}$", "7", 1.0, id="last-inline-boxed-wins"),
    # chat-message completions: the assistant's last message counts
    pytest.param(chat("The answer is \\boxed{42}"), "42", 1.0, id="chat"),
    pytest.param(chat("The answer is \\boxed{41}"), "42", 0.0, id="chat-wrong"),
    pytest.param(
        [{"role": "assistant", "content": "\\boxed{41}"}, {"role": "assistant", "content": "\\boxed{42}"}],
        "42", 1.0, id="chat-last-message",
    ),
    pytest.param(chat("$\\frac{1}{2}$"), "0.5", 1.0, id="chat-frac"),
]


@pytest.mark.parametrize(("completion", "gold", "expected"), EQUIVALENCE_CASES)
def test_check_answer_table(completion, gold, expected):
    assert check_answer(completion_text(completion), gold) == expected


def test_equivalence_table_is_big_and_mixed():
    expected = [c.values[2] for c in EQUIVALENCE_CASES]
    assert len(expected) >= 40
    assert expected.count(1.0) >= 20 and expected.count(0.0) >= 20


def test_accuracy_reward_matches_table_in_one_batch():
    completions = [c.values[0] for c in EQUIVALENCE_CASES]
    golds = [c.values[1] for c in EQUIVALENCE_CASES]
    expected = [c.values[2] for c in EQUIVALENCE_CASES]
    assert accuracy_reward(completions, golds, timeout=TIMEOUT) == expected


def test_score_many_keeps_order_with_two_workers():
    completions = [completion_text(c.values[0]) for c in EQUIVALENCE_CASES]
    golds = [c.values[1] for c in EQUIVALENCE_CASES]
    expected = [c.values[2] for c in EQUIVALENCE_CASES]
    verifier = MathVerifier(num_workers=2, timeout=TIMEOUT)
    try:
        assert verifier.score_many(completions, golds) == expected
        assert verifier.timeouts == 0
    finally:
        verifier.close()


@pytest.mark.parametrize(
    ("gold", "normalized"),
    [
        (GSM8K_NATALIA, "$72$"),
        ("#### 1,234", "$1234$"),
        ("Some steps.\n#### 1,000,000", "$1000000$"),
        ("42", "$42$"),
        ("\\frac34", "$\\frac34$"),
        ("(1,100)", "$(1,100)$"),
        ("\\{1,234\\}", "$\\{1,234\\}$"),
        (MATH_SOLUTION, MATH_SOLUTION),
        ("\\boxed{2}", "\\boxed{2}"),
    ],
)
def test_normalize_gold(gold, normalized):
    assert normalize_gold(gold) == normalized


def test_gold_may_be_a_number_and_extra_kwargs_are_ignored():
    rewards = accuracy_reward(
        ["\\boxed{42}", "\\boxed{42}"], [42, 41], timeout=TIMEOUT, prompts=["q1", "q2"], trainer_state=None
    )
    assert rewards == [1.0, 0.0]


def test_accuracy_reward_length_mismatch_raises():
    with pytest.raises(ValueError, match="2 completions but 1 solutions"):
        accuracy_reward(["\\boxed{1}", "\\boxed{2}"], ["1"], timeout=TIMEOUT)


# ---------------------------------------------------------------------------------------------
# Adversarial model output

FILLER = "lorem ipsum dolor sit amet "  # no digits: nothing in it reads as an answer
MEGABYTE = FILLER * (2**20 // len(FILLER) + 1)


@pytest.mark.parametrize(
    ("completion", "gold", "expected"),
    [
        pytest.param(MEGABYTE, "42", 0.0, id="1MB-no-answer"),
        pytest.param(MEGABYTE + "\n\nSo the answer is \\boxed{42}.", "42", 1.0, id="1MB-answer-at-end"),
        pytest.param(MEGABYTE + "\n\nSo the answer is \\boxed{41}.", "42", 0.0, id="1MB-wrong-answer-at-end"),
        pytest.param(MEGABYTE + "\n#### 42", "42", 1.0, id="1MB-hashes-at-end"),
        # only the last MAX_PARSED_CHARS characters are parsed
        pytest.param("\\boxed{42}\n" + MEGABYTE, "42", 0.0, id="1MB-answer-at-start"),
        pytest.param("é" * 2**19 + " \\boxed{42}", "42", 1.0, id="1MB-non-ascii-answer-at-end"),
        pytest.param(chat(MEGABYTE + "\\boxed{42}"), "42", 1.0, id="1MB-chat"),
        pytest.param("\\boxed{" * 10000 + "}" * 10000, "1", 0.0, id="10k-nested-boxes"),
        pytest.param("\\boxed{" * 10000 + "1" + "}" * 10000, "1", 0.0, id="10k-nested-boxes-answer-cut-off"),
        pytest.param("\\boxed{" * 400 + "1" + "}" * 400, "1", 1.0, id="400-nested-boxes"),
        pytest.param("\\boxed{" * 10000, "1", 0.0, id="unbalanced-open"),
        pytest.param("\\boxed{" * 10000 + "1", "1", 0.0, id="unbalanced-open-with-answer"),
        pytest.param("}" * 10000, "1", 0.0, id="unbalanced-close"),
        pytest.param("{" * 10000 + "\\boxed{1}", "1", 1.0, id="open-braces-then-answer"),
        pytest.param("{" * 3000 + "1" + "}" * 3000, "1", 0.0, id="nested-plain-braces"),
        pytest.param("\\frac{" * 1000 + "1" + "}{2}" * 1000, "1", 0.0, id="nested-fracs"),
        pytest.param("\ud800", "1", 0.0, id="lone-surrogate"),
        pytest.param("\ud800 \\boxed{42} \udfff", "42", 1.0, id="lone-surrogates-around-answer"),
        pytest.param(b"\xff", "1", 0.0, id="invalid-utf8"),
        pytest.param(b"\xff\xfe \\boxed{42}", "42", 0.0, id="bytes-are-not-text"),
        pytest.param(b"\\boxed{42}", "42", 0.0, id="bytes-with-answer"),
        pytest.param("\x00\\boxed{1}\x00", "1", 1.0, id="nul-bytes"),
        pytest.param("\\boxed{x}", "\ud800", 0.0, id="surrogate-gold"),
        pytest.param("", "0", 0.0, id="empty"),
        pytest.param(None, "0", 0.0, id="none"),
        pytest.param(42, "42", 0.0, id="int"),
        pytest.param({"role": "assistant", "content": "\\boxed{42}"}, "42", 0.0, id="bare-dict"),
        pytest.param([], "42", 0.0, id="empty-message-list"),
        pytest.param([{"role": "assistant"}], "42", 0.0, id="message-without-content"),
        pytest.param([{"role": "assistant", "content": None}], "42", 0.0, id="message-content-none"),
        pytest.param(["\\boxed{42}"], "42", 0.0, id="list-of-strings"),
    ],
)
def test_adversarial_accuracy_and_format(completion, gold, expected):
    started = time.perf_counter()
    assert accuracy_reward([completion], [gold], timeout=TIMEOUT) == [expected]
    # none of these has a <think> block, so none is well formatted
    assert format_reward([completion]) == [0.0]
    assert time.perf_counter() - started < OVERRUN_BUDGET_S


@pytest.mark.parametrize(
    "completion",
    [
        pytest.param(POWER_TOWER, id="power-tower"),
        pytest.param("\\boxed{2^{2^{2^{2^{2^{2}}}}}}", id="power-tower-of-twos"),
        pytest.param("<think>compute</think> " + POWER_TOWER, id="power-tower-well-formatted"),
    ],
)
def test_power_tower_scores_zero_in_bounded_time(completion):
    started = time.perf_counter()
    assert accuracy_reward([completion], ["1"], timeout=TIMEOUT) == [0.0]
    assert time.perf_counter() - started < OVERRUN_BUDGET_S
    # and the verifier still answers correctly afterwards
    assert accuracy_reward(["\\boxed{42}", "\\boxed{43}"], ["42", "42"], timeout=TIMEOUT) == [1.0, 0.0]


def test_megabyte_completions_are_fast():
    completions = [MEGABYTE + "\\boxed{42}", "<think>" + MEGABYTE + "</think> \\boxed{42}", " " * 2**20]
    started = time.perf_counter()
    assert accuracy_reward(completions, ["42", "42", "42"], timeout=TIMEOUT) == [1.0, 1.0, 0.0]
    assert format_reward(completions) == [0.0, 1.0, 0.0]
    assert time.perf_counter() - started < OVERRUN_BUDGET_S


def test_parse_window_is_the_last_max_parsed_chars():
    answer = "\\boxed{42}"
    inside = "x " * 10 + answer + "." * (MAX_PARSED_CHARS - len(answer) - 1)
    outside = answer + "." * MAX_PARSED_CHARS
    assert accuracy_reward([inside, outside], ["42", "42"], timeout=TIMEOUT) == [1.0, 0.0]


# ---------------------------------------------------------------------------------------------
# format_reward

FORMAT_CASES = [
    pytest.param("<think>2 + 2 = 4</think> The answer is \\boxed{4}", 1.0, id="good"),
    pytest.param("<think>r</think>\n\\boxed{\\frac{1}{2}}\n", 1.0, id="nested-braces-in-answer"),
    pytest.param("<think>r</think> \\boxed{4}.", 1.0, id="trailing-period"),
    pytest.param("<think>r</think> $\\boxed{4}$", 1.0, id="inside-dollars"),
    pytest.param("  \n<think>r</think>\\boxed{4}", 1.0, id="leading-whitespace"),
    pytest.param(chat("<think>r</think> \\boxed{4}"), 1.0, id="chat"),
    pytest.param("The answer is \\boxed{4}", 0.0, id="missing-think"),
    pytest.param("<think>r \\boxed{4}", 0.0, id="unclosed-think"),
    pytest.param("</think> \\boxed{4}", 0.0, id="only-closing-think"),
    pytest.param("<think>a</think><think>b</think> \\boxed{4}", 0.0, id="two-think-blocks"),
    pytest.param("<think>a</think> </think> \\boxed{4}", 0.0, id="stray-closing-think"),
    pytest.param("<think><think>a</think> \\boxed{4}", 0.0, id="nested-think"),
    pytest.param("<think>  \n </think> \\boxed{4}", 0.0, id="empty-reasoning"),
    pytest.param("<think>r</think> \\boxed{4} or \\boxed{5}", 0.0, id="two-boxed"),
    pytest.param("<think>r \\boxed{4}</think> so 4", 0.0, id="boxed-inside-think-only"),
    # a draft answer boxed while reasoning is fine: only the text after </think> must have one box
    pytest.param("<think>maybe \\boxed{3}</think> \\boxed{4}", 1.0, id="boxed-inside-and-after-think"),
    pytest.param("<think>r</think> \\boxed{4} because reasons", 0.0, id="text-after-boxed"),
    pytest.param("<think>r</think> \\boxed{4", 0.0, id="unbalanced-open-brace"),
    pytest.param("<think>r</think> \\boxed{4}}", 0.0, id="unbalanced-close-brace"),
    pytest.param("<think>r</think> \\boxed{}", 0.0, id="empty-boxed"),
    pytest.param("<think>r</think> \\boxed 4", 0.0, id="boxed-without-brace"),
    pytest.param("Sure! <think>r</think> \\boxed{4}", 0.0, id="text-before-think"),
    pytest.param("<THINK>r</THINK> \\boxed{4}", 0.0, id="uppercase-tags"),
    pytest.param(chat("The answer is \\boxed{4}"), 0.0, id="chat-missing-think"),
    pytest.param(None, 0.0, id="none"),
]


@pytest.mark.parametrize(("completion", "expected"), FORMAT_CASES)
def test_format_reward_table(completion, expected):
    assert format_reward([completion]) == [expected]
    assert format_reward([completion], solution=["4"], prompts=["p"]) == [expected]


def test_format_reward_batch_keeps_order():
    completions = [c.values[0] for c in FORMAT_CASES]
    assert format_reward(completions) == [c.values[1] for c in FORMAT_CASES]


# ---------------------------------------------------------------------------------------------
# Bounded time: a check that overruns is cut off


def test_overrunning_check_is_cut_off_and_verifier_recovers():
    verifier = MathVerifier(num_workers=1, timeout=0.5)
    try:
        assert verifier.score("\\boxed{42}", "42") == 1.0  # start the worker outside the timing
        started = time.perf_counter()
        assert verifier.score(POWER_TOWER, "1") == 0.0
        elapsed = time.perf_counter() - started
        assert verifier.timeouts == 1
        assert elapsed < OVERRUN_BUDGET_S
        # the replacement worker gives correct answers, and nothing else is cut off
        assert verifier.score("\\boxed{42}", "42") == 1.0
        assert verifier.score("\\boxed{41}", "42") == 0.0
        assert verifier.score_many(["\\boxed{\\frac{1}{2}}", "\\boxed{3}"], ["0.5", "4"]) == [1.0, 0.0]
        assert verifier.timeouts == 1
    finally:
        verifier.close()


def test_overrun_in_a_parallel_batch_touches_only_its_own_item():
    verifier = MathVerifier(num_workers=2, timeout=0.5)
    try:
        preds = ["\\boxed{1}", POWER_TOWER, "\\boxed{3}", "\\boxed{4}", "\\boxed{6}"]
        golds = ["1", "1", "3", "4", "5"]
        assert verifier.score_many(preds, golds) == [1.0, 0.0, 1.0, 1.0, 0.0]
        assert verifier.timeouts == 1
    finally:
        verifier.close()


def _call_with_deadline(fn, *args, deadline: float = 60.0):
    """fn(*args) in a daemon thread: ('value', result) or ('error', exception); fails if it blocks."""
    box = []

    def run():
        try:
            box.append(("value", fn(*args)))
        except Exception as e:  # noqa: BLE001 - reported to the test
            box.append(("error", e))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(deadline)
    assert not thread.is_alive(), f"call blocked for more than {deadline}s"
    return box[0]


def test_failed_worker_restart_keeps_the_pool_slot(monkeypatch):
    """A replacement worker that fails to start must not shrink the pool to nothing (a deadlock)."""
    import rewards.verifier as verifier_module

    class FlakyWorker(verifier_module._Worker):
        fail_next_start = False

        def __init__(self, memory_limit_mb):
            if FlakyWorker.fail_next_start:
                FlakyWorker.fail_next_start = False
                raise RuntimeError("the math verification worker did not start")
            super().__init__(memory_limit_mb)

    monkeypatch.setattr(verifier_module, "_Worker", FlakyWorker)
    verifier = MathVerifier(num_workers=1, timeout=0.5)
    try:
        assert verifier.score("\\boxed{1}", "1") == 1.0
        FlakyWorker.fail_next_start = True
        assert _call_with_deadline(verifier.score, POWER_TOWER, "1") == ("value", 0.0)
        kind, error = _call_with_deadline(verifier.score, "\\boxed{2}", "2")  # the restart fails
        assert kind == "error" and isinstance(error, RuntimeError)
        assert _call_with_deadline(verifier.score, "\\boxed{3}", "3") == ("value", 1.0)
        assert verifier.timeouts == 1
    finally:
        verifier.close()


# ---------------------------------------------------------------------------------------------
# Argument validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_workers": 0}, "num_workers must be >= 1, got 0"),
        ({"num_workers": -2}, "num_workers must be >= 1, got -2"),
        ({"timeout": 0}, "timeout must be > 0 seconds, got 0"),
        ({"timeout": -1.5}, "timeout must be > 0 seconds, got -1.5"),
        ({"timeout": float("nan")}, "timeout must be > 0 seconds, got nan"),
    ],
)
def test_verifier_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MathVerifier(**kwargs)


def test_score_many_length_mismatch_raises():
    verifier = MathVerifier(num_workers=1, timeout=TIMEOUT)
    with pytest.raises(ValueError, match="got 2 predictions but 1 gold answers"):
        verifier.score_many(["1", "2"], ["1"])
    with pytest.raises(ValueError, match="got 0 predictions but 1 gold answers"):
        verifier.score_many([], ["1"])
    verifier.close()


def test_get_verifier_is_shared_and_rebuilt_on_new_settings():
    first = get_verifier(1, TIMEOUT)
    assert get_verifier(1, TIMEOUT) is first
    other = get_verifier(1, TIMEOUT + 1)
    assert other is not first and (other.num_workers, other.timeout) == (1, TIMEOUT + 1)
    restored = get_verifier(1, TIMEOUT)
    assert (restored.num_workers, restored.timeout) == (1, TIMEOUT)
    assert accuracy_reward(["\\boxed{42}"], ["42"], timeout=TIMEOUT) == [1.0]


# ---------------------------------------------------------------------------------------------
# Threads and processes

BATCH = (
    ["\\boxed{42}", "\\boxed{\\frac{1}{2}}", "The answer is 7", chat("\\boxed{\\{1,2\\}}"), "\\boxed{5}"],
    ["42", "0.5", "#### 7", "\\{2,1\\}", "6"],
    [1.0, 1.0, 1.0, 1.0, 0.0],
)


def _score_batch(offset: int) -> list[float]:
    """Top-level so that a 'spawn' child can import it; rotates the batch so each call differs."""
    completions, golds, _ = BATCH
    completions = completions[offset:] + completions[:offset]
    golds = golds[offset:] + golds[:offset]
    return accuracy_reward(completions, golds, timeout=TIMEOUT)


def _expected(offset: int) -> list[float]:
    expected = BATCH[2]
    return expected[offset:] + expected[:offset]


def test_accuracy_reward_in_a_thread():
    result = {}
    thread = threading.Thread(target=lambda: result.update(scores=_score_batch(0)))
    thread.start()
    thread.join(60)
    assert result["scores"] == _expected(0)


def test_accuracy_reward_from_concurrent_threads():
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(_score_batch, range(5)))
    assert results == [_expected(i) for i in range(5)]


def test_verifier_shared_by_threads():
    verifier = MathVerifier(num_workers=2, timeout=TIMEOUT)
    try:
        preds = [f"\\boxed{{{i}}}" for i in range(12)]
        golds = [str(i if i % 3 else i + 1) for i in range(12)]
        with ThreadPoolExecutor(4) as pool:
            scores = list(pool.map(verifier.score, preds, golds))
        assert scores == [0.0 if i % 3 == 0 else 1.0 for i in range(12)]
    finally:
        verifier.close()


def test_accuracy_reward_in_spawned_processes():
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=ctx) as pool:
        results = list(pool.map(_score_batch, [0, 2]))
    assert results == [_expected(0), _expected(2)]


@pytest.mark.skipif(sys.platform != "linux", reason="fork is the default start method only on Linux")
def test_accuracy_reward_in_forked_process_uses_its_own_workers():
    assert _score_batch(0) == _expected(0)  # the parent's verifier has started its workers
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:
        assert pool.submit(_score_batch, 1).result(timeout=120) == _expected(1)
    assert _score_batch(3) == _expected(3)  # and the parent's workers still answer


# ---------------------------------------------------------------------------------------------
# Properties: any text, no exception, scores in {0, 1}

LATEX_FRAGMENTS = st.sampled_from(
    [
        "\\boxed{", "{", "}", "\\frac", "\\dfrac", "\\sqrt", "\\{", "\\}", "####", "$", "\\(", "\\)",
        "(", ")", "[", "]", ",", ".", " ", "\n", "+", "-", "/", "x", "\\%", "\\pi", "\\infty",
        "<think>", "</think>", "The answer is ", "\\text{cm}", "\\left(", "\\right)",
    ]
    + list("0123456789")
)
LATEXISH = st.lists(LATEX_FRAGMENTS, max_size=40).map("".join)
GOLDS = st.sampled_from(["42", "#### 1,234", "\\frac{1}{2}", "(1,2]", "\\{1,2\\}", MATH_SOLUTION])
PROPERTY_SETTINGS = settings(
    max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


def _check_rewards(completion, gold):
    acc = accuracy_reward([completion, chat(completion)], [gold, gold], timeout=TIMEOUT)
    fmt = format_reward([completion, chat(completion)])
    assert all(type(x) is float and x in (0.0, 1.0) for x in acc + fmt)
    assert acc[0] == acc[1] and fmt[0] == fmt[1]  # a string and its chat form score the same
    assert fmt[0] == float(is_well_formatted(completion))


@PROPERTY_SETTINGS
@given(text=st.text(alphabet=st.characters(exclude_categories=("Cs",))), gold=GOLDS)
def test_rewards_never_raise_on_arbitrary_text(text, gold):
    _check_rewards(text, gold)


@PROPERTY_SETTINGS
@given(text=LATEXISH, gold=GOLDS)
def test_rewards_never_raise_on_latex_fragments(text, gold):
    _check_rewards(text, gold)


@PROPERTY_SETTINGS
@given(
    reasoning=st.text(min_size=1).filter(
        lambda r: r.strip() and not any(t in r for t in ("<think>", "</think>", "\\boxed"))
    ),
    answer=st.integers(-10**6, 10**6),
)
def test_well_formatted_completion_scores_one(reasoning, answer):
    completion = f"<think>{reasoning}</think> The answer is \\boxed{{{answer}}}."
    assert format_reward([completion]) == [1.0]
