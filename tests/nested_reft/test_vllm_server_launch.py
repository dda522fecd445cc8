"""`python -m nested_reft.serve`: where the server listens, what it warns about, and the
tensor-parallel sizes it accepts, checked on the model's config before vLLM starts (no vLLM needed)."""

import pytest
from transformers import Qwen2Config

from nested_reft.serve import (
    parse_args,
    serve_args,
    serve_env,
    startup_notice,
    tensor_parallel_sizes,
)


def qwen2_5_7b() -> Qwen2Config:
    """Qwen2.5-7B-Instruct's shape (its config.json): 28 attention heads, 4 KV heads."""
    return Qwen2Config(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                       num_hidden_layers=2, vocab_size=1024, architectures=["Qwen2ForCausalLM"])


@pytest.fixture
def model_dir(tmp_path):
    qwen2_5_7b().save_pretrained(tmp_path)
    return str(tmp_path)


def value(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_the_server_listens_on_loopback_unless_a_host_is_given(model_dir):
    command = serve_args(*parse_args([model_dir, "--port", "8001"]), cpu=True)
    assert value(command, "--host") == "127.0.0.1"
    for given in (["--host", "0.0.0.0"], ["--host=0.0.0.0"]):
        command = serve_args(*parse_args([model_dir, *given]), cpu=True)
        assert sum(a == "--host" or a.startswith("--host=") for a in command) == 1 and "127.0.0.1" not in command


def test_the_worker_folder_is_passed_to_the_workers(model_dir, tmp_path):
    args, _ = parse_args([model_dir, "--weights-dir", str(tmp_path)])
    assert serve_env(args)["NESTED_REFT_WEIGHTS_DIR"] == str(tmp_path)
    args, _ = parse_args([model_dir, "--weights-dir", str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="--weights-dir .*missing.* is not a folder"):
        serve_env(args)


def test_the_startup_notice_says_what_the_open_endpoints_allow(model_dir):
    args, rest = parse_args([model_dir])
    notice = startup_notice(args, rest)
    assert "/collective_rpc" in notice and "--api-key" in notice and "127.0.0.1" in notice
    assert "pickle" not in notice  # nccl/none: no insecure serialization
    args, rest = parse_args([model_dir, "--weight-transfer", "ipc", "--host", "0.0.0.0"])
    notice = startup_notice(args, rest)
    assert "VLLM_ALLOW_INSECURE_SERIALIZATION" in notice and "pickle" in notice and "trusted network" in notice


def test_tensor_parallel_sizes_follow_vllms_splits():
    # heads 28 and the MLP (18944 = 2^9 * 37) split over 1, 2, 4; KV heads 4 split or replicated:
    # 7 passes vLLM's head check but fails its KV split (7 is neither a divisor nor a multiple of 4)
    assert tensor_parallel_sizes(qwen2_5_7b()) == [1, 2, 4]
    mha = Qwen2Config(hidden_size=512, intermediate_size=2048, num_attention_heads=16, num_key_value_heads=16)
    assert tensor_parallel_sizes(mha) == [1, 2, 4, 8, 16]
    mqa = Qwen2Config(hidden_size=512, intermediate_size=2048, num_attention_heads=16, num_key_value_heads=2)
    assert tensor_parallel_sizes(mqa) == [1, 2, 4, 8, 16]  # KV heads replicated for tp 4, 8, 16
    wide_mlp = Qwen2Config(hidden_size=1792, intermediate_size=1792, num_attention_heads=28, num_key_value_heads=4)
    assert tensor_parallel_sizes(wide_mlp) == [1, 2, 4, 28]  # 7 and 14: 4 KV heads neither split nor replicated


@pytest.mark.parametrize("given", [["--tensor-parallel-size", "8"], ["--tensor-parallel-size=8"], ["-tp", "8"],
                                   ["--tensor-parallel-size", "7"]])
def test_a_tensor_parallel_size_the_model_cannot_split_over_is_refused_before_vllm_starts(model_dir, given):
    with pytest.raises(SystemExit, match=rf"--tensor-parallel-size {given[-1].split('=')[-1]}: .*28 attention heads, "
                                         r"4 KV heads.* valid sizes are 1, 2, 4"):
        serve_args(*parse_args([model_dir, *given]), cpu=False)
    command = serve_args(*parse_args([model_dir, "--tensor-parallel-size", "4"]), cpu=False)
    assert value(command, "--tensor-parallel-size") == "4"
