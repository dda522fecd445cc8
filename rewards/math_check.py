"""One answer check with math-verify: gold normalisation, answer extraction, equivalence.

Runs inside the verification worker (see `verifier.py`); importable on its own for tests. Uses
the same extraction settings as `trl.rewards.accuracy_reward`, plus what it lacks: GSM8K `####`
golds and answers, plain-number golds, and a cap on how much text is parsed.
"""

from __future__ import annotations

import re

from latex2sympy2_extended import NormalizationConfig
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

# Final answers sit at the end of a completion; parsing a megabyte of text gains nothing.
MAX_PARSED_CHARS = 4000

_HASHES = re.compile(r"####\s*([^\n]*)")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")

GOLD_CONFIG = [LatexExtractionConfig(), ExprExtractionConfig()]
PRED_CONFIG = [
    LatexExtractionConfig(
        # malformed_operators as for golds: else '\sqrt 8' parses as 8 and '\frac12 + 1' as 1
        normalization_config=NormalizationConfig(units=True, malformed_operators=True),
        boxed_match_priority=0,  # a \boxed{} answer wins over any other candidate
    ),
    ExprExtractionConfig(),
]


def normalize_gold(gold: str) -> str:
    """GSM8K golds ('... #### 1,234') become '1234'; other golds pass through unchanged."""
    m = _HASHES.findall(gold)
    if m:  # only a GSM8K answer is a bare number; elsewhere '(1,100)' is a tuple, not 1100
        gold = _THOUSANDS.sub("", m[-1])
    gold = gold.strip()
    if "$" not in gold and "\\boxed" not in gold:
        gold = f"${gold}$"  # bare LaTeX ('\\frac34') is only found between math delimiters
    return gold


def _prepare_pred(pred: str) -> str:
    if len(pred) > MAX_PARSED_CHARS:
        pred = pred[-MAX_PARSED_CHARS:]
    m = _HASHES.findall(pred)
    if m:  # a GSM8K-style final line counts as the final answer
        pred = pred + " \\boxed{" + _THOUSANDS.sub("", m[-1].strip()) + "}"
    return pred


def check_answer(pred: str, gold: str, timeout: float | None = None) -> float:
    """1.0 if the final answer of `pred` is mathematically equivalent to `gold`, else 0.0.

    `timeout` uses math-verify's own signal timers (whole seconds, one per parse and one for the
    comparison), so pass it only from a main thread. The verification worker leaves it None and
    bounds the whole check with one timer of its own.
    """
    seconds = max(1, int(round(timeout))) if timeout else None
    gold_parsed = parse(normalize_gold(gold), GOLD_CONFIG, parsing_timeout=seconds)
    if not gold_parsed:
        return 0.0
    pred_parsed = parse(_prepare_pred(pred), PRED_CONFIG, "first_match", parsing_timeout=seconds)
    if not pred_parsed:
        return 0.0
    return float(verify(gold_parsed, pred_parsed, timeout_seconds=seconds))
