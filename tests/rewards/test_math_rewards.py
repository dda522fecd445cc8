"""Math rewards: answer equivalence, format, adversarial model output, timeouts, concurrency.

Every expected score below was checked against math-verify 0.9.0 (see `rewards/math_check.py`);
where its behaviour is surprising the case says so.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rewards.completions import completion_text
from rewards.math import accuracy_reward, format_reward, get_verifier, is_well_formatted
from rewards.math_check import MAX_PARSED_CHARS, check_answer, normalize_gold
from rewards.verifier import MathVerifier

logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # it logs every unparsable input
logging.getLogger("latex2sympy2_extended").setLevel(logging.CRITICAL)

# Verdicts must not depend on the machine's speed: a check of these tables takes milliseconds (at
# most about 0.3 s, on a quiet machine), and a limit that a loaded machine can reach would turn right
# answers into 0s. So every verdict here is checked under a limit only a hung check reaches, and one
# value for it lets the whole file share one verifier.
VERDICT_TIMEOUT = 60.0
# Checks meant to be cut off (power towers never finish) get a short limit of their own, still
# hundreds of times what a normal check of the same batch takes.
HANG_LIMIT = 2.0

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
    assert accuracy_reward(completions, golds, timeout=VERDICT_TIMEOUT) == expected


def test_score_many_keeps_order_with_two_workers():
    completions = [completion_text(c.values[0]) for c in EQUIVALENCE_CASES]
    golds = [c.values[1] for c in EQUIVALENCE_CASES]
    expected = [c.values[2] for c in EQUIVALENCE_CASES]
    verifier = MathVerifier(num_workers=2, timeout=VERDICT_TIMEOUT)
    try:
        assert verifier.score_many(completions, golds) == expected
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
        ["\\boxed{42}", "\\boxed{42}"], [42, 41], timeout=VERDICT_TIMEOUT, prompts=["q1", "q2"], trainer_state=None
    )
    assert rewards == [1.0, 0.0]


def test_accuracy_reward_length_mismatch_raises():
    with pytest.raises(ValueError, match="2 completions but 1 solutions"):
        accuracy_reward(["\\boxed{1}", "\\boxed{2}"], ["1"], timeout=VERDICT_TIMEOUT)


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
    assert accuracy_reward([completion], [gold], timeout=VERDICT_TIMEOUT) == [expected]
    # none of these has a <think> block, so none is well formatted
    assert format_reward([completion]) == [0.0]


@pytest.mark.parametrize(
    "completion",
    [
        pytest.param(POWER_TOWER, id="power-tower"),
        pytest.param("\\boxed{2^{2^{2^{2^{2^{2}}}}}}", id="power-tower-of-twos"),
        pytest.param("<think>compute</think> " + POWER_TOWER, id="power-tower-well-formatted"),
    ],
)
def test_power_tower_is_cut_off_and_counted(completion, hang_verifier):
    # it returns at all only because it was cut off: sympy would compute for minutes
    assert hang_verifier.score(completion, "1", timeout=HANG_LIMIT) == 0.0
    assert hang_verifier.pop_timeouts() == 1
    # and the verifier still answers correctly afterwards
    assert hang_verifier.score_many(["\\boxed{42}", "\\boxed{43}"], ["42", "42"]) == [1.0, 0.0]
    assert hang_verifier.pop_timeouts() == 0


def test_megabyte_completions():
    # that they cost no more than short ones is test_parse_window_is_the_last_max_parsed_chars
    completions = [MEGABYTE + "\\boxed{42}", "<think>" + MEGABYTE + "</think> \\boxed{42}", " " * 2**20]
    assert accuracy_reward(completions, ["42", "42", "42"], timeout=VERDICT_TIMEOUT) == [1.0, 1.0, 0.0]
    assert format_reward(completions) == [0.0, 1.0, 0.0]


def test_parse_window_is_the_last_max_parsed_chars():
    answer = "\\boxed{42}"
    inside = "x " * 10 + answer + "." * (MAX_PARSED_CHARS - len(answer) - 1)
    outside = answer + "." * MAX_PARSED_CHARS
    assert accuracy_reward([inside, outside], ["42", "42"], timeout=VERDICT_TIMEOUT) == [1.0, 0.0]


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
# Bounded time: a check that overruns is cut off, counted, and replaced by a warm spare worker

# More power towers: each keeps sympy busy for minutes (checked under a 2 GiB memory limit)
HANGS = ["\\boxed{10^{10^{10}}}", "\\boxed{9^{9^{9^{9}}}}", "\\boxed{2^{2^{2^{2^{2^{2}}}}}}"]


@pytest.fixture(scope="module")
def hang_verifier():
    verifier = MathVerifier(num_workers=1, timeout=VERDICT_TIMEOUT)
    verifier.pop_timeouts()
    yield verifier
    verifier.close()


def test_overruns_in_a_parallel_batch_touch_only_their_own_items_and_are_counted_exactly():
    verifier = MathVerifier(num_workers=2, timeout=HANG_LIMIT)
    try:
        preds = ["\\boxed{1}", POWER_TOWER, "\\boxed{3}", HANGS[0], "\\boxed{4}", "\\boxed{6}", HANGS[1], HANGS[2]]
        golds = ["1", "1", "3", "1", "4", "5", "1", "1"]
        assert verifier.score_many(preds, golds) == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
        assert verifier.pop_timeouts() == 4 and verifier.pop_timeouts() == 0
        assert verifier.timeouts == 4
    finally:
        verifier.close()


# Loaded into each worker started while `_shim_workers` is on (as sitecustomize): every check takes
# `delay` seconds longer, as on a loaded machine, and a check of a completion containing STUCK never
# ends and cannot be interrupted, as C code that never checks for signals.
WORKER_SHIM = """
import signal
import time

