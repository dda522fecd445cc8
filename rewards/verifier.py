"""Bounded-time math verification in killable worker processes.

math-verify's own timeout uses `signal.alarm`, which works only in a process's main thread and
cannot interrupt C code (sympy evaluating `10**(10**10)` holds the interpreter in a single big-int
operation). Each check here runs in a persistent child process instead: the caller waits at most
`timeout` seconds for the answer, and a worker that overruns is killed and replaced. This works
from any thread of any process, and a memory bomb hits the worker's own memory limit, not ours.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import select
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

logger = logging.getLogger(__name__)

_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)
_START_TIMEOUT_S = 120.0


class _Worker:
    """One `python -m rewards._verify_worker` child speaking JSON lines on stdin/stdout."""

    def __init__(self, memory_limit_mb: int):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_PARENT, env.get("PYTHONPATH")]))
        env["REFT_VERIFY_MEMORY_MB"] = str(memory_limit_mb)
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

    def check(self, pred: str, gold: str, timeout: float) -> float | None:
        """Score in [0, 1], or None when the worker overran or died (it must then be replaced)."""
        try:
            self.proc.stdin.write(json.dumps({"pred": pred, "gold": gold, "timeout": timeout}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return None
        line = self._read_line(timeout)
        if line is None:
            return None
        try:
            return float(json.loads(line)["score"])
        except (ValueError, KeyError, TypeError):
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class MathVerifier:
    """A pool of verification workers; `score_many` checks pairs in parallel, one per worker.

    Thread-safe. After `fork`, the child builds its own workers on first use.
    """

    def __init__(self, num_workers: int = 1, timeout: float = 1.0, memory_limit_mb: int = 2048):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.num_workers = num_workers
        self.timeout = float(timeout)
        self.memory_limit_mb = memory_limit_mb
        self.timeouts = 0  # how many checks were cut off (a diagnostic)
        self._pid = None
        self._idle: queue.Queue[_Worker | None] = queue.Queue()  # None: to be (re)started
        self._lock = threading.Lock()

    def _ensure_started(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                return
            self._idle = queue.Queue()  # workers inherited through fork belong to the parent
            for _ in range(self.num_workers):
                self._idle.put(_Worker(self.memory_limit_mb))
            self._pid = os.getpid()

    def score(self, pred: str, gold: str) -> float:
        self._ensure_started()
        worker = self._idle.get()
        try:  # the slot goes back even if a worker fails to start, else the next check waits forever
            if worker is None:  # cut off last time: start its replacement
                worker = _Worker(self.memory_limit_mb)
            started = time.perf_counter()
            result = worker.check(pred, gold, self.timeout)
            if result is None:
                self.timeouts += 1
                logger.debug("verification cut off after %.2fs; worker killed", time.perf_counter() - started)
                worker.kill()
                worker = None
                result = 0.0
        finally:
            self._idle.put(worker)
        return result

    def score_many(self, preds: list[str], golds: list[str]) -> list[float]:
        if len(preds) != len(golds):
            raise ValueError(f"got {len(preds)} predictions but {len(golds)} gold answers")
        self._ensure_started()
        if self.num_workers == 1 or len(preds) <= 1:
            return [self.score(p, g) for p, g in zip(preds, golds, strict=True)]
        with ThreadPoolExecutor(self.num_workers) as pool:
            return list(pool.map(self.score, preds, golds))

    def close(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                while not self._idle.empty():
                    worker = self._idle.get()
                    if worker is not None:
                        worker.kill()
            self._pid = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
