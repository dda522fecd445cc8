"""`VLLMServerEngine`: Nested-ReFT rollouts from vLLM's own OpenAI-compatible server (`vllm serve`).

The server runs one of our model classes (the `vllm.general_plugins` entry point registers them in
every vLLM process, `--hf-overrides` selects one) with our worker extension, in vLLM's dev mode
(`VLLM_SERVER_DEV_MODE=1` opens `/collective_rpc` and the RL endpoints): by default the compact
compiled class holding L − k layers (`python -m nested_reft.serve MODEL --skip-k K`), which samples
skip sets of exactly k layers, or with `--eager` the run-time-skip class, any skip set. `python -m
nested_reft.serve` starts it with the flags below (`server_flags`); this client checks them against
the server's `/server_info` before it samples anything, and learns k from `nested_reft_info`.

- Sampling: `/v1/completions`, one request per prompt (request i of a call is seeded with
  seed + i), sent concurrently so that vLLM batches them; token ids in, token ids and the
  sampler's processed log-probs out (`--logprobs-mode processed_logprobs`), as `VLLMEngine`.
- Skip set: `/collective_rpc` -> `nested_reft_set_skip` (eager) or `nested_reft_use_kept` with the
  kept layers (compact: the workers load the layers that moved into a slot from their own host
  copy of every layer, which every weight update below keeps current), between `/pause?mode=wait`
  and `/resume`, so no request samples across two skip sets. A compact server refuses, before
  anything is sent, a skip set whose size is not its k, the empty one (evaluation, the
  full-model probe) included.
- Weights: vLLM's weight-transfer engine when the server has one (`nccl`: the trainer joins the
  workers' NCCL group, across nodes; `ipc`: CUDA IPC handles, trainer and server on one GPU),
  driven by vLLM's own trainer-side engines over `/init_weight_transfer_engine`,
  `/start_weight_update`, `/update_weights`, `/finish_weight_update`. Where neither works (CPU),
  `file`: one safetensors file in a folder both sides see, loaded by `nested_reft_load_weights`
  (the server reads only such files, in the folder given to `nested_reft.serve --weights-dir`).
- API key: the engine sends `Authorization: Bearer <api_key>` (default: `VLLM_API_KEY`, what
  `vllm serve` itself reads) on every request. vLLM checks it on `/v1/*` only: `/collective_rpc`,
  `/pause` and the weight endpoints stay open to anyone who reaches the port (docs/scaling.md).

Ranks: each trainer rank builds one engine. The ranks are split into contiguous blocks, one per
server URL; the first rank of a block (the sender) alone changes its server's skip set and pushes
weights, once every rank has arrived and before any continues (`_coordinated`), so all ranks
sample a round with the same skip set and weights, and a failure stops all of them at once.

Requests that may be retried are idempotent (a seeded completion, a skip set, a full tensor
update): connection failures, timeouts and 503s are retried with exponential backoff, and a
server that stays unreachable raises one `RolloutEngineUnavailable` naming the URL. A bad request
(HTTP 400) raises `ValueError` with the server's message.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

import torch

from .base import RolloutEngine, RolloutEngineUnavailable, Rollouts, SamplingSpec, request_seeds
from .vllm_engine import WORKER_EXTENSION
from .vllm_plugin import COMPACT_ARCHITECTURES, SKIP_ARCHITECTURES
from .vllm_worker import DEFAULT_WEIGHTS_DIR, PROBE_FILE, weights_file

logger = logging.getLogger(__name__)

WEIGHT_TRANSFERS = ("auto", "nccl", "ipc", "file")
MAX_CONCURRENT_REQUESTS = 256
START_HINT = "start it with: python -m nested_reft.serve <model> --port <port> (docs/vllm_engine.md, server mode)."


def server_flags(architecture: str, weight_transfer: str | None = None, cpu: bool = False,
                 compact: dict | None = None) -> list[str]:
    """The `vllm serve` flags server mode needs, besides the model and the user's own. `compact`:
    the compact model's config overrides (`compact_overrides`), served compiled with a host copy
    of every layer; None: the eager run-time-skip class."""
    if compact is None:
        overrides = {"architectures": [architecture]}
        # the skip set is read at every forward: a captured graph would freeze one
        mode = ["--enforce-eager"]
    else:
        overrides = {"architectures": [architecture], **compact, "nested_reft_host_copy": True}
        mode = []  # compiled (and CUDA graphs on GPUs): the skip set is which layers sit in the slots
    flags = ["--hf-overrides", json.dumps(overrides),
             "--worker-extension-cls", WORKER_EXTENSION, *mode,
             "--logprobs-mode", "processed_logprobs",  # log μ of the distribution that sampled
             "--no-enable-prefix-caching"]  # a prefix cached under another skip set or weights is wrong
    if weight_transfer in ("nccl", "ipc"):
        flags += ["--weight-transfer-config", json.dumps({"backend": weight_transfer})]
    if cpu:  # seeded requests and chunked prefill fail on CPU (docs/vllm_engine.md, open issue)
        flags.append("--no-enable-chunked-prefill")
    return flags


def server_config_problems(config: dict) -> list[str]:
    """What a running server (its `/server_info` vllm_config) lacks for server mode, as flags."""
    model, problems = config.get("model_config") or {}, []
    overrides = model.get("hf_overrides") or {}
    archs = overrides.get("architectures") or []
    if set(archs) & set(COMPACT_ARCHITECTURES.values()):
        if not overrides.get("nested_reft_host_copy"):  # the colocated engine's compact model: no host copy
            problems.append("--hf-overrides with \"nested_reft_host_copy\": true (the compact model's workers must "
                            "keep every layer to move one into a slot; python -m nested_reft.serve MODEL --skip-k K "
                            "sets it)")
    elif not set(archs) & set(SKIP_ARCHITECTURES.values()):
        problems.append(f"--hf-overrides '{{\"architectures\": [<one of {sorted(SKIP_ARCHITECTURES.values())}>]}}' "
                        f"(it serves {archs or 'the checkpoint architecture'})")
    elif not model.get("enforce_eager"):
        problems.append("--enforce-eager")
    if (config.get("parallel_config") or {}).get("worker_extension_cls") != WORKER_EXTENSION:
        problems.append(f"--worker-extension-cls {WORKER_EXTENSION}")
    if model.get("logprobs_mode") != "processed_logprobs":
        problems.append(f"--logprobs-mode processed_logprobs (it has {model.get('logprobs_mode')!r})")
    if (config.get("cache_config") or {}).get("enable_prefix_caching"):
        problems.append("--no-enable-prefix-caching")
    if ((config.get("parallel_config") or {}).get("data_parallel_size") or 1) > 1:
        problems.append("no --data-parallel-size (start one server per data-parallel copy and list their URLs)")
    return problems


def assign_server(urls: Sequence[str], rank: int, world_size: int) -> tuple[int, int]:
    """(server index, sender rank) of `rank`: the ranks split into contiguous blocks, one per URL,
    the first rank of each block its sender."""
    if not urls:
        raise ValueError("engine='vllm_server' needs at least one server URL")
    if world_size % len(urls):
        raise ValueError(f"{world_size} trainer ranks cannot be split evenly over {len(urls)} vLLM servers "
                         f"({list(urls)}): use a number of servers that divides the number of ranks")
    block = world_size // len(urls)
    return rank // block, rank // block * block


class TrainerRanks:
    """This process's rank among the trainer processes, and the one collective the engine needs to
    keep them in step (`all_gather_object` over torch.distributed's default group)."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
        self.rank, self.world_size = rank, world_size

    def all_gather(self, obj) -> list:
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out


class VLLMServerEngine(RolloutEngine):
    def __init__(self, base_url: str | Sequence[str], *, weight_transfer: str = "auto",
                 weights_dir: str | None = None, timeout: float = 600.0, retries: int = 3, backoff: float = 1.0,
                 wait_for_server: float = 0.0, eos_token_ids: Iterable[int] | None = None,
                 score_logprobs: bool = True, rank: int = 0, world_size: int = 1, ranks: TrainerRanks | None = None,
                 group_port: int = 51216, max_concurrent_requests: int = MAX_CONCURRENT_REQUESTS,
                 api_key: str | None = None):
        """`base_url`: one URL, several (a list or comma-separated: one server per block of ranks).
        `weight_transfer`: 'auto' uses the server's weight-transfer engine when it has one, else
        'file'; 'file' writes to `weights_dir` (default /dev/shm: a server on this machine; for
        another machine give a folder both mount). `wait_for_server`: seconds to keep polling
        `/health` for a server that is still loading. `group_port`: the NCCL rendezvous port
        (server i of several uses group_port + i). `api_key`: the server's `--api-key` (default
        the environment's VLLM_API_KEY)."""
        urls = [u.strip().rstrip("/") for u in (base_url.split(",") if isinstance(base_url, str) else base_url)]
        self.ranks = ranks or TrainerRanks(rank, world_size)
        index, self.sender_rank = assign_server(urls, self.ranks.rank, self.ranks.world_size)
        self.base_url, self.is_sender = urls[index], self.ranks.rank == self.sender_rank
        if weight_transfer not in WEIGHT_TRANSFERS:
            raise ValueError(f"weight_transfer must be one of {WEIGHT_TRANSFERS}, got {weight_transfer!r}")
        if timeout <= 0 or retries < 1 or max_concurrent_requests < 1:
            raise ValueError(f"need timeout > 0, retries >= 1 and max_concurrent_requests >= 1, got {timeout!r}, "
                             f"{retries!r}, {max_concurrent_requests!r}")
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        api_key = api_key or os.environ.get("VLLM_API_KEY")
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.weights_dir = os.path.expanduser(weights_dir or DEFAULT_WEIGHTS_DIR)
        self.eos_ids = list(eos_token_ids) if eos_token_ids is not None else None
        self.score_logprobs = score_logprobs
        self.max_concurrent_requests = max_concurrent_requests
        self.group_port = group_port + index
        self.last_sync_seconds = 0.0
        self._transfer = self._source = None
        info, config = self._coordinated(lambda: self._connect(wait_for_server, weight_transfer))
        self.weight_transfer = config
        self.num_layers, self.architecture = info["num_layers"], info["model_class"]
        # a compact server holds L - k layers: it samples skip sets of exactly k layers
        self.server_k = self.num_layers - info["slots"] if info.get("compact") else None
        self._expect(info)
        logger.info("vLLM server %s: %s (%d layers, %s), weights by %s%s", self.base_url, self.architecture,
                    self.num_layers, self._mode(), self.weight_transfer,
                    "" if self.is_sender else f" (pushed by rank {self.sender_rank})")

    def _mode(self) -> str:
        if self.server_k is None:
            return "eager, any skip set"
        return f"compact, k={self.server_k}: {self.num_layers - self.server_k} of {self.num_layers} layers"

    @property
    def serves_full_model(self) -> bool:
        """Whether `set_skip(())` works: evaluation and the full-model probe need it."""
        return self.server_k in (None, 0)

    # ------------------------------------------------------------------ HTTP

    def _request(self, method: str, path: str, payload=None, *, query: dict | None = None, log: bool = True):
        url = self.base_url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        body = json.dumps(payload).encode() if payload is not None else (b"" if method == "POST" else None)
        headers = {**self._auth, **({"Content-Type": "application/json"} if payload is not None else {})}
        last: Exception | None = None
        start = time.monotonic()
        for attempt in range(self.retries):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers, method=method),
                                            timeout=self.timeout) as response:
                    data = response.read()
                    return json.loads(data) if data else None
            except urllib.error.HTTPError as e:
                message = _server_message(e)
                if e.code in (400, 422):
                    raise ValueError(f"vLLM server rejected {path}: {message}") from None
                if e.code == 401:
                    raise PermissionError(f"the vLLM server at {self.base_url} requires an API key (it was started "
                                          "with --api-key) and refused this one: set VLLM_API_KEY for the trainer "
                                          "to the server's key") from None
                if e.code == 404:
                    raise RuntimeError(f"the vLLM server at {self.base_url} has no {path} endpoint ({message}): it "
                                       "needs VLLM_SERVER_DEV_MODE=1 and vLLM >= 0.32; " + START_HINT) from None
                if e.code != 503:
                    raise RuntimeError(f"vLLM server error on {path} (HTTP {e.code}): {message}") from None
                last = e
            except (urllib.error.URLError, TimeoutError, OSError, http.client.HTTPException) as e:
                last = e
            if log:
                logger.warning("vLLM server %s%s: attempt %d/%d failed: %s", self.base_url, path, attempt + 1,
                               self.retries, last)
        raise self._unavailable(f"{self.retries} attempts over {time.monotonic() - start:.1f} s; "
                                f"last error: {getattr(last, 'reason', last)}")

    def _unavailable(self, detail: str) -> RolloutEngineUnavailable:
        return RolloutEngineUnavailable(f"vLLM server at {self.base_url} is unreachable ({detail}); {START_HINT}",
                                        self.base_url, every_rank=self.ranks.world_size == 1)

    def _rpc(self, method: str, *args: str):
        """Call a worker-extension method on every worker; their answers must agree."""
        results = self._request("POST", "/collective_rpc", {"method": method, "args": list(args)})["results"]
        if any(r != results[0] for r in results):
            raise RuntimeError(f"the workers of {self.base_url} disagree on {method}: {results}")
        return results[0]

    def _info(self) -> dict:
        return self._rpc("nested_reft_info")

    @contextlib.contextmanager
    def _paused(self):
        """No request is scheduled inside the block; those in flight finish first (mode=wait)."""
        self._request("POST", "/pause", query={"mode": "wait"})
        try:
            yield
        finally:
            self._request("POST", "/resume")

    # ------------------------------------------------------------------ ranks

    def _coordinated(self, step):
        """Run `step` on every rank once all ranks have arrived (none still sampling with the old
        state); every rank gets its sender's result, or, if any rank failed, the same error."""
        if self.ranks.world_size == 1:
            return step()
        self.ranks.all_gather(None)  # the barrier: every rank has finished what it was doing
        try:
            outcome = ("ok", step())
        except (RolloutEngineUnavailable, ValueError, RuntimeError, TypeError, PermissionError) as e:
            outcome = ("error", type(e).__name__, str(e), getattr(e, "url", self.base_url))
        outcomes = self.ranks.all_gather(outcome)
        failed = [o for o in outcomes if o[0] == "error"]
        if not failed:
            return outcomes[self.sender_rank][1]
        mine = outcomes[self.ranks.rank] if outcomes[self.ranks.rank][0] == "error" else failed[0]
        _, kind, message, url = mine
        if kind == "RolloutEngineUnavailable":
            raise RolloutEngineUnavailable(message, url, every_rank=True)
        raise {"ValueError": ValueError, "TypeError": TypeError, "PermissionError": PermissionError}.get(
            kind, RuntimeError)(message)

    # ------------------------------------------------------------------ start

    def _connect(self, wait_for_server: float, weight_transfer: str):
        """Reach the server, check how it was started, pick the weight transfer."""
        deadline = time.monotonic() + wait_for_server
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(urllib.request.Request(self.base_url + "/health", headers=self._auth),
                                       timeout=min(self.timeout, 10)).close()
                break
            except (urllib.error.URLError, TimeoutError, OSError, http.client.HTTPException):
                time.sleep(1.0)
        self._request("GET", "/health")
        config = self._request("GET", "/server_info", query={"config_format": "json"})["vllm_config"]
        problems = server_config_problems(config)
        if problems:
            raise ValueError(f"the vLLM server at {self.base_url} was not started for Nested-ReFT server mode; it "
                             f"needs {'; '.join(problems)}; " + START_HINT)
        served = (config.get("weight_transfer_config") or {}).get("backend")
        if weight_transfer == "auto":
            weight_transfer = served if served in ("nccl", "ipc") else "file"
        elif weight_transfer != "file" and served != weight_transfer:
            raise ValueError(f"weight_transfer={weight_transfer!r}, but the vLLM server at {self.base_url} has "
                             f"weight-transfer engine {served!r}: start it with --weight-transfer-config "
                             f"'{{\"backend\": \"{weight_transfer}\"}}', or use weight_transfer 'file'")
        if weight_transfer == "file" and self.is_sender:
            self._check_weights_dir()
        return self._info(), weight_transfer

    def _check_weights_dir(self) -> None:
        if not os.path.isdir(self.weights_dir):
            raise ValueError(f"weights_dir {self.weights_dir!r} is not a folder")
        token = uuid.uuid4().hex
        path = os.path.join(self.weights_dir, f"{PROBE_FILE[0]}{token}{PROBE_FILE[1]}")
        with open(path, "w") as f:
            f.write(token)
        try:
            seen = self._rpc("nested_reft_read_text", path)
        except RuntimeError:
            seen = None
        finally:
            os.unlink(path)
        if seen != token:
            raise ValueError(f"the vLLM server at {self.base_url} cannot read the weight files this trainer writes to "
                             f"{self.weights_dir!r}: start it with --weights-dir {self.weights_dir} (it reads only "
                             "that folder), set vllm_server_weights_dir to a folder both machines share, or start "
                             "it with --weight-transfer-config '{\"backend\": \"nccl\"}'")

    def _expect(self, info: dict) -> None:
        self.skip, self._version = tuple(info["skip"]), info["version"]

    # ------------------------------------------------------------------ the engine

    def health(self) -> dict:
        return self._info()

    def set_skip(self, layers: Sequence[int]) -> None:
        skip = tuple(sorted(set(int(i) for i in layers)))
        bad = [i for i in skip if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"layer indices {bad} are out of range for a model with {self.num_layers} layers")
        if self.server_k is not None and len(skip) != self.server_k:
            raise ValueError(self._wrong_k(skip))
        if skip == self.skip:  # the same on every rank: all ranks skip the collective together
            return

        def step():
            if not self.is_sender:
                return None
            with self._paused():
                if self.server_k is None:
                    self._rpc("nested_reft_set_skip", json.dumps(list(skip)))
                else:  # the workers move the layers into the slots from their own copy of every layer
                    kept = [i for i in range(self.num_layers) if i not in skip]
                    self._rpc("nested_reft_use_kept", json.dumps(kept))
            return self._info()

        info = self._coordinated(step)
        if tuple(info["skip"]) != skip:
            raise RuntimeError(f"the vLLM server at {self.base_url} reports skip set {info['skip']} after being "
                               f"asked for {list(skip)}")
        self._expect(info)

    def _wrong_k(self, skip: tuple[int, ...]) -> str:
        served = (f"the vLLM server at {self.base_url} serves the compact compiled model for k={self.server_k} "
                  f"({self.num_layers - self.server_k} of {self.num_layers} layers)")
        if not skip:
            return (f"{served}; it cannot run the full model (skip set []), which evaluation and the full-model "
                    "probe ask for: set full_model_probe_every=0 and evaluate with the HF engine (eval_strategy "
                    "'no' here; the recipe's own evaluation runs without the server), or start the server with "
                    "--eager (any skip set, the full model included)")
        return (f"skip set {list(skip)} has k={len(skip)} layers, but {served}: set skip_ratio so that "
                f"round(skip_ratio * {self.num_layers}) = {self.server_k} (or skip_k_min = skip_k_max = {self.server_k}), "
                f"or start the server with --skip-k {len(skip)}; a k that changes between rounds (skip_k_min < "
                "skip_k_max, correction ess_adaptive) needs a server started with --eager")

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingSpec, *, ignore_eos: bool = False) -> Rollouts:
        n = len(prompt_token_ids)
        seeds = request_seeds(sampling.seed, n) if sampling.seed is not None else [None] * n
        common = {"max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
                  "top_k": sampling.top_k, "top_p": sampling.top_p, "min_p": sampling.min_p,
                  "repetition_penalty": sampling.repetition_penalty, "ignore_eos": ignore_eos,
                  "stop_token_ids": list(self.eos_ids or []), "logprobs": 0 if self.score_logprobs else None,
                  "return_token_ids": True, "return_tokens_as_token_ids": True, "n": 1}
        failed = threading.Event()

        def one(prompt, seed):
            if failed.is_set():  # another request failed: send no more
                return None
            payload = {"prompt": [int(t) for t in prompt], **common, **({"seed": seed} if seed is not None else {})}
            try:
                return _parse_choice(self._request("POST", "/v1/completions", payload, log=False)["choices"][0],
                                     self.score_logprobs)
            except BaseException:
                failed.set()
                raise

        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=max(1, min(self.max_concurrent_requests, n))) as pool:
            futures = [pool.submit(one, p, s) for p, s in zip(prompt_token_ids, seeds)]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for f in futures:  # the first failure in request order, once all have stopped
                if f in done and f.exception() is not None:
                    raise f.exception()
            results = [f.result() for f in futures]
        seconds = time.perf_counter() - start
        self._check_unchanged()
        ids = [r[0] for r in results]
        return Rollouts(ids, [r[1] for r in results] if self.score_logprobs else None, self.skip, seconds, 0.0)

    def _check_unchanged(self) -> None:
        info = self._info()
        if info["version"] != self._version or tuple(info["skip"]) != self.skip:
            raise RuntimeError(f"the vLLM server at {self.base_url} changed its skip set or weights while this engine "
                               f"sampled (version {self._version} -> {info['version']}, skip set now {info['skip']}, "
                               f"expected {list(self.skip)}): another client uses it; give each trainer its own server")

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Every rank calls this; the sender pushes (the others take part in the transfer's own
        collectives under nccl / ipc). Timed from the call to the moment every rank may sample."""
        start = time.perf_counter()
        named = [(n, t.detach()) for n, t in named_tensors]
        send = self._send_file if self.weight_transfer == "file" else self._send_transfer
        self._expect(self._coordinated(lambda: send(named)))
        self.last_sync_seconds = time.perf_counter() - start

    def _send_file(self, named: list[tuple[str, torch.Tensor]]):
        if not self.is_sender:
            return None
        from safetensors.torch import save_file

        with weights_file(self.weights_dir) as path:  # removed after the load, or when this process is stopped
            save_file({n: t.to("cpu").contiguous() for n, t in named}, path)
            with self._paused():
                count = int(self._rpc("nested_reft_load_weights", path))  # the endpoint answers non-JSON results as str
        if count != len(named):
            raise RuntimeError(f"the vLLM server at {self.base_url} loaded {count} of {len(named)} tensors")
        return self._info()

    def _send_transfer(self, named: list[tuple[str, torch.Tensor]]):
        import requests

        devices = _off_gpu(named)
        if devices:
            raise ValueError(f"weight_transfer={self.weight_transfer!r} sends from the trainer's GPU, but weights are "
                             f"on {devices}: use weight_transfer 'file'")
        try:
            if self._transfer is None:
                self._transfer = self._init_transfer()
            self._source.named = named
            with self._paused() if self.is_sender else contextlib.nullcontext():
                self._transfer.send_weights()
                if self.is_sender:
                    self._rpc("nested_reft_after_weight_update")
        except (requests.ConnectionError, requests.Timeout) as e:
            raise self._unavailable(f"weight transfer failed: {e}") from None
        except requests.HTTPError as e:
            raise RuntimeError(f"vLLM server {self.base_url}: weight transfer failed: {e.response.text}") from None
        return self._info() if self.is_sender else None

    def _init_transfer(self):
        """vLLM's trainer-side engine for the server's backend; on the sender this is the
        rendezvous (nccl: the trainer joins the workers' group as rank 0)."""
        from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

        rank = 0 if self.is_sender else self.ranks.rank  # vLLM's trainer engines send from rank 0
        if self.weight_transfer == "nccl":
            from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo
            from vllm.utils.network_utils import get_ip

            # non-senders never join the group: their world size is not used
            world = self._request("GET", "/get_world_size")["world_size"] + 1 if self.is_sender else 1
            info = NCCLTrainerInitInfo(master_address=get_ip(), master_port=self.group_port, world_size=world, rank=rank)
        else:
            from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

            info = IPCTrainerInitInfo(rank=rank)
        self._source = _named_tensor_source()
        client = HTTPVLLMWeightSyncClient(self.base_url, timeout=self.timeout)
        return WeightTransferTrainerFactory.trainer_init(info, client=client, source=self._source)

    def close(self) -> None:
        if self._transfer is not None:
            try:
                self._transfer.shutdown()
            except Exception as e:  # noqa: BLE001 - closing after a failure must not hide it
                logger.warning("closing the weight transfer to %s: %s", self.base_url, e)
            self._transfer = None


def _off_gpu(named: list[tuple[str, torch.Tensor]]) -> list[str]:
    """The devices other than CUDA that these tensors are on (vLLM's NCCL and IPC send from CUDA)."""
    return sorted({str(t.device) for _, t in named if t.device.type != "cuda"})


def _named_tensor_source():
    """A vLLM `WeightSource` over the (name, tensor) list of the current sync (set `.named`)."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class NamedTensors(WeightSource):
        named: list[tuple[str, torch.Tensor]] = []

        def metadata(self):
            return [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in self.named]

        def __iter__(self):
            return iter(list(self.named))

    return NamedTensors()


def _parse_choice(choice: dict, logprobs: bool) -> tuple[list[int], list[float] | None]:
    ids = [int(t) for t in choice["token_ids"]]
    if not logprobs:
        return ids, None
    lps = [float(x) for x in choice["logprobs"]["token_logprobs"]]
    if len(lps) != len(ids):
        raise RuntimeError(f"the vLLM server returned {len(lps)} log-probs for {len(ids)} tokens")
    return ids, lps


def _server_message(error: urllib.error.HTTPError) -> str:
    """vLLM answers {"error": {"message": ...}}; FastAPI's own errors {"detail": ...}."""
    try:
        body = json.loads(error.read())
    except Exception:  # noqa: BLE001 - a non-JSON error body: report the HTTP reason
        return str(error.reason)
    err = body.get("error", body.get("detail", body))
    return str(err.get("message", err) if isinstance(err, dict) else err)
