"""benchmarks/balcony_vs_skip.py end to end at tiny settings: exit training, the fixed-workload timing
and one RL run per behavior model, in process."""

import json

from benchmarks import balcony_vs_skip as bench


def test_matched_cost_arguments():
    """Skipping L − k − 1 layers runs k + 1 layers, as exit k does (8 layers, exit 4: skip 3 = 0.375)."""
    assert bench.behavior_args("skip", 4, 8, "x") == ["--skip_ratio", "0.375"]
    assert round(0.375 * 8) == 8 - 4 - 1
    assert bench.behavior_args("balcony", 4, 8, "x")[:6] == ["--behavior", "balcony", "--skip_ratio", "0",
                                                             "--balcony_exit", "4"]
    assert [bench.layers_run(b, 4, 8) for b in bench.BEHAVIORS] == [8, 5, 5]


def test_benchmark_runs_at_tiny_settings(small_model_dir, tmp_path):
    out = tmp_path / "bench"
    payload = bench.main([
        "--model_name_or_path", small_model_dir, "--seeds", "0", "--max_steps", "1", "--exit_steps", "2",
        "--exit_args", "batch_size=4", "train_examples=16", "eval_examples=4", "--jobs", "1",
        "--throughput_prompts", "2", "--throughput_tokens", "4", "--repeats", "1", "--out", str(out), "--",
        "--num_generations", "2", "--per_device_train_batch_size", "2", "--steps_per_generation", "1",
        "--rollout_batch_size", "2", "--max_completion_length", "6", "--eval_limit", "2",
        "--eval_max_new_tokens", "4", "--train_limit", "4", "--full_model_probe_every", "0",
    ])
    assert payload["num_layers"] == 6 and payload["exit"] == 3  # round(15/32 * 6)
    rows = {r["behavior"]: r for r in payload["rows"]}
    assert [rows[b]["layers_run"] for b in bench.BEHAVIORS] == [6, 4, 4]
    assert len(payload["throughput"]["skip_set"]) == 2 and all(v > 0 for v in payload["throughput"]["tokens_per_s"].values())
    assert rows["full"]["mean_ess"] == 1.0 and rows["full"]["mean_kl_behavior"] == 0.0  # on-policy: μ = π_old
    assert rows["skip"]["mean_kl_behavior"] != 0.0 and rows["balcony"]["mean_kl_behavior"] != 0.0
    cells = {c["behavior"]: c for c in payload["cells"]}
    assert cells["balcony"]["skip_history"] == [[]] and len(cells["skip"]["skip_history"][0]) == 2
    md = (out / "balcony_vs_skip.md").read_text()
    assert md.count("\n") == 5 and "Balcony exit 3" in md and "skip 2 of 6 layers" in md
    assert json.loads((out / "balcony_vs_skip.json").read_text())["exit"] == 3
    again = bench.main(["--model_name_or_path", small_model_dir, "--seeds", "0", "--reuse_runs", "--jobs", "1",
                        "--throughput_prompts", "2", "--throughput_tokens", "4", "--repeats", "1", "--out", str(out)])
    assert [r["after"] for r in again["rows"]] == [r["after"] for r in payload["rows"]]  # runs re-read, not re-run
