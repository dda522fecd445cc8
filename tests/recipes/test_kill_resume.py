"""A run killed with SIGKILL resumes from its last checkpoint, and the steps after it log what an
uninterrupted run logs: at a round boundary and inside a round (steps_per_generation 2).

The small random model scores 0 on every math problem, so losses and gradients are 0 and the
weights do not move: what is compared is the sampling path, which is what a resume most easily
gets wrong (the round's prompts and completions, the skip sets, the behavior model's log-probs),
and on which steps a round is sampled at all."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPARED = ("loss", "reward", "correction/ess", "correction/ratio_mean", "correction/kl_behavior",
            "completions/mean_length", "completions/max_length", "entropy", "rollout/skipped_layers")


def command(model_dir, out):
    return [sys.executable, "-m", "recipes.math_reft", "--config", "recipes/configs/math_reft_tiny.yaml",
            "--model_name_or_path", model_dir, "--output_dir", str(out), "--max_steps", "4", "--save_steps", "1",
            "--steps_per_generation", "2", "--per_device_train_batch_size", "8", "--num_generations", "4",
            "--max_completion_length", "16", "--eval_limit", "4", "--eval_max_new_tokens", "8",
            "--full_model_probe_every", "0", "--use_cpu", "true", "--skip_ratio", "0.34", "--report_to", "none"]


def run(model_dir, out, kill_after_checkpoint=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    proc = subprocess.Popen(command(model_dir, out), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    if kill_after_checkpoint is None:
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
        return
    marker = out / f"checkpoint-{kill_after_checkpoint}" / "nested_reft_state.json"  # the last file saved
    deadline = time.time() + 900
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # without warning, as soon as the checkpoint is complete
    proc.wait()
    assert marker.exists(), proc.stderr.read()[-3000:]
    later = out / f"checkpoint-{kill_after_checkpoint + 1}"
    assert not later.exists(), "killed too late: the next checkpoint was already saved"


def step_rows(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


@pytest.mark.slow
@pytest.mark.parametrize("killed_at", [1, 2], ids=["inside a round", "at a round boundary"])
def test_sigkill_then_resume_matches_an_uninterrupted_run(small_model_dir, tmp_path, killed_at):
    reference = tmp_path / "uninterrupted"
    run(small_model_dir, reference)
    interrupted = tmp_path / "interrupted"
    run(small_model_dir, interrupted, kill_after_checkpoint=killed_at)
    run(small_model_dir, interrupted)  # the same command resumes from the last complete checkpoint
    want, got = step_rows(reference), step_rows(interrupted)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]  # every step logged once
    for step in range(killed_at + 1, 5):
        assert ("reward" in got[step]) == ("reward" in want[step]), f"step {step}: a round sampled on another step"
        for key in COMPARED:
            if key in want[step]:
                assert got[step][key] == pytest.approx(want[step][key], rel=1e-5, abs=1e-7), (step, key)
    summary = json.loads((interrupted / "summary.json").read_text())
    reference_summary = json.loads((reference / "summary.json").read_text())
    assert summary["skip_history"] == reference_summary["skip_history"]
    assert summary["after"]["accuracy"] == reference_summary["after"]["accuracy"]