import rewards.math_check as math_check

_check = math_check.check_answer


def _shimmed_check(pred, gold, *args, **kwargs):
    if "STUCK" in pred:
        signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGALRM}})
        time.sleep(600)
    time.sleep({delay})
    return _check(pred, gold, *args, **kwargs)


math_check.check_answer = _shimmed_check
"""


def _shim_workers(tmp_path, monkeypatch, delay: float = 0.0) -> None:
    (tmp_path / "sitecustomize.py").write_text(WORKER_SHIM.format(delay=delay))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))


def test_verdicts_hold_when_every_check_is_slow(tmp_path, monkeypatch):
    """A loaded machine, simulated: each check in the worker takes 3.5 s longer (more than the 3 s
    limit these tests once used, and failed by on busy machines); the verdicts do not change."""
    _shim_workers(tmp_path, monkeypatch, delay=3.5)
    verifier = MathVerifier(num_workers=1, timeout=VERDICT_TIMEOUT, spares=0)
    try:
        assert verifier.score("\\boxed{x^2+2x+1}", "(x+1)^2") == 1.0
        assert verifier.timeouts == 0
    finally:
        verifier.close()


def _wait_until(condition, failure: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{failure} (waited {seconds:g} s)"
        time.sleep(0.05)


def _record_worker_starts(monkeypatch) -> list:
    """Every worker started, appended when it is ready; `started_by` names the thread that started it."""
    import rewards.verifier as verifier_module

    starts = []

    class RecordedWorker(verifier_module._Worker):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.started_by = threading.current_thread().name
            starts.append(self)

    monkeypatch.setattr(verifier_module, "_Worker", RecordedWorker)
    return starts


def test_a_power_tower_is_cut_off_by_its_own_worker_which_stays(monkeypatch):
    starts = _record_worker_starts(monkeypatch)
    verifier = MathVerifier(num_workers=1, timeout=HANG_LIMIT, spares=0)
    try:
        assert verifier.score("\\boxed{1}", "1") == 1.0
        assert len(starts) == 1
        for hang in [POWER_TOWER, *HANGS]:
            assert verifier.score(hang, "1") == 0.0
        assert verifier.score("\\boxed{42}", "42") == 1.0
        assert verifier.timeouts == 4
        assert len(starts) == 1  # no worker was killed, so none was started: each time-out cost its limit
    finally:
        verifier.close()


def test_a_stuck_worker_is_replaced_by_a_warm_spare_not_a_cold_start(tmp_path, monkeypatch):
    _shim_workers(tmp_path, monkeypatch)
    starts = _record_worker_starts(monkeypatch)
    verifier = MathVerifier(num_workers=1, timeout=HANG_LIMIT)
    try:
        assert verifier.score("\\boxed{1}", "1") == 1.0
        _wait_until(lambda: len(starts) == 2, "no spare worker was started")  # the worker and its spare
        assert verifier.score("STUCK", "1") == 0.0
        assert starts[0].proc.returncode == -signal.SIGKILL  # killed by us, not at its own later deadline
        assert verifier.score("\\boxed{42}", "42") == 1.0  # on the spare, which was ready
        assert (verifier.timeouts, verifier.restarts, verifier.cold_starts) == (1, 1, 0)
        _wait_until(lambda: len(starts) == 3, "the spare was not replaced")  # in the background
        # the caller never waited for a start
        assert threading.current_thread().name not in [w.started_by for w in starts]
    finally:
        verifier.close()


def test_a_check_that_waits_for_its_worker_to_start_is_counted_as_a_cold_start(tmp_path, monkeypatch):
    _shim_workers(tmp_path, monkeypatch)
    verifier = MathVerifier(num_workers=1, timeout=HANG_LIMIT, spares=0)  # replacements start when needed
    try:
        verifier.start()
        assert verifier.score("STUCK", "1") == 0.0
        assert verifier.score("\\boxed{42}", "42") == 1.0  # waited for the replacement's start
        assert verifier.score("\\boxed{43}", "42") == 0.0  # its worker was ready
        assert (verifier.timeouts, verifier.restarts, verifier.cold_starts) == (1, 1, 1)
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


def _flaky_workers(monkeypatch):
    import rewards.verifier as verifier_module

    class FlakyWorker(verifier_module._Worker):
        fail_next_start = False

        def __init__(self, memory_limit_mb):
            if FlakyWorker.fail_next_start:
                FlakyWorker.fail_next_start = False
                raise RuntimeError("the math verification worker did not start")
            super().__init__(memory_limit_mb)

    monkeypatch.setattr(verifier_module, "_Worker", FlakyWorker)
    return FlakyWorker


def test_failed_worker_restart_keeps_the_pool_slot(tmp_path, monkeypatch):
    """A replacement worker that fails to start must not shrink the pool to nothing (a deadlock)."""
    _shim_workers(tmp_path, monkeypatch)
    flaky = _flaky_workers(monkeypatch)
    verifier = MathVerifier(num_workers=1, timeout=VERDICT_TIMEOUT, spares=0)
    try:
        assert verifier.score("\\boxed{1}", "1") == 1.0
        flaky.fail_next_start = True
        assert _call_with_deadline(verifier.score, "STUCK", "1", HANG_LIMIT) == ("value", 0.0)
        kind, error = _call_with_deadline(verifier.score, "\\boxed{2}", "2")  # the restart fails
        assert kind == "error" and isinstance(error, RuntimeError)
        assert _call_with_deadline(verifier.score, "\\boxed{3}", "3") == ("value", 1.0)
        assert verifier.timeouts == 1
    finally:
        verifier.close()


def test_a_spare_that_failed_to_start_is_reported_when_needed_and_replaced(tmp_path, monkeypatch):
    _shim_workers(tmp_path, monkeypatch)
    flaky = _flaky_workers(monkeypatch)
    verifier = MathVerifier(num_workers=1, timeout=VERDICT_TIMEOUT, spares=1)
    try:
        verifier.start()
        flaky.fail_next_start = True  # the spare started after the next time-out fails
        assert _call_with_deadline(verifier.score, "STUCK", "1", HANG_LIMIT) == ("value", 0.0)
        assert _call_with_deadline(verifier.score, "\\boxed{2}", "2") == ("value", 1.0)  # on the first spare
        assert _call_with_deadline(verifier.score, "STUCK", "1", HANG_LIMIT) == ("value", 0.0)
        kind, error = _call_with_deadline(verifier.score, "\\boxed{3}", "3")  # the failed spare's turn
        assert kind == "error" and isinstance(error, RuntimeError)
        assert _call_with_deadline(verifier.score, "\\boxed{4}", "4") == ("value", 1.0)
        assert verifier.timeouts == 2
    finally:
        verifier.close()


# ---------------------------------------------------------------------------------------------
# Workers never outlive what started them


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat fields from the state on (state, ppid, ..., utime, stime), or None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _children(pid: int) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and (_stat(int(p)) or [None, None])[1] == str(pid)]


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"  # a zombie has exited; only its reaper is missing


def _cpu_seconds(pid: int) -> float:
    stat = _stat(pid)
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK") if stat else 0.0


PARENT = """
import sys

