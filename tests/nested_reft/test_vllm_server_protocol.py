"""What `VLLMServerEngine` asks of `vllm serve`, against a recording stand-in (no vLLM server): the
launcher's flags, the checks of a running server, seeded concurrent completions, skip sets between
pause and resume, weight files, retries, several ranks, and vLLM's NCCL / IPC weight-transfer
request sequences with their GPU data planes replaced (they need CUDA)."""

import base64
import json
import pickle
import socket
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from nested_reft.engines import RolloutEngineUnavailable, SamplingSpec, vllm_server
from nested_reft.engines.base import request_seeds
from nested_reft.engines.vllm_server import VLLMServerEngine, assign_server, server_config_problems
from tests.nested_reft.fake_vllm_server import FakeVLLMServer, good_config


@pytest.fixture
def fake():
    server = FakeVLLMServer()
    yield server
    server.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine(server, **kwargs) -> VLLMServerEngine:
    return VLLMServerEngine(server.url, **{"timeout": 10, "backoff": 0.01, **kwargs})


# ---------------------------------------------------------------------- launcher and server checks


def test_launcher_sets_the_server_mode_flags(small_model_dir):
    from nested_reft.serve import parse_args, serve_args, serve_env

    args, rest = parse_args([small_model_dir, "--eager", "--port", "8001", "--dtype", "float32"])
    cpu = serve_args(args, rest, cpu=True)
    assert cpu[0] == small_model_dir and cpu[-4:] == ["--port", "8001", "--dtype", "float32"]
    assert json.loads(cpu[cpu.index("--hf-overrides") + 1]) == {"architectures": ["SkipQwen2ForCausalLM"]}
    for flag in ("--enforce-eager", "--no-enable-prefix-caching", "--no-enable-chunked-prefill"):
        assert flag in cpu
    assert cpu[cpu.index("--logprobs-mode") + 1] == "processed_logprobs"
    assert cpu[cpu.index("--worker-extension-cls") + 1] == vllm_server.WORKER_EXTENSION
    assert "--weight-transfer-config" not in cpu
    gpu = serve_args(args, rest, cpu=False)  # auto: NCCL on GPU machines, chunked prefill left on
    assert json.loads(gpu[gpu.index("--weight-transfer-config") + 1]) == {"backend": "nccl"}
    assert "--no-enable-chunked-prefill" not in gpu
    assert serve_env(args) == {"VLLM_SERVER_DEV_MODE": "1", "NESTED_REFT_WEIGHTS_DIR": vllm_server.DEFAULT_WEIGHTS_DIR}
    assert serve_env(parse_args([small_model_dir, "--weight-transfer", "ipc"])[0])["VLLM_ALLOW_INSECURE_SERIALIZATION"] == "1"
    with pytest.raises(SystemExit, match="need CUDA"):
        serve_args(*parse_args([small_model_dir, "--weight-transfer", "nccl"]), cpu=True)
    with pytest.raises(SystemExit):  # a flag the launcher sets itself
        parse_args([small_model_dir, "--enable-prefix-caching"])


def test_the_launcher_serves_the_compact_compiled_model_by_default(small_model_dir):
    from nested_reft.serve import parse_args, serve_args, served_model

    for given, k in ([], 2), (["--skip-k", "3"], 3), (["--skip-ratio", "0.34"], 2), (["--skip-k", "0"], 0):
        command = serve_args(*parse_args([small_model_dir, *given, "--port", "8001"]), cpu=True)
        overrides = json.loads(command[command.index("--hf-overrides") + 1])
        assert overrides["architectures"] == ["CompactQwen2ForCausalLM"] and overrides["nested_reft_host_copy"] is True
        assert overrides["num_hidden_layers"] == 6 - k and overrides["nested_reft_num_layers"] == 6  # round(0.25 * 6) = 2
        assert overrides["nested_reft_kept"] == list(range(6 - k))
        assert "--enforce-eager" not in command and command[-2:] == ["--port", "8001"]
        assert command[command.index("--logprobs-mode") + 1] == "processed_logprobs"
        assert "--no-enable-prefix-caching" in command and server_config_problems(
            {"model_config": {"hf_overrides": overrides, "logprobs_mode": "processed_logprobs"},
             "parallel_config": {"worker_extension_cls": vllm_server.WORKER_EXTENSION}}) == []
        assert f"every round must skip exactly k={k} layers" in served_model(command)
    with pytest.raises(SystemExit):  # one mode only
        parse_args([small_model_dir, "--skip-k", "2", "--eager"])


