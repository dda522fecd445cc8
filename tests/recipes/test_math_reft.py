"""The math recipe end to end on a small model: outputs, resume, bad config."""

import json

import pytest
import torch

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
    # another run (other lr) into the same folder: refused, naming the setting, or moved to out-1
    with pytest.raises(ValueError, match="learning_rate: 0.0001 -> 0.0002"):
        main([*ARGS, "--model_name_or_path", small_model_dir, "--output_dir", str(out), "--max_steps", "3",
              "--learning_rate", "2e-4"])
    # an interrupted run logged a step after its last checkpoint: the resumed run logs it once
    with (out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 3, "correction/ess": 0.5}) + "\n")
    # interrupted runs resume from their last checkpoint: ask for one more step
    again = main([*ARGS, "--model_name_or_path", small_model_dir, "--output_dir", str(out), "--max_steps", "3"])
    assert again["steps"] == 3
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "correction/ess" in r]
    assert steps == [1, 2, 3] and [r for r in rows if r["step"] == 3][0]["correction/ess"] != 0.5
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


def test_run_folder_refuses_another_runs_checkpoints_or_moves_on(tmp_path):
    from safetensors.torch import save_file

    from recipes.run_folder import prepare_run_folder

    out = tmp_path / "run"
    record = {"model": "a", "settings": {"learning_rate": 1e-4, "seed": 0}}
    folder, resume = prepare_run_folder(out, record)
    assert folder == out and resume is None
    (out / "checkpoint-4").mkdir()
    (out / "checkpoint-4" / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    save_file({"w": torch.zeros(2)}, out / "checkpoint-4" / "model.safetensors")  # a complete checkpoint
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (3, 4, 5, 6)))
    folder, resume = prepare_run_folder(out, record)  # the same run: resume, drop rows after step 4
    assert resume.endswith("checkpoint-4")
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [3, 4]
    other = {"model": "b", "settings": {"learning_rate": 1e-4, "seed": 1}}
    with pytest.raises(ValueError, match=r"model: 'a' -> 'b'; seed: 0 -> 1"):
        prepare_run_folder(out, other)
    folder, resume = prepare_run_folder(out, other, fresh_run=True)
    assert folder == tmp_path / "run-1" and resume is None and (folder / "run.json").exists()


QWEN_MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


@pytest.mark.parametrize("flags, system", [([], None), (["--system_prompt", QWEN_MATH_SYSTEM], QWEN_MATH_SYSTEM),
                                           (["--system_prompt", ""], "")])
def test_system_prompt_reaches_the_grpo_and_held_out_prompts(flags, system, small_model_dir, tmp_path, monkeypatch):
    import recipes.math_reft as recipe
    from archs.tiny.math_task import SYSTEM_PROMPT
    from nested_reft.trainer import NestedReFTTrainer

    seen = {}

    class Stop(Exception):
        pass

    class CapturingTrainer:
        SKIP_STATE_FILE = NestedReFTTrainer.SKIP_STATE_FILE

        def __init__(self, **kwargs):
            seen["train"] = kwargs["train_dataset"]
            raise Stop

    real_eval = recipe.evaluate_math

    def capturing_eval(model, tokenizer, dataset, **kwargs):
        seen["held_out"] = dataset
        return real_eval(model, tokenizer, dataset, **kwargs)

    monkeypatch.setattr(recipe, "NestedReFTTrainer", CapturingTrainer)
    monkeypatch.setattr(recipe, "evaluate_math", capturing_eval)
    with pytest.raises(Stop):
        main([*ARGS, "--model_name_or_path", small_model_dir, "--output_dir", str(tmp_path), "--train_limit", "8",
              "--eval_limit", "2", "--eval_max_new_tokens", "2", *flags])
    expected = SYSTEM_PROMPT if system is None else system  # default: the embedded tiny model's own
    for rows in (seen["train"], seen["held_out"]):
        for prompt in rows["prompt"]:
            if expected:
                assert prompt[0] == {"role": "system", "content": expected} and prompt[1]["role"] == "user"
            else:  # '' is no system message at all (not an empty one)
                assert [m["role"] for m in prompt] == ["user"]
