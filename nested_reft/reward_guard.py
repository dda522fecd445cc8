"""Reward functions that cost one sample, not the run, when they fail.

TRL calls each reward function once per generation round on the whole batch; one exception (a
user's parser meeting an odd completion) or one hang (a regex or a network call that never
returns) stops a run that may have trained for hours. `GuardedReward` calls the batch in a
thread with a time limit; if the batch call raises, overruns or returns the wrong number of
scores, it scores each sample alone under the same limit, and a sample that still fails scores 0.
Failures are counted; the trainer logs them per round as `rewards/<name>/failed`. A reward that
bounds its own checks in time (`rewards.math.accuracy_reward`) counts the checks it cut off;
`pop_timeouts()` passes that count on, for `rewards/<name>/timeouts`.
"""

from __future__ import annotations

import logging
import threading

from trl.trainer.utils import get_callable_name

logger = logging.getLogger(__name__)


class RewardTimeout(Exception):
    pass


def call_with_timeout(func, timeout_s: float, **kwargs):
    """`func(**kwargs)` in a daemon thread; RewardTimeout if it is not done in `timeout_s` (the
    thread is then abandoned: Python cannot stop it, but it no longer holds up training)."""
    result: dict = {}

    def target():
        try:
            result["value"] = func(**kwargs)
        except BaseException as e:  # noqa: BLE001  (re-raised in the caller's thread)
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True, name=f"reward-{get_callable_name(func)}")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise RewardTimeout(f"{get_callable_name(func)} did not return within {timeout_s:g} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


class GuardedReward:
    """Wraps a synchronous reward function `f(prompts, completions, completion_ids, **columns)`."""

    def __init__(self, func, timeout_s: float = 120.0):
        if not timeout_s > 0:
            raise ValueError(f"reward timeout must be > 0 seconds, got {timeout_s!r}")
        self.func, self.timeout_s = func, timeout_s
        self.__name__ = get_callable_name(func)
        self.failed = 0  # samples scored 0 because their reward could not be computed, since the last pop

    def pop_failures(self) -> int:
        failed, self.failed = self.failed, 0
        return failed

    def pop_timeouts(self) -> int | None:
        """Checks the wrapped reward cut off at its own time limit since the last call (each scored 0),
        or None when it keeps no such count (it has no `pop_timeouts`)."""
        pop = getattr(self.func, "pop_timeouts", None)
        return pop() if callable(pop) else None

    def __call__(self, prompts, completions, completion_ids=None, **kwargs):
        n = len(completions)
        try:
            scores = call_with_timeout(self.func, self.timeout_s, prompts=prompts, completions=completions,
                                       completion_ids=completion_ids, **kwargs)
            if scores is not None and len(scores) == n:
                return list(scores)
            problem = f"returned {None if scores is None else len(scores)} scores for {n} completions"
        except Exception as e:  # noqa: BLE001
            problem = f"{type(e).__name__}: {e}"
        logger.warning("reward %s failed on a batch of %d (%s); scoring its samples one by one", self.__name__, n,
                       problem)
        return [self._one(i, prompts, completions, completion_ids, kwargs, n) for i in range(n)]

    def _one(self, i, prompts, completions, completion_ids, kwargs, n):
        # per-sample columns are lists of length n; trainer_state, log_metric, ... are passed as they are
        columns = {k: [v[i]] if isinstance(v, list) and len(v) == n else v for k, v in kwargs.items()}
        try:
            score = call_with_timeout(self.func, self.timeout_s, prompts=[prompts[i]], completions=[completions[i]],
                                      completion_ids=None if completion_ids is None else [completion_ids[i]],
                                      **columns)
            if len(score) == 1:
                return score[0]
            problem = f"returned {len(score)} scores for 1 completion"
        except Exception as e:  # noqa: BLE001
            problem = f"{type(e).__name__}: {e}"
        self.failed += 1
        logger.warning("reward %s failed on sample %d (%s): scored 0", self.__name__, i, problem)
        return 0.0