@pytest.mark.parametrize("given, message", [
    (["--skip-k", "6"], r"--skip-k 6: .* has 6 layers; k must be in \[0, 6\)"),
    (["--skip-k", "-1"], r"--skip-k -1: .* has 6 layers; k must be in \[0, 6\)"),
    (["--skip-ratio", "1.0"], r"--skip-ratio 1.0: must be in \[0, 1\)"),
])
def test_a_k_the_model_cannot_serve_is_refused_before_vllm_starts(small_model_dir, given, message):
    from nested_reft.serve import parse_args, serve_args

    with pytest.raises(SystemExit, match=message):
        serve_args(*parse_args([small_model_dir, *given]), cpu=True)


def test_layers_that_differ_are_refused_by_the_compact_server_naming_the_layer(small_model_dir, tmp_path):
    from transformers import AutoConfig

    from nested_reft.serve import parse_args, serve_args

    config = AutoConfig.from_pretrained(small_model_dir)
    config.layer_types = ["full_attention"] * 3 + ["sliding_attention"] + ["full_attention"] * 2
    config.save_pretrained(tmp_path)
    with pytest.raises(SystemExit, match=r"layer 3 is 'sliding_attention' but layer 0 is 'full_attention'.* --eager"):
        serve_args(*parse_args([str(tmp_path), "--skip-k", "2"]), cpu=True)
    command = serve_args(*parse_args([str(tmp_path), "--eager"]), cpu=True)  # the eager class serves it
    assert json.loads(command[command.index("--hf-overrides") + 1]) == {"architectures": ["SkipQwen2ForCausalLM"]}


def test_a_compact_server_without_its_host_copy_is_refused():
    config = good_config(compact_k=2)
    del config["model_config"]["hf_overrides"]["nested_reft_host_copy"]  # the colocated engine's compact model
    assert server_config_problems(good_config(compact_k=2)) == []
    server = FakeVLLMServer(config, compact_k=2)
    try:
        with pytest.raises(ValueError, match="it needs --hf-overrides with \"nested_reft_host_copy\": true"):
            engine(server)
    finally:
        server.close()


@pytest.mark.parametrize("change, flag", [
    (lambda c: c["cache_config"].update(enable_prefix_caching=True), "--no-enable-prefix-caching"),
    (lambda c: c["model_config"].update(hf_overrides={}), "--hf-overrides"),
    (lambda c: c["model_config"].update(logprobs_mode="raw_logprobs"), "--logprobs-mode processed_logprobs"),
    (lambda c: c["model_config"].update(enforce_eager=False), "--enforce-eager"),
    (lambda c: c["parallel_config"].update(worker_extension_cls=None), "--worker-extension-cls"),
    (lambda c: c["parallel_config"].update(data_parallel_size=2), "no --data-parallel-size"),
])
def test_a_server_started_without_a_flag_is_refused_naming_it(change, flag):
    assert server_config_problems(good_config()) == []
    config = good_config()
    change(config)
    server = FakeVLLMServer(config)
    try:
        with pytest.raises(ValueError, match=f"not started for Nested-ReFT server mode; it needs {flag}"):
            engine(server)
    finally:
        server.close()


def test_a_server_without_dev_mode_is_refused(fake):
    fake.answer = lambda method, path, query, body: (404, {"detail": "Not Found"}) if path == "/server_info" else (200, None)
    with pytest.raises(RuntimeError, match="has no /server_info endpoint .* VLLM_SERVER_DEV_MODE=1"):
        engine(fake)


# ---------------------------------------------------------------------- sampling


def test_one_seeded_request_per_prompt_sent_concurrently(fake):
    fake.delay = 0.05
    client = engine(fake, eos_token_ids=[2, 5])
    prompts = [[7, 1, 1], [8, 1], [9], [7, 3], [10, 4, 4, 4]]
    spec = SamplingSpec(max_new_tokens=3, temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.1, seed=41)
    r = client.generate(prompts, spec)
    sent = sorted((b for _, p, _, b in fake.log if p == "/v1/completions"), key=lambda b: b["seed"])
    assert [b["prompt"] for b in sent] == prompts and [b["seed"] for b in sent] == request_seeds(41, 5)
    for b in sent:
        assert (b["temperature"], b["top_k"], b["top_p"], b["min_p"], b["repetition_penalty"], b["max_tokens"]) == \
            (0.7, 5, 0.9, 0.05, 1.1, 3)
        assert b["stop_token_ids"] == [2, 5] and b["logprobs"] == 0 and b["ignore_eos"] is False and b["n"] == 1
    seeds = request_seeds(41, 5)
    assert r.completion_ids == [[p[0], len(p), s % 1000] for p, s in zip(prompts, seeds)]  # in prompt order
    assert r.logprobs == [[-0.25, -0.5, -0.75]] * 5 and r.skip == () and r.generate_seconds > 0
    assert fake.max_in_flight > 1  # vLLM batches requests that arrive together

    client.score_logprobs = False
    r = client.generate([[7]], SamplingSpec(max_new_tokens=2), ignore_eos=True)
    last = fake.log[-2][3]  # the completion; the info check after it comes last
    assert "seed" not in last and last["logprobs"] is None and last["ignore_eos"] is True and r.logprobs is None