from rewards.verifier import MathVerifier

verifier = MathVerifier(num_workers=1, timeout=600)
verifier.score("\\\\boxed{1}", "1")
print("checking", flush=True)
verifier.score(sys.argv[1], "1")
"""


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc; the parent-death signal is Linux's")
def test_workers_die_when_their_parent_is_killed():
    root = Path(__file__).resolve().parents[2]
    parent = subprocess.Popen([sys.executable, "-c", PARENT, POWER_TOWER], stdout=subprocess.PIPE, text=True,
                              cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    workers = []
    try:
        assert parent.stdout.readline().strip() == "checking"
        # the worker is inside the power tower once it has used more CPU than a start and a check ever do
        _wait_until(lambda: any(_cpu_seconds(c) > 3 for c in _children(parent.pid)), "no worker is checking")
        workers = _children(parent.pid)
        parent.kill()  # as a trainer stopped by SIGKILL or SIGTERM: no cleanup runs
        parent.wait()
        _wait_until(lambda: not any(_alive(w) for w in workers), "a worker outlived its parent", seconds=10)
    finally:
        parent.kill()
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)


def test_workers_outlive_the_short_lived_thread_that_first_called():
    # the parent-death signal follows the thread that started a worker: a reward called from a
    # thread that then ends (TRL's, GuardedReward's) must not take the workers with it
    verifier = MathVerifier(num_workers=1, timeout=VERDICT_TIMEOUT)
    try:
        assert _call_with_deadline(verifier.score, "\\boxed{1}", "1") == ("value", 1.0)
        time.sleep(0.5)  # the signal, if armed for that thread, arrives as soon as it ends
        assert verifier.score("\\boxed{2}", "2") == 1.0
        assert verifier.restarts == 0
    finally:
        verifier.close()


def test_a_worker_nobody_kills_ends_a_stuck_check_itself(tmp_path, monkeypatch):
    """Without a parent to kill it (and without Linux's parent-death signal), a worker stuck where
    its own timer cannot stop it still ends at its deadline: twice the check's limit plus a second."""
    from rewards.verifier import _Worker

    _shim_workers(tmp_path, monkeypatch)
    worker = _Worker(memory_limit_mb=2048)
    try:
        assert worker.check("\\boxed{2}", "2", timeout=VERDICT_TIMEOUT) == (1.0, False)  # it stays after a check
        assert worker.check(POWER_TOWER, "1", timeout=0.5) == (0.0, True)  # and after a time-out
        worker.proc.stdin.write(json.dumps({"pred": "STUCK", "gold": "1", "timeout": 0.5}) + "\n")
        worker.proc.stdin.flush()
        assert worker.proc.wait(timeout=60) == 1  # faulthandler's exit, not the 600 s the check would take
    finally:
        worker.kill()


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
        ({"spares": -1}, "spares must be >= 0, got -1"),
    ],
)
def test_verifier_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MathVerifier(**kwargs)


