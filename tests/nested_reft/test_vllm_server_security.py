"""What server mode exposes: the worker extension reads only the trainer's files in its weights
folder, the client sends vLLM's API key, and weight files do not outlive a trainer that is stopped
or killed while it syncs. The extension's methods are called directly (no vLLM); the client talks to
the recording stand-in server."""

import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from nested_reft.engines import SamplingSpec
from nested_reft.engines.vllm_server import VLLMServerEngine
from nested_reft.engines.vllm_worker import NestedReFTWorkerExtension
from tests.nested_reft.fake_vllm_server import FakeVLLMServer

ROOT = Path(__file__).resolve().parents[2]


class Worker(NestedReFTWorkerExtension):
    """The extension mixed into a stand-in for vLLM's worker: it records what it was asked to load."""

    def __init__(self):
        self.loaded = None
        self.model_runner = SimpleNamespace(get_model=lambda: SimpleNamespace(config=None))

    def reload_weights(self, weights_iterator, is_checkpoint_format):
        self.loaded = dict(weights_iterator)


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """The server's weights folder (as `python -m nested_reft.serve --weights-dir` sets it) and,
    beside it, a secret the network must not reach."""
    weights, outside = tmp_path / "weights", tmp_path / "private"
    weights.mkdir()
    outside.mkdir()
    monkeypatch.setenv("NESTED_REFT_WEIGHTS_DIR", str(weights))
    save_file({"secret": torch.arange(3.0)}, outside / "nested_reft_weights_secret.safetensors")
    (outside / "nested_reft_probe_secret.txt").write_text("the secret")
    return SimpleNamespace(weights=weights, outside=outside)


def test_the_worker_loads_a_weight_file_the_trainer_wrote_in_its_folder(folders):
    path = folders.weights / "nested_reft_weights_host_1_abc.safetensors"
    save_file({"model.norm.weight": torch.ones(3)}, path)
    worker = Worker()
    assert worker.nested_reft_load_weights(str(path)) == 1 and torch.equal(worker.loaded["model.norm.weight"], torch.ones(3))
    probe = folders.weights / "nested_reft_probe_0123abcd.txt"
    probe.write_text("token")
    assert worker.nested_reft_read_text(str(probe)) == "token"


@pytest.mark.parametrize("where", ["outside", "symlink out", "dot-dot", "another name"])
def test_the_worker_refuses_any_other_file(folders, where):
    w, out = folders.weights, folders.outside
    weights_name, probe_name = "nested_reft_weights_secret.safetensors", "nested_reft_probe_secret.txt"
    if where == "outside":
        weights, probe = out / weights_name, out / probe_name
    elif where == "symlink out":  # a trainer-like name in the folder that leads out of it
        weights, probe = w / "nested_reft_weights_link.safetensors", w / "nested_reft_probe_link.txt"
        weights.symlink_to(out / weights_name)
        probe.symlink_to(out / probe_name)
    elif where == "dot-dot":
        weights, probe = w / ".." / "private" / weights_name, w / ".." / "private" / probe_name
    else:  # in the folder, but not a file the trainer writes (a model of someone else's, a config)
        weights, probe = w / "model.safetensors", w / "config.json"
        save_file({"secret": torch.arange(3.0)}, weights)
        probe.write_text("the secret")
    worker = Worker()
    with pytest.raises(PermissionError, match="reads only nested_reft_weights_"):
        worker.nested_reft_load_weights(str(weights))
    assert worker.loaded is None
    with pytest.raises(PermissionError, match="reads only nested_reft_probe_"):
        worker.nested_reft_read_text(str(probe))
    with pytest.raises(PermissionError):  # a weight file is not readable as text, nor a probe loadable
        worker.nested_reft_read_text(str(w / "nested_reft_weights_x.safetensors"))


# ---------------------------------------------------------------------- API key


def test_the_client_sends_the_api_key_on_every_request(tmp_path, monkeypatch):
    server = FakeVLLMServer(api_key="s3cret")
    try:
        monkeypatch.delenv("VLLM_API_KEY", raising=False)
        with pytest.raises(PermissionError, match="requires an API key .*VLLM_API_KEY"):
            VLLMServerEngine(server.url, timeout=10, weights_dir=str(tmp_path)).generate([[1]], SamplingSpec(max_new_tokens=1))
        client = VLLMServerEngine(server.url, timeout=10, weights_dir=str(tmp_path), api_key="s3cret")
        client.set_skip((1,))
        client.load_weights([("model.norm.weight", torch.ones(3))])
        client.generate([[1]], SamplingSpec(max_new_tokens=1, seed=0))
        start = len(server.headers)
        monkeypatch.setenv("VLLM_API_KEY", "s3cret")  # what `vllm serve` itself reads
        VLLMServerEngine(server.url, timeout=10, weights_dir=str(tmp_path))
        assert all(h.get("Authorization") == "Bearer s3cret" for h in server.headers[start:])
    finally:
        server.close()


# ---------------------------------------------------------------------- weight files


CHILD = """
import sys, time, torch
from nested_reft.engines.vllm_server import VLLMServerEngine
from tests.nested_reft.fake_vllm_server import FakeVLLMServer

server = FakeVLLMServer()
answer = server.answer
server.answer = lambda m, p, q, b: time.sleep(120) if p == "/pause" else answer(m, p, q, b)  # stuck mid-sync
client = VLLMServerEngine(server.url, timeout=300, weights_dir=sys.argv[1])
client.load_weights([("model.embed_tokens.weight", torch.zeros(1000, 64))])
"""


def stuck_in_a_sync(folder: Path) -> subprocess.Popen:
    """A trainer process whose weight file is written and whose sync then waits on the server."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(folder)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(folder.glob("nested_reft_weights_*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    time.sleep(0.3)  # the file is complete: the sync waits on /pause
    return proc


def test_a_trainer_stopped_during_a_file_sync_removes_its_weight_file(tmp_path):
    proc = stuck_in_a_sync(tmp_path)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == -signal.SIGTERM  # still ends as SIGTERM's default does
    assert list(tmp_path.iterdir()) == []


def test_a_weight_file_left_by_a_killed_trainer_is_removed_by_the_next_sync(tmp_path):
    proc = stuck_in_a_sync(tmp_path)
    proc.kill()  # SIGKILL: nothing runs in the process
    proc.wait(timeout=60)
    assert len(list(tmp_path.glob("nested_reft_weights_*"))) == 1
    foreign = tmp_path / "nested_reft_weights_otherhost_1_abc.safetensors"  # another machine's, on a shared folder
    foreign.write_bytes(b"")
    server = FakeVLLMServer()
    try:
        VLLMServerEngine(server.url, timeout=10, weights_dir=str(tmp_path)).load_weights([("model.norm.weight", torch.ones(3))])
    finally:
        server.close()
    assert list(tmp_path.iterdir()) == [foreign]
