"""Serve a skip-aware vLLM engine over HTTP, for trainers that outgrow one machine.

    python -m nested_reft.serve --model <folder or Hub id> --port 8000 [--dtype float32 ...]

Endpoints (JSON unless said otherwise; the trainer's client is `VLLMServerEngine`):
  GET  /health          {"status", "num_layers", "skip", "architecture"}
  POST /set_skip        {"layers": [...]} -> {"skip": [...]}
  POST /generate        {"prompt_token_ids", "sampling": {the SamplingSpec fields: max_new_tokens, temperature,
                        top_k, top_p, min_p, repetition_penalty, seed}, "score_logprobs", "ignore_eos",
                        "eos_token_ids"} -> {"completion_ids",
                        "logprobs", "skip", "generate_seconds"}
  POST /update_weights  body: safetensors bytes (Hugging Face names) -> {"num_tensors", "seconds"}
Requests are served one at a time (one engine). A bad request answers 400 with {"error": ...}.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

logger = logging.getLogger("nested_reft.serve")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="checkpoint folder or Hub id (Llama, Qwen2, Qwen3 or Mistral)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 to serve other machines)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--gpu_memory_utilization", type=float, default=0.9)
    p.add_argument("--tensor_parallel_size", type=int, default=1)
    p.add_argument("--max_model_len", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu_kvcache_gib", type=int, default=None, help="CPU only: KV-cache GiB")
    p.add_argument("--multiprocessing", action="store_true", help="run vLLM's engine core in its own process")
    return p.parse_args(argv)


def make_handler(state: dict, lock: threading.Lock):
    """`state["engine"]` is None while the model loads: requests then get 503 (clients retry)."""
    from safetensors.torch import load

    from .engines.base import SamplingSpec

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *args):
            logger.debug(fmt, *args)

        def _reply(self, code: int, obj) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def do_GET(self):
            engine = state["engine"]
            if engine is None:
                return self._reply(503, {"error": "the server is loading its model"})
            if self.path != "/health":
                return self._reply(404, {"error": f"no endpoint {self.path!r}"})
            self._reply(200, {"status": "ok", "num_layers": engine.num_layers, "skip": list(engine.skip),
                              "architecture": engine.architecture})

        def do_POST(self):
            if state["engine"] is None:
                return self._reply(503, {"error": "the server is loading its model"})
            try:
                with lock:
                    out = self._post()
            except Exception as e:  # noqa: BLE001 - report, keep serving
                if _request_fault(e):
                    return self._reply(400, {"error": f"{type(e).__name__}: {e}"})
                logger.exception("request %s failed", self.path)
                return self._reply(500, {"error": f"{type(e).__name__}: {e}"})
            if out is None:
                return self._reply(404, {"error": f"no endpoint {self.path!r}"})
            self._reply(200, out)

        def _post(self):
            engine = state["engine"]
            if self.path == "/set_skip":
                engine.set_skip(json.loads(self._body())["layers"])
                return {"skip": list(engine.skip)}
            if self.path == "/generate":
                req = json.loads(self._body())
                engine.eos_ids = req.get("eos_token_ids") or engine.eos_ids
                engine.score_logprobs = bool(req.get("score_logprobs", True))
                r = engine.generate(req["prompt_token_ids"], SamplingSpec(**req["sampling"]),
                                    ignore_eos=bool(req.get("ignore_eos", False)))
                return {"completion_ids": r.completion_ids, "logprobs": r.logprobs, "skip": list(r.skip),
                        "generate_seconds": r.generate_seconds}
            if self.path == "/update_weights":
                named = list(load(self._body()).items())
                engine.load_weights(named)
                return {"num_tensors": len(named), "seconds": engine.last_sync_seconds}
            return None

    return Handler


def _request_fault(error: Exception) -> bool:
    """A bad request (400), not a server failure: our validation errors and vLLM's client errors
    (`vllm.exceptions.VLLMClientError`, matched by name so this module imports without vLLM)."""
    return isinstance(error, (ValueError, KeyError, TypeError)) or any(
        c.__name__ == "VLLMClientError" for c in type(error).__mro__)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Bind first: a taken port fails at once, and the port is ours before vLLM picks its own.
    state = {"engine": None}
    server = ThreadingHTTPServer((args.host, args.port), make_handler(state, threading.Lock()))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    from .engines.vllm_engine import VLLMEngine

    try:
        engine = VLLMEngine(args.model, dtype=args.dtype, gpu_memory_utilization=args.gpu_memory_utilization,
                            tensor_parallel_size=args.tensor_parallel_size, max_model_len=args.max_model_len,
                            seed=args.seed, multiprocessing=args.multiprocessing, cpu_kvcache_gib=args.cpu_kvcache_gib)
    except BaseException:
        server.shutdown()
        raise
    state["engine"] = engine
    logger.info("serving %s (%s, %d layers) on http://%s:%d", args.model, engine.architecture, engine.num_layers,
                args.host, args.port)
    try:
        thread.join()
    finally:
        server.shutdown()
        server.server_close()
        engine.close()


if __name__ == "__main__":
    main()
