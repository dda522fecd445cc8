"""Child process behind `rewards.verifier`: reads {"pred","gold","timeout"} JSON lines, answers
{"score", "timed_out"}. Any exception scores 0.

Each check is bounded here, by one interval timer over the whole check: its handler raises
between two bytecodes or inside CPython's own long loops (a big-int power checks for signals), so
a power tower such as `10^{10^{10}}` ends a few milliseconds after its limit and the worker answers
`timed_out` and stays warm. math-verify's own timers are left off: they count whole seconds, once
per parse and once more for the comparison. Only a check stuck where no signal is seen (C code that
never checks) leaves the parent to kill this process.

A worker must not outlive its trainer. A trainer stopped by SIGTERM or SIGKILL runs no cleanup, and
a worker inside a long check would keep a core busy, reparented, until the check ends. Two guards:
- Linux: the kernel sends this process SIGKILL when the thread that started it exits
  (`PR_SET_PDEATHSIG`);
- everywhere: a check that runs past `deadline(limit)` ends the process. The timer is faulthandler's,
  which runs in a C thread: a Python watchdog thread could not run while a check holds the
  interpreter lock, as a big-int power does.
"""

from __future__ import annotations

import ctypes
import faulthandler
import json
import logging
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


class Overran(BaseException):
    """Raised by the timer. Not an Exception: math-verify and sympy catch those and go on."""


def _overran(signum, frame):
    raise Overran


def _limit_memory() -> None:
    try:
        import resource

        limit = int(os.environ.get("REFT_VERIFY_MEMORY_MB", "2048")) * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):
        pass  # not Linux/macOS: the parent's timeout still bounds the time


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass  # the per-check deadline still bounds a worker left behind
    parent = int(os.environ.get("REFT_VERIFY_PARENT_PID", "0"))
    if parent and os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def deadline(limit: float) -> float:
    """Seconds after which a check ends its worker: well after the parent's own kill."""
    return 2 * limit + 1


def _check(check_answer, req: dict, devnull) -> tuple[float, bool]:
    limit = float(req["timeout"])
    faulthandler.dump_traceback_later(deadline(limit), exit=True, file=devnull)
    try:
        if hasattr(signal, "setitimer"):
            signal.setitimer(signal.ITIMER_REAL, limit)
        return check_answer(req["pred"], req["gold"]), False
    except Overran:
        return 0.0, True
    finally:
        if hasattr(signal, "setitimer"):
            signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()


def main() -> None:
    _die_with_parent()
    logging.disable(logging.CRITICAL)  # math-verify logs every unparsable input
    sys.setrecursionlimit(5000)
    from rewards.math_check import check_answer

    _limit_memory()
    if hasattr(signal, "SIGALRM"):
        signal.signal(signal.SIGALRM, _overran)
    # The first parse builds math-verify's parsers and sympy's caches (up to seconds on a busy
    # machine): do it before "ready", so no real check is cut off for the worker's own warm-up.
    check_answer("\\boxed{1}", "1")
    print("ready", flush=True)
    devnull = open(os.devnull, "w")  # noqa: SIM115 - faulthandler writes its traceback here
    for line in sys.stdin:
        try:
            score, timed_out = _check(check_answer, json.loads(line), devnull)
        except Overran:  # the timer fired as the check returned
            score, timed_out = 0.0, True
        except BaseException:  # noqa: BLE001 - model output must never crash the worker
            score, timed_out = 0.0, False
        print(json.dumps({"score": score, "timed_out": timed_out}), flush=True)


if __name__ == "__main__":
    main()