def test_a_bad_request_is_one_value_error_with_the_servers_message(fake):
    with pytest.raises(ValueError, match="rejected /v1/completions: Token id 5000 is out of vocabulary"):
        engine(fake).generate([[1], [5000]], SamplingSpec(max_new_tokens=2, seed=0))


def test_skip_set_changes_between_pause_and_resume(fake):
    client = engine(fake)
    start = len(fake.log)
    client.set_skip([3, 1, 3])
    assert fake.paths()[start:] == ["/pause", "/collective_rpc", "/resume", "/collective_rpc"]
    assert fake.log[start][2] == {"mode": "wait"}  # requests in flight finish with the old set
    assert fake.rpcs()[-2:] == [("nested_reft_set_skip", ["[1, 3]"]), ("nested_reft_info", [])]
    assert client.skip == (1, 3) and fake.skip == [1, 3]
    count = len(fake.log)
    client.set_skip((1, 3))  # unchanged: nothing sent
    assert len(fake.log) == count
    with pytest.raises(ValueError, match=r"\[6\] are out of range for a model with 6 layers"):
        client.set_skip((6,))
    assert len(fake.log) == count


def test_a_compact_server_gets_only_the_kept_layers_and_refuses_another_k(tmp_path):
    server = FakeVLLMServer(compact_k=2)
    try:
        client = engine(server, weights_dir=str(tmp_path))
        assert client.server_k == 2 and client.skip == (4, 5) and not client.serves_full_model
        start = len(server.log)
        client.set_skip([3, 1])
        assert server.paths()[start:] == ["/pause", "/collective_rpc", "/resume", "/collective_rpc"]
        assert server.rpcs()[-2:] == [("nested_reft_use_kept", ["[0, 2, 4, 5]"]), ("nested_reft_info", [])]
        assert client.skip == (1, 3)
        count = len(server.log)
        with pytest.raises(ValueError, match=r"skip set \[1, 2, 3\] has k=3 layers, but the vLLM server at .* serves "
                                             r"the compact compiled model for k=2 \(4 of 6 layers\): set skip_ratio so "
                                             r"that round\(skip_ratio \* 6\) = 2 .* --skip-k 3"):
            client.set_skip((1, 2, 3))
        with pytest.raises(ValueError, match=r"cannot run the full model \(skip set \[\]\), which evaluation and the "
                                             r"full-model probe ask for: set full_model_probe_every=0 .* --eager"):
            client.set_skip(())
        assert len(server.log) == count  # refused before anything is sent
        client.load_weights([("model.layers.5.mlp.up_proj.weight", torch.ones(2))])  # weights: the same file path
        assert [m for m, _ in server.rpcs()][-2:] == ["nested_reft_load_weights", "nested_reft_info"]
        client.generate([[1]], SamplingSpec(max_new_tokens=1))
    finally:
        server.close()


def test_an_eager_server_serves_the_full_model(fake):
    assert engine(fake).server_k is None and engine(fake).serves_full_model


def test_a_change_made_by_another_client_is_caught(fake):
    client = engine(fake)
    client.set_skip((2,))
    client.generate([[1]], SamplingSpec(max_new_tokens=1))
    fake.skip, fake.version = [4], fake.version + 1  # someone else's set_skip
    with pytest.raises(RuntimeError, match=r"changed its skip set or weights .* skip set now \[4\], expected \[2\]"):
        client.generate([[1]], SamplingSpec(max_new_tokens=1))


# ---------------------------------------------------------------------- weights by file


