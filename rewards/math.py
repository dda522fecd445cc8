"""Math rewards with TRL's reward-function signature: `f(completions, solution, **kwargs)`.

- `accuracy_reward`: math-verify equivalence of the completion's final answer with the gold,
  each check bounded in time in a killable worker process (see `verifier.py`).
- `format_reward`: one reasoning block, then exactly one final `\\boxed{}` answer.

Neither ever raises on model output: anything unreadable scores 0.
"""

from __future__ import annotations

import os
import re
import threading

from .completions import completion_text
from .verifier import MathVerifier

DEFAULT_TIMEOUT_S = float(os.environ.get("REFT_VERIFY_TIMEOUT", "1.0"))

_verifier: MathVerifier | None = None
_verifier_lock = threading.Lock()


def get_verifier(num_workers: int = 1, timeout: float = DEFAULT_TIMEOUT_S) -> MathVerifier:
    """The process-wide verifier, rebuilt if asked for another size or timeout."""
    global _verifier
    with _verifier_lock:  # reward functions may be called from several threads at once
        if _verifier is None or (_verifier.num_workers, _verifier.timeout) != (num_workers, timeout):
            if _verifier is not None:
                _verifier.close()
            _verifier = MathVerifier(num_workers=num_workers, timeout=timeout)
        return _verifier


def pop_timeouts() -> int:
    """How many `accuracy_reward` checks were cut off at their time limit since the last call.

    Each scored 0, but it is not a wrong answer: a trainer logs this per step beside the reward
    (`rewards/accuracy_reward/timeouts`). Also reachable as `accuracy_reward.pop_timeouts()`.
    Counts start again when the verifier is rebuilt for another size or time limit.
    """
    with _verifier_lock:
        return _verifier.pop_timeouts() if _verifier is not None else 0


def accuracy_reward(completions, solution, *, timeout: float | None = None, num_workers: int = 1,
                    **kwargs) -> list[float]:
    """1.0 where the completion's final answer equals the gold `solution`, else 0.0.

    Golds may be plain answers ('42', '\\frac{1}{2}', '(1, 2]'), GSM8K answers ending in
    '#### 42', or MATH solutions containing `\\boxed{}`. Each check takes at most `timeout`
    seconds (default 1 s, or `$REFT_VERIFY_TIMEOUT`).
    """
    preds = [completion_text(c) for c in completions]
    golds = [g if isinstance(g, str) else str(g) for g in solution]
    if len(preds) != len(golds):
        raise ValueError(f"got {len(preds)} completions but {len(golds)} solutions")
    verifier = get_verifier(num_workers, DEFAULT_TIMEOUT_S if timeout is None else timeout)
    return verifier.score_many(preds, golds)


accuracy_reward.pop_timeouts = pop_timeouts  # reward wrappers (GuardedReward) look for it on the function


_THINK = re.compile(r"\A\s*<think>(?P<reasoning>.*?)</think>(?P<after>.*)\Z", re.DOTALL)


def _has_one_boxed(text: str) -> bool:
    """Exactly one `\\boxed{...}` with balanced braces, and nothing but punctuation after it."""
    if text.count("\\boxed") != 1:
        return False
    start = text.index("\\boxed") + len("\\boxed")
    if not text.startswith("{", start):
        return False
    depth = 0
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            content, rest = text[start + 1 : i], text[i + 1 :]
            return bool(content.strip()) and rest.strip(" \t\n.$") == ""
    return False


def is_well_formatted(text: str) -> bool:
    m = _THINK.match(text)
    if m is None or "<think>" in m["reasoning"] or "<think>" in m["after"] or "</think>" in m["after"]:
        return False
    return bool(m["reasoning"].strip()) and _has_one_boxed(m["after"])


def format_reward(completions, **kwargs) -> list[float]:
    """1.0 for `<think>reasoning</think> ... \\boxed{answer}` (one of each, answer last), else 0.0."""
    return [float(is_well_formatted(completion_text(c))) for c in completions]
