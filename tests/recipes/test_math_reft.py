"""The math recipe end to end on a small model: outputs, resume, bad config."""

import json

import pytest

from recipes.math_reft import main

ARGS = [
    "--config", "recipes/configs/math_reft_tiny.yaml", "--eval_limit", "8", "--eval_max_new_tokens", "24",
    "--max_completion_length", "24", "--per_device_train_batch_size", "8", "--num_generations", "4",
    "--steps_per_generation", "1",
    "--save_steps", "1", "--full_model_probe_every", "1", "--use_cpu", "true", "--skip_ratio", "0.34",
]


@pytest.mark.slow
def test_recipe_trains_reports_and_resumes(small_model_dir, tmp_path):
    out = tmp_path / "run"
    summary = main([*ARGS, "--model_name_or_path", small_model_dir, "--output_dir", str(out), "--max_steps", "2",
                    "--eval_every", "1"])
    assert summary["steps"] == 2 and len(summary["skip_history"]) == 2
    assert all(len(s) == 2 for s in summary["skip_history"])  # round(0.34 * 6) layers
    assert 0 <= summary["before"]["accuracy"] <= 1 and 0 <= summary["after"]["accuracy"] <= 1
    assert 0 < summary["mean_ess"] <= 1 and summary["behavior_tokens_per_s"] > 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "correction/ess" in r] == [1, 2]
    # held-out accuracy during training (not at the last step: the final evaluation covers it)
    assert [r["step"] for r in rows if "heldout/accuracy" in r] == [1]
    assert (out / "training.png").stat().st_size > 10_000
    assert (out / "final" / "config.json").exists()
    # interrupted runs resume from their last checkpoint: ask for one more step
    again = main([*ARGS, "--model_name_or_path", small_model_dir, "--output_dir", str(out), "--max_steps", "3"])
    assert again["steps"] == 3
    assert again["before"] == summary["before"]  # not re-evaluated on resume
    # the skip policy resumed too: the first two draws are those of the first run, then one more
    assert len(again["skip_history"]) == 3 and again["skip_history"][:2] == summary["skip_history"]


def test_bad_values_fail_before_any_model_loads(tmp_path, capsys):
    with pytest.raises(SystemExit):  # on the command line, argparse names the bad choice
        main([*ARGS, "--output_dir", str(tmp_path), "--correction", "ipw", "--model_name_or_path", "/nonexistent"])
    assert "'ipw'" in capsys.readouterr().err
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("correction: ipw\nbf16: false\n")
    with pytest.raises(ValueError, match="'ipw'"):  # in a YAML file, the config's own check does
        main(["--config", str(bad_yaml), "--output_dir", str(tmp_path), "--model_name_or_path", "/nonexistent"])
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        main([*ARGS, "--output_dir", str(tmp_path), "--dataset_path", str(tmp_path / "nope.jsonl"),
              "--model_name_or_path", "/nonexistent"])