def test_weights_travel_as_one_file_the_server_loads(fake, tmp_path):
    client = engine(fake, weights_dir=str(tmp_path))
    assert client.weight_transfer == "file"  # the server has no weight-transfer engine
    tensors = {"model.layers.0.mlp.up_proj.weight": torch.randn(4, 3), "model.norm.weight": torch.randn(3)}
    start = len(fake.log)
    client.load_weights(tensors.items())
    assert fake.paths()[start:] == ["/pause", "/collective_rpc", "/resume", "/collective_rpc"]
    method, (path,) = fake.rpcs()[-2]
    assert method == "nested_reft_load_weights" and path.startswith(str(tmp_path))
    assert fake.loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert torch.equal(fake.loaded[name], t)
    assert list(tmp_path.iterdir()) == [] and client.last_sync_seconds > 0  # the file is gone after the load
    client.generate([[1]], SamplingSpec(max_new_tokens=1))  # the load's version change was the client's own


def test_a_weights_dir_the_server_cannot_see_is_refused(fake, tmp_path):
    fake.read_text = lambda path: "a file of another machine"
    with pytest.raises(ValueError, match=f"cannot read the weight files this trainer writes to '{tmp_path}'"):
        engine(fake, weights_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # the probe file is removed


# ---------------------------------------------------------------------- retries


def test_503s_are_retried_with_backoff_then_one_error_naming_the_url(fake):
    client = engine(fake, retries=3, backoff=0.05)
    fake.fail["/v1/completions"] = [503, 503]
    assert client.generate([[1]], SamplingSpec(max_new_tokens=3)).completion_ids == [[1, 1, 0]]
    assert fake.paths().count("/v1/completions") == 3
    fake.fail["/v1/completions"] = [503] * 3
    start = time.monotonic()
    with pytest.raises(RolloutEngineUnavailable, match=rf"vLLM server at {fake.url} is unreachable \(3 attempts") as e:
        client.generate([[1]], SamplingSpec(max_new_tokens=1))
    assert 0.15 <= time.monotonic() - start < 5  # backoff 0.05 s, then 0.1 s
    assert e.value.url == fake.url and e.value.every_rank  # one process: it may save a checkpoint


def test_unreachable_server_gives_one_clear_error():
    port = free_port()  # nothing listens there
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=rf"vLLM server at http://127.0.0.1:{port} is unreachable \(3 attempts.*nested_reft.serve"):
        VLLMServerEngine(f"http://127.0.0.1:{port}", retries=3, backoff=0.05, timeout=5)
    assert time.monotonic() - start < 10  # backoff 0.05 s, 0.1 s: no long hang


# ---------------------------------------------------------------------- several ranks


class ThreadRanks:
    """`TrainerRanks` for ranks that are threads of this process."""

    def __init__(self, world_size: int):
        self.world_size, self.slots, self.barrier = world_size, [None] * world_size, threading.Barrier(world_size)

    def member(self, rank: int):
        group = self

        def all_gather(obj):
            group.slots[rank] = obj
            group.barrier.wait()
            out = list(group.slots)
            group.barrier.wait()
            return out

        return SimpleNamespace(rank=rank, world_size=self.world_size, all_gather=all_gather)


def on_ranks(world_size: int, work) -> list:
    """work(rank, ranks) on `world_size` threads; their results or exceptions, by rank."""
    ranks, out = ThreadRanks(world_size), [None] * world_size

    def run(rank):
        try:
            out[rank] = work(rank, ranks.member(rank))
        except Exception as e:  # noqa: BLE001 - returned to the test
            out[rank] = e

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_ranks_are_split_into_one_block_per_server():
    assert [assign_server(["a", "b"], r, 4) for r in range(4)] == [(0, 0), (0, 0), (1, 2), (1, 2)]
    assert [assign_server(["a"], r, 3)[1] for r in range(3)] == [0, 0, 0]
    with pytest.raises(ValueError, match="3 trainer ranks cannot be split evenly over 2 vLLM servers"):
        assign_server(["a", "b"], 0, 3)


