"""`VLLMServerEngine`: the trainer-side client of `python -m nested_reft.serve` (plain HTTP + JSON).

Every request is idempotent (a seeded generate, a skip set, a full tensor update), so connection
failures, timeouts and 503s are retried with exponential backoff; a server that cannot be
reached gives one `ConnectionError` naming the URL and how to start it. Errors the server
reports for a bad request (HTTP 400) are raised as `ValueError` with the server's message.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence

import torch

from .base import RolloutEngine, Rollouts, SamplingSpec

logger = logging.getLogger(__name__)


class VLLMServerEngine(RolloutEngine):
    def __init__(self, base_url: str, *, timeout: float = 600.0, retries: int = 3, backoff: float = 1.0,
                 wait_for_server: float = 0.0, eos_token_ids: Iterable[int] | None = None):
        """`wait_for_server`: keep polling /health this many seconds before giving up (a server
        that is still loading its model); after that, `retries` attempts with backoff."""
        self.base_url = base_url.rstrip("/")
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.eos_ids = list(eos_token_ids) if eos_token_ids is not None else None
        self.last_sync_seconds = 0.0
        self.score_logprobs = True
        deadline = time.monotonic() + wait_for_server
        while True:
            try:
                info = self._request("GET", "/health")
                break
            except ConnectionError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(1.0)
        self.num_layers = info["num_layers"]
        self.skip = tuple(info["skip"])
        self.architecture = info["architecture"]

    def _request(self, method: str, path: str, payload=None, *, body: bytes | None = None):
        url = self.base_url + path
        headers = {}
        if payload is not None:
            body = json.dumps(payload).encode()
            headers["Content-Type"] = "application/json"
        elif body is not None:
            headers["Content-Type"] = "application/octet-stream"
        last: Exception | None = None
        start = time.monotonic()
        for attempt in range(self.retries):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(url, data=body, headers=headers, method=method)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as e:
                message = _server_message(e)
                if e.code == 400:
                    raise ValueError(f"vLLM server rejected {path}: {message}") from None
                if e.code != 503:
                    raise RuntimeError(f"vLLM server error on {path} (HTTP {e.code}): {message}") from None
                last = e
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = e
            logger.warning("vLLM server %s%s: attempt %d/%d failed: %s", self.base_url, path, attempt + 1, self.retries, last)
        raise ConnectionError(
            f"vLLM server at {self.base_url} is unreachable ({self.retries} attempts over "
            f"{time.monotonic() - start:.1f} s; last error: {getattr(last, 'reason', last)}). "
            f"Start it with: python -m nested_reft.serve --model <path> --port <port>"
        )

    def health(self) -> dict:
        return self._request("GET", "/health")

    def set_skip(self, layers: Sequence[int]) -> None:
        skip = tuple(sorted(set(int(i) for i in layers)))
        bad = [i for i in skip if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"layer indices {bad} are out of range for a model with {self.num_layers} layers")
        if skip != self.skip:
            self.skip = tuple(self._request("POST", "/set_skip", {"layers": list(skip)})["skip"])

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingSpec, *, ignore_eos: bool = False) -> Rollouts:
        payload = {"prompt_token_ids": prompt_token_ids, "ignore_eos": ignore_eos, "score_logprobs": self.score_logprobs,
                   "eos_token_ids": self.eos_ids,
                   "sampling": dataclasses.asdict(sampling)}
        out = self._request("POST", "/generate", payload)
        if tuple(out["skip"]) != self.skip:
            raise RuntimeError(f"the server sampled with skip set {out['skip']}, the client expected {list(self.skip)} "
                               "(another client changed it?)")
        return Rollouts(out["completion_ids"], out["logprobs"], tuple(out["skip"]), out["generate_seconds"], 0.0)

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        from safetensors.torch import save

        start = time.perf_counter()
        body = save({n: t.detach().to("cpu").contiguous() for n, t in named_tensors})
        self._request("POST", "/update_weights", body=body)
        self.last_sync_seconds = time.perf_counter() - start


def _server_message(error) -> str:
    try:
        return json.loads(error.read()).get("error", str(error))
    except Exception:  # noqa: BLE001 - a non-JSON error body: report the HTTP reason
        return str(error.reason)
