"""Child process behind `rewards.verifier`: reads {"pred","gold","timeout"} JSON lines, answers
{"score"}. Any exception scores 0; the parent kills this process if it overruns."""

from __future__ import annotations

import json
import logging
import os
import sys


def _limit_memory() -> None:
    try:
        import resource

        limit = int(os.environ.get("REFT_VERIFY_MEMORY_MB", "2048")) * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):
        pass  # not Linux/macOS: the parent's timeout still bounds the time


def main() -> None:
    logging.disable(logging.CRITICAL)  # math-verify logs every unparsable input
    sys.setrecursionlimit(5000)
    from rewards.math_check import check_answer

    _limit_memory()
    # The first parse builds math-verify's parsers and sympy's caches (up to seconds on a busy
    # machine): do it before "ready", so no real check is cut off for the worker's own warm-up.
    check_answer("\\boxed{1}", "1")
    print("ready", flush=True)
    for line in sys.stdin:
        try:
            req = json.loads(line)
            score = check_answer(req["pred"], req["gold"], timeout=req.get("timeout"))
        except BaseException:  # noqa: BLE001 - model output must never crash the worker
            score = 0.0
        print(json.dumps({"score": score}), flush=True)


if __name__ == "__main__":
    main()