def test_only_the_first_rank_of_each_server_pushes_and_every_rank_sees_the_change(tmp_path):
    servers = [FakeVLLMServer(), FakeVLLMServer()]
    try:
        def work(rank, ranks):
            client = VLLMServerEngine([s.url for s in servers], ranks=ranks, timeout=10, weights_dir=str(tmp_path))
            client.set_skip((2, 4))
            client.load_weights([("model.norm.weight", torch.full((3,), float(rank)))])
            r = client.generate([[5 + rank]], SamplingSpec(max_new_tokens=2))
            return client.skip, client._version, r.completion_ids

        results = on_ranks(4, work)
        for s, senders in zip(servers, ([0, 1], [2, 3])):
            assert [m for m, _ in s.rpcs()].count("nested_reft_set_skip") == 1  # one push per server
            assert [m for m, _ in s.rpcs()].count("nested_reft_load_weights") == 1
            assert torch.equal(s.loaded["model.norm.weight"], torch.full((3,), float(senders[0])))  # the sender's
            assert s.paths().count("/v1/completions") == 2  # every rank samples
        assert [r[0] for r in results] == [(2, 4)] * 4
        assert results[1][1] == results[0][1] == servers[0].version  # the sender's version reached rank 1
    finally:
        for s in servers:
            s.close()


def test_a_lost_server_stops_every_rank_at_the_same_call(fake, tmp_path):
    def work(rank, ranks):
        client = VLLMServerEngine(fake.url, ranks=ranks, timeout=5, retries=2, backoff=0.01, weights_dir=str(tmp_path))
        fake.fail["/pause"] = [503] * 2  # gone while the sender pushes the skip set
        client.set_skip((1,))

    errors = on_ranks(2, work)
    for e in errors:
        assert isinstance(e, RolloutEngineUnavailable) and e.every_rank and fake.url in str(e)
    assert [m for m, _ in fake.rpcs()].count("nested_reft_set_skip") == 0


# ---------------------------------------------------------------------- NCCL and IPC request sequences


def test_weights_on_cpu_are_refused_by_a_gpu_weight_transfer():
    server = FakeVLLMServer(good_config("nccl"))
    try:
        client = engine(server)
        assert client.weight_transfer == "nccl"
        with pytest.raises(ValueError, match=r"sends from the trainer's GPU, but weights are on \['cpu'\]"):
            client.load_weights([("model.norm.weight", torch.ones(3))])
    finally:
        server.close()


def test_a_weight_transfer_the_server_lacks_is_refused(fake):
    with pytest.raises(ValueError, match="weight_transfer='ipc', but the vLLM server .* has weight-transfer engine None"):
        engine(fake, weight_transfer="ipc")


def sync_twice(server, monkeypatch):
    """Two weight syncs through vLLM's trainer-side engine; CUDA tensors are faked (CPU tensors
    that pass the device check), as the data plane is."""
    monkeypatch.setattr(vllm_server, "_off_gpu", lambda named: [])
    client = engine(server)
    first = [("model.embed_tokens.weight", torch.randn(5, 4)), ("model.norm.weight", torch.randn(4))]
    client.load_weights(first)
    start = len(server.log)
    client.load_weights(first[1:])
    return client, first, start


def test_nccl_weight_transfer_request_sequence(monkeypatch):
    pytest.importorskip("vllm")
    from vllm.distributed.weight_transfer import nccl_engine

    broadcast = []
    monkeypatch.setattr(nccl_engine, "open_trainer_endpoint", lambda info: SimpleNamespace(info=info))
    monkeypatch.setattr(nccl_engine, "packed_nccl_broadcast_producer",
                        lambda iterator, **kw: broadcast.append([(n, t.clone()) for n, t in iterator]))
    server = FakeVLLMServer(good_config("nccl"), world_size=2)
    try:
        client, first, start = sync_twice(server, monkeypatch)
        assert client._transfer.model_update_group.info.world_size == 3  # 2 workers + the trainer
        init = [b for _, p, _, b in server.log if p == "/init_weight_transfer_engine"]
        assert len(init) == 1  # the rendezvous happens once
        info = init[0]["init_info"]
        assert (info["master_port"], info["rank_offset"], info["world_size"], info["packed"]) == (51216, 1, 3, True)
        seq = [p for m, p, _, _ in server.log[start:] if m == "POST"]
        assert seq == ["/pause", "/start_weight_update", "/update_weights", "/finish_weight_update",
                       "/collective_rpc", "/resume", "/collective_rpc"]
        update = [b for _, p, _, b in server.log if p == "/update_weights"][-1]["update_info"]
        assert update == {"names": ["model.norm.weight"], "dtype_names": ["float32"], "shapes": [[4]]}
        assert [n for n, _ in broadcast[0]] == [n for n, _ in first] and torch.equal(broadcast[1][0][1], first[1][1])
        assert ("nested_reft_after_weight_update", []) in server.rpcs()  # the tied head re-tied, version bumped
        client.generate([[1]], SamplingSpec(max_new_tokens=1))  # the version seen is the client's own
    finally:
        server.close()


