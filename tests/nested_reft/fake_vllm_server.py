"""A stand-in for `vllm serve` (dev mode, our worker extension): the endpoints `VLLMServerEngine`
uses, answered from a dict, every request recorded. For the client's protocol tests, which need
no vLLM: what the real server does with these requests is tested in test_vllm_server.py."""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from safetensors.torch import load_file


def good_config(weight_transfer: str | None = None, compact_k: int | None = None, num_layers: int = 6) -> dict:
    """The parts of /server_info's vllm_config the client checks, as `python -m nested_reft.serve` sets them
    (`--eager`, or `--skip-k compact_k`)."""
    if compact_k is None:
        model = {"hf_overrides": {"architectures": ["SkipQwen2ForCausalLM"]}, "enforce_eager": True}
    else:
        model = {"hf_overrides": {"architectures": ["CompactQwen2ForCausalLM"], "num_hidden_layers": num_layers - compact_k,
                                  "nested_reft_num_layers": num_layers, "nested_reft_host_copy": True},
                 "enforce_eager": False}
    return {
        "model_config": {**model, "logprobs_mode": "processed_logprobs"},
        "cache_config": {"enable_prefix_caching": False},
        "parallel_config": {"worker_extension_cls": "nested_reft.engines.vllm_worker.NestedReFTWorkerExtension",
                            "data_parallel_size": 1},
        "weight_transfer_config": {"backend": weight_transfer} if weight_transfer else None,
    }


class FakeVLLMServer:
    def __init__(self, config: dict | None = None, num_layers: int = 6, delay: float = 0.0, world_size: int = 1,
                 api_key: str | None = None, compact_k: int | None = None):
        self.config = config or good_config(compact_k=compact_k, num_layers=num_layers)
        self.compact_k = compact_k  # a compact server: it holds num_layers - compact_k layers, the last k skipped
        self.api_key = api_key  # as `vllm serve --api-key`: checked on /v1 paths only
        self.headers: list[dict] = []  # every request's headers
        self.num_layers, self.delay, self.world_size = num_layers, delay, world_size
        self.skip: list[int] = [] if compact_k is None else list(range(num_layers - compact_k, num_layers))
        self.version = 0
        self.paused = False
        self.loaded: dict = {}  # tensors loaded from weight files
        self.read_text = None  # replaces nested_reft_read_text (a server that sees another filesystem)
        self.fail: dict[str, list[int]] = {}  # path -> HTTP codes to answer first, one per request
        self.log: list[tuple[str, str, dict, object]] = []  # (method, path, query, body)
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def paths(self, method: str | None = None) -> list[str]:
        return [p for m, p, _, _ in self.log if method in (None, m)]

    def rpcs(self) -> list[tuple[str, list]]:
        return [(b["method"], b.get("args", [])) for _, p, _, b in self.log if p == "/collective_rpc"]

    # ------------------------------------------------------------------ endpoints

    def answer(self, method: str, path: str, query: dict, body) -> tuple[int, object]:
        if method == "GET" and path == "/health":
            return 200, None
        if method == "GET" and path == "/server_info":
            return 200, {"vllm_config": self.config}
        if method == "GET" and path == "/get_world_size":
            return 200, {"world_size": self.world_size}
        if path == "/pause":
            self.paused = True
            return 200, {"status": "paused"}
        if path == "/resume":
            self.paused = False
            return 200, {"status": "resumed"}
        if path == "/collective_rpc":
            return 200, {"results": [self.rpc(body["method"], *body.get("args", []))]}
        if path == "/v1/completions":
            return self.completion(body)
        if path in ("/init_weight_transfer_engine", "/start_weight_update", "/update_weights", "/finish_weight_update"):
            return 200, {"message": "ok"}
        return 404, {"detail": "Not Found"}

    def rpc(self, method: str, *args):
        if method == "nested_reft_info":
            compact = self.compact_k is not None
            kept = [i for i in range(self.num_layers) if i not in self.skip]
            return {"num_layers": self.num_layers, "skip": self.skip, "version": self.version,
                    "model_class": "CompactQwen2ForCausalLM" if compact else "SkipQwen2ForCausalLM",
                    "compact": compact, "slots": len(kept) if compact else self.num_layers,
                    "kept": kept if compact else None, "host_copy": compact, "compiled": compact}
        if method == "nested_reft_set_skip" and self.compact_k is None:
            self.skip, self.version = sorted(json.loads(args[0])), self.version + 1
            return self.skip
        if method == "nested_reft_use_kept" and self.compact_k is not None:
            kept = json.loads(args[0])
            assert len(kept) == self.num_layers - self.compact_k, kept  # the client checks k before it sends
            self.skip, self.version = [i for i in range(self.num_layers) if i not in kept], self.version + 1
            return kept
        if method == "nested_reft_load_weights":
            self.loaded, self.version = load_file(args[0]), self.version + 1
            return str(len(self.loaded))  # vLLM's endpoint answers non-JSON results as str
        if method == "nested_reft_after_weight_update":
            self.version += 1
            return None
        if method == "nested_reft_read_text":
            if self.read_text is not None:
                return self.read_text(args[0])
            with open(args[0]) as f:
                return f.read()
        raise AssertionError(f"unexpected rpc {method}")

    def completion(self, body) -> tuple[int, object]:
        if self.paused:
            raise AssertionError("a completion request reached the server while it was paused")
        if any(t >= 1000 for t in body["prompt"]):
            return 400, {"error": {"message": f"Token id {max(body['prompt'])} is out of vocabulary", "code": 400}}
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        time.sleep(self.delay * (1 + body["prompt"][0] % 3))  # answers out of order
        with self.lock:
            self.in_flight -= 1
        seed = body.get("seed")
        ids = [body["prompt"][0], len(body["prompt"]), (seed or 0) % 1000][: body["max_tokens"]]
        logprobs = None
        if body.get("logprobs") is not None:
            lps = [-0.25 * (i + 1) for i in range(len(ids))]
            logprobs = {"token_logprobs": lps, "tokens": [f"token_id:{t}" for t in ids]}
        return 200, {"choices": [{"index": 0, "token_ids": ids, "logprobs": logprobs, "finish_reason": "length"}]}

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _serve(self, method: str):
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                with server.lock:
                    server.log.append((method, url.path, query, body))
                    server.headers.append(dict(self.headers))
                    codes = server.fail.get(url.path)
                    forced = codes.pop(0) if codes else None
                if server.api_key and url.path.startswith("/v1") and \
                        self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    forced = 401
                if forced is not None:
                    code, reply = forced, {"error": {"message": f"forced {forced}"}}
                else:
                    code, reply = server.answer(method, url.path, query, body)
                data = b"" if reply is None else json.dumps(reply).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._serve("GET")

            def do_POST(self):
                self._serve("POST")

        return Handler