def test_score_many_length_mismatch_raises():
    verifier = MathVerifier(num_workers=1, timeout=VERDICT_TIMEOUT)
    with pytest.raises(ValueError, match="got 2 predictions but 1 gold answers"):
        verifier.score_many(["1", "2"], ["1"])
    with pytest.raises(ValueError, match="got 0 predictions but 1 gold answers"):
        verifier.score_many([], ["1"])
    verifier.close()


def test_get_verifier_is_shared_and_rebuilt_on_new_settings():
    first = get_verifier(1, VERDICT_TIMEOUT)
    assert get_verifier(1, VERDICT_TIMEOUT) is first
    other = get_verifier(1, VERDICT_TIMEOUT + 1)
    assert other is not first and (other.num_workers, other.timeout) == (1, VERDICT_TIMEOUT + 1)
    restored = get_verifier(1, VERDICT_TIMEOUT)
    assert (restored.num_workers, restored.timeout) == (1, VERDICT_TIMEOUT)
    assert accuracy_reward(["\\boxed{42}"], ["42"], timeout=VERDICT_TIMEOUT) == [1.0]


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
    return accuracy_reward(completions, golds, timeout=VERDICT_TIMEOUT)


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
    verifier = MathVerifier(num_workers=2, timeout=VERDICT_TIMEOUT)
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
    acc = accuracy_reward([completion, chat(completion)], [gold, gold], timeout=VERDICT_TIMEOUT)
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