def test_ipc_weight_transfer_request_sequence(monkeypatch):
    pytest.importorskip("vllm")
    from vllm.distributed.weight_transfer import ipc_engine

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(uuid="GPU-0"))
    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 0)
    monkeypatch.setattr(torch.cuda, "ipc_collect", lambda: None)
    monkeypatch.setattr(ipc_engine, "reduce_tensor", lambda t: (None, ("handle", tuple(t.shape))))
    server = FakeVLLMServer(good_config("ipc"))
    try:
        _, first, start = sync_twice(server, monkeypatch)
        init = [b for _, p, _, b in server.log if p == "/init_weight_transfer_engine"]
        assert [b["init_info"] for b in init] == [{"packed": False}]
        assert [p for m, p, _, _ in server.log[start:] if m == "POST"] == ["/pause", "/start_weight_update", "/update_weights",
                                                "/finish_weight_update", "/collective_rpc", "/resume", "/collective_rpc"]
        update = [b for _, p, _, b in server.log if p == "/update_weights"][0]["update_info"]
        assert update["names"] == [n for n, _ in first] and update["shapes"] == [[5, 4], [4]]
        handles = pickle.loads(base64.b64decode(update["ipc_handles_pickled"]))  # HTTP carries them pickled
        assert handles == [{"GPU-0": ("handle", (5, 4))}, {"GPU-0": ("handle", (4,))}]
    finally:
        server.close()


def test_the_trainer_refuses_what_a_compact_server_cannot_serve_before_training(tmp_path, small_model_dir, chat_tokenizer):
    from datasets import Dataset

    from nested_reft.config import NestedReFTConfig
    from nested_reft.trainer import NestedReFTTrainer

    server = FakeVLLMServer(compact_k=2)
    try:
        client = engine(server, weights_dir=str(tmp_path))

        def trainer(**overrides):
            args = dict(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], per_device_train_batch_size=4,
                        num_generations=4, skip_ratio=0.34, full_model_probe_every=0, keep_first=1,
                        keep_last=1) | overrides
            return NestedReFTTrainer(model=small_model_dir, reward_funcs=lambda completions, **k: [0.0] * len(completions),
                                     processing_class=chat_tokenizer, engine=client, args=NestedReFTConfig(**args),
                                     train_dataset=Dataset.from_list([{"prompt": "1 + 1 ="}] * 4))

        assert trainer().skip_policy.k_range == (2, 2)  # round(0.34 * 6) = 2: the server's k
        with pytest.raises(ValueError, match=r"serves the compact compiled model for k=2 .* this run draws k in \[3, 3\]"):
            trainer(skip_ratio=0.5)
        with pytest.raises(ValueError, match=r"k steered by correction='ess_adaptive'"):
            trainer(correction="ess_adaptive")
        with pytest.raises(ValueError, match=r"the full-model probe .* cannot run: set full_model_probe_every=0"):
            trainer(full_model_probe_every=10)
    finally:
        server.close()


def test_asynchronous_rounds_through_a_server(tmp_path, small_model_dir, chat_tokenizer):
    """The producer thread drives the server client: one weight load per version in flight, each
    round's completions after its weights, one step off."""
    from datasets import Dataset

    from nested_reft.config import NestedReFTConfig
    from nested_reft.trainer import NestedReFTTrainer

    server = FakeVLLMServer()
    try:
        client = engine(server, weights_dir=str(tmp_path))
        args = NestedReFTConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], per_device_train_batch_size=4,
                                num_generations=4, max_completion_length=3, skip_ratio=0.34, keep_first=1, keep_last=1,
                                full_model_probe_every=0, max_steps=3, logging_steps=1, async_rollouts=True,
                                correction="tis")
        trainer = NestedReFTTrainer(model=small_model_dir, processing_class=chat_tokenizer, engine=client, args=args,
                                    reward_funcs=lambda completions, **k: [float(i % 2) for i in range(len(completions))],
                                    train_dataset=Dataset.from_list([{"prompt": f"{i} + 1 ="} for i in range(12)]))
        trainer.train()
        assert [row["async/staleness"] for row in trainer.state.log_history if "async/staleness" in row] == [0, 1, 1]
        events = [m for m, _ in server.rpcs() if m in ("nested_reft_load_weights", "nested_reft_set_skip")]
        assert events.count("nested_reft_load_weights") == 2  # step 0's weights (rounds 0, 1), step 1's (round 2)
        assert server.paths("POST").count("/v1/completions") == 3 * 4  # three rounds of four completions
    finally:
        server.close()
