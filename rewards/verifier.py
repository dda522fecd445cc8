"""Bounded-time math verification in worker processes.

math-verify's own timeout uses `signal.alarm`, which works only in a process's main thread, and a
memory bomb or a check stuck in C code must not take the trainer with it. So each check runs in a
persistent child process (`_verify_worker.py`), from any thread of any process:

- the worker bounds each check itself with a timer and answers "timed out" at the limit, staying
  warm: a time-out costs its limit and nothing more;
- a worker that gives no answer within the limit plus `KILL_GRACE_S` (stuck where no signal is seen,
  or dead) is killed, and a spare started ahead of time takes its place: starting one means
  importing sympy and math-verify (0.5 s on a quiet machine, over 10 s on a loaded one), which a
  check should not wait for;
- workers die with the process that started them.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import select
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

logger = logging.getLogger(__name__)

_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)
_START_TIMEOUT_S = 120.0
# How long past its limit a worker may take to answer "timed out" before it is killed: its timer
# fires at the limit, and a busy machine may be slow to run it and pass the answer back. Only a
# stuck worker ever waits this long.
KILL_GRACE_S = 1.0


class _Worker:
    """One `python -m rewards._verify_worker` child speaking JSON lines on stdin/stdout."""

    def __init__(self, memory_limit_mb: int):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_PARENT, env.get("PYTHONPATH")]))
        env["REFT_VERIFY_MEMORY_MB"] = str(memory_limit_mb)
        env["REFT_VERIFY_PARENT_PID"] = str(os.getpid())
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-m", "rewards._verify_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
        )
        line = self._read_line(_START_TIMEOUT_S)
        if line is None or line.strip() != "ready":
            self.kill()
            raise RuntimeError("the math verification worker did not start (is math-verify installed?)")

    def _read_line(self, timeout: float) -> str | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        return self.proc.stdout.readline() or None

    def check(self, pred: str, gold: str, timeout: float) -> tuple[float, bool] | None:
        """(score, timed out), or None when the worker gave no answer in time or died: it must be
        killed and replaced."""
        try:
            self.proc.stdin.write(json.dumps({"pred": pred, "gold": gold, "timeout": timeout}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return None
        line = self._read_line(timeout + KILL_GRACE_S)
        if line is None:
            return None
        try:
            answer = json.loads(line)
            return float(answer["score"]), bool(answer["timed_out"])
        except (ValueError, KeyError, TypeError):
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class MathVerifier:
    """A pool of verification workers; `score_many` checks pairs in parallel, one per worker.

    `spares`: workers kept started and idle to replace one that is killed (0: a replacement starts
    when it is needed, and the next check on its slot waits for it). Counters, since the start:
    `timeouts` (checks cut off at the limit: scored 0, but not wrong answers; `pop_timeouts()`
    gives those since its last call), `restarts` (workers killed and replaced) and `cold_starts`
    (checks that waited for a replacement to start).

    Thread-safe. After `fork`, the child builds its own workers on first use.
    """

    def __init__(self, num_workers: int = 1, timeout: float = 1.0, memory_limit_mb: int = 2048,
                 spares: int = 1):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        if spares < 0:
            raise ValueError(f"spares must be >= 0, got {spares!r}")
        self.num_workers = num_workers
        self.timeout = float(timeout)
        self.memory_limit_mb = memory_limit_mb
        self.spares = spares
        self.timeouts = 0
        self.restarts = 0
        self.cold_starts = 0
        self._timeouts_unpopped = 0
        self._pid = None
        # a slot holds a _Worker, a Future of one (a replacement), or None (its start failed: retry)
        self._idle: queue.Queue = queue.Queue()
        self._spares: collections.deque[Future] = collections.deque()
        self._launcher: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _launch(self) -> Future:
        return self._launcher.submit(_Worker, self.memory_limit_mb)

    def _ensure_started(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                return
            # Every worker is started from this one long-lived thread: a worker's parent-death signal
            # fires when the *thread* that started it exits, and rewards are often called from short-lived
            # threads. Workers inherited through fork belong to the parent, so they are not touched.
            self._launcher = ThreadPoolExecutor(1, thread_name_prefix="math-verify-start")
            self._idle = queue.Queue()
            for worker in [self._launch() for _ in range(self.num_workers)]:
                self._idle.put(worker.result())
            self._spares = collections.deque(self._launch() for _ in range(self.spares))
            self._pid = os.getpid()

    def start(self) -> None:
        """Start the workers and the spares now, and wait until all are ready (else: on first use)."""
        self._ensure_started()
        with self._lock:
            spares = list(self._spares)
        for spare in spares:
            spare.exception()  # waits; a failed start is reported when the spare is needed

    def _next_spare(self) -> Future:
        """A replacement: the oldest spare, topped up in the background (a fresh start when spares=0)."""
        with self._lock:
            self._spares.append(self._launch())
            return self._spares.popleft()

    def _take(self) -> _Worker:
        """A worker from the pool; if its slot holds a replacement still starting, wait for it."""
        slot = self._idle.get()
        try:
            if slot is None:  # the last replacement failed to start: try another
                slot = self._next_spare()
            if isinstance(slot, _Worker):
                if slot.proc.poll() is None:
                    return slot
                slot = self._next_spare()  # it died while idle (killed from outside): replace it first
                with self._lock:
                    self.restarts += 1
            if not slot.done():
                with self._lock:
                    self.cold_starts += 1
            return slot.result()
        except BaseException:
            self._idle.put(None)  # the slot stays in the pool, else the next check would wait forever
            raise

    def score(self, pred: str, gold: str, timeout: float | None = None) -> float:
        """1.0 or 0.0; 0.0 also when the check takes longer than `timeout` (default: the verifier's)."""
        self._ensure_started()
        worker = self._take()
        slot = worker
        try:
            answer = worker.check(pred, gold, self.timeout if timeout is None else timeout)
            if answer is None:  # stuck or dead: the warm spare takes its slot
                logger.debug("verification worker gave no answer in time: killed, a spare takes its place")
                slot = None
                worker.kill()
                slot = self._next_spare()
                answer = (0.0, True)
                with self._lock:
                    self.restarts += 1
            score, timed_out = answer
            if timed_out:
                with self._lock:
                    self.timeouts += 1
                    self._timeouts_unpopped += 1
        finally:
            self._idle.put(slot)
        return score

    def score_many(self, preds: list[str], golds: list[str], timeout: float | None = None) -> list[float]:
        if len(preds) != len(golds):
            raise ValueError(f"got {len(preds)} predictions but {len(golds)} gold answers")
        self._ensure_started()
        if self.num_workers == 1 or len(preds) <= 1:
            return [self.score(p, g, timeout) for p, g in zip(preds, golds, strict=True)]
        with ThreadPoolExecutor(self.num_workers) as pool:
            return list(pool.map(self.score, preds, golds, [timeout] * len(preds)))

    def pop_timeouts(self) -> int:
        """Checks cut off at the time limit since the last call (each scored 0; not wrong answers)."""
        with self._lock:
            count, self._timeouts_unpopped = self._timeouts_unpopped, 0
        return count

    def close(self) -> None:
        with self._lock:
            slots, launcher = [], None
            if self._pid == os.getpid():
                while not self._idle.empty():
                    slots.append(self._idle.get())
                slots += self._spares
                self._spares.clear()
                launcher = self._launcher
            self._pid = None
        if launcher is not None:
            launcher.shutdown(wait=True, cancel_futures=True)
        for slot in slots:
            if isinstance(slot, Future):
                slot = None if slot.cancelled() or slot.exception() is not None else slot.result()
            if slot is not None:
                slot.kill()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
