"""Run folders (recipes/run_folder.py, recipes/skeleton.py): a folder is continued only by the run
that made it, finished or not, and never by another recipe; every setting that shapes the weights
is compared; damaged files and a full disk stop a run with one message naming the cause."""

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import TrainingArguments
from trl import ModelConfig

from recipes.run_folder import prepare_run_folder, run_record
from recipes.skeleton import Run, open_run, parse

ROOT = Path(__file__).resolve().parents[2]
STATE = "nested_reft_state.json"


def checkpoint(folder: Path, step: int, *required: str) -> Path:
    """A complete checkpoint: weights, trainer state and the recipe's own files."""
    folder.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, folder / "model.safetensors")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    for name in required:
        (folder / name).write_text("{}")
    return folder


def metric_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def args(out: Path, cls=TrainingArguments, **kw):
    return cls(output_dir=str(out), use_cpu=True, report_to="none", **kw)


def finished_run(out: Path, record: dict) -> None:
    """What a run with save_strategy 'no' leaves: no checkpoint, its metrics, summary and final model."""
    prepare_run_folder(out, record)
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 0.5}) + "\n" for s in (1, 2)))
    (out / "summary.json").write_text(json.dumps({"before": {}, "after": {}}))
    (out / "final").mkdir()


# ---------------------------------------------------------------------- whose folder it is


def test_a_finished_run_is_not_continued_by_another_run(tmp_path):
    out = tmp_path / "run"
    first = run_record("m", args(out, learning_rate=1e-4))
    finished_run(out, first)
    saved = (out / "run.json").read_text()
    with pytest.raises(ValueError, match=r"holds another run .*learning_rate: 0.0001 -> 0.0002.*--fresh_run true"):
        prepare_run_folder(out, run_record("m", args(out, learning_rate=2e-4)))
    assert metric_steps(out) == [1, 2] and (out / "run.json").read_text() == saved  # untouched
    folder, resume = prepare_run_folder(out, run_record("m", args(out, learning_rate=2e-4)), fresh_run=True)
    assert folder == tmp_path / "run-1" and resume is None


def test_the_same_run_started_over_logs_each_step_once(tmp_path):
    """Killed before its first checkpoint (or finished without one): it starts at step 0 again."""
    out = tmp_path / "run"
    record = run_record("m", args(out))
    finished_run(out, record)
    assert prepare_run_folder(out, record) == (out, None)
    assert metric_steps(out) == []


def test_another_recipes_folder_and_checkpoints_are_left_alone(tmp_path):
    """GRPO pointed at an SFT run's folder: its checkpoint (no Nested-ReFT state) is not set aside."""
    from trl import GRPOConfig, SFTConfig

    out = tmp_path / "run"
    prepare_run_folder(out, run_record("m", args(out, SFTConfig)))
    sft = checkpoint(out / "checkpoint-2", 2)
    grpo = run_record("m", args(out, GRPOConfig))
    with pytest.raises(ValueError, match=r"holds another run \(training_config: 'SFTConfig' -> 'GRPOConfig'"):
        prepare_run_folder(out, grpo, required=(STATE,))
    assert sft.is_dir() and sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "run.json"]
    folder, resume = prepare_run_folder(out, grpo, fresh_run=True, required=(STATE,))
    assert (folder, resume) == (tmp_path / "run-1", None) and sft.is_dir()


def test_a_folder_of_checkpoints_without_a_run_record_is_left_alone(tmp_path):
    """A plain TRL run's folder, or one from before run.json."""
    plain = checkpoint(tmp_path / "checkpoint-3", 3)
    with pytest.raises(ValueError, match=r"files of a run or a model \(checkpoint-3\) but no readable run.json"):
        prepare_run_folder(tmp_path, {"model": "m", "settings": {}}, required=(STATE,))
    assert plain.is_dir() and not (tmp_path / "run.json").exists()


@pytest.mark.parametrize("change, named", [
    (["--use_peft", "true", "--lora_r", "16"], "use_peft: False -> True"),
    (["--dtype", "bfloat16"], "dtype: 'float32' -> 'bfloat16'"),
])
def test_a_resume_that_changes_how_the_weights_are_built_is_refused(tmp_path, change, named):
    out = str(tmp_path / "run")
    flags = ["--output_dir", out, "--use_cpu", "true", "--report_to", "none", "--dtype", "float32"]
    training_args, _ = parse((TrainingArguments, ModelConfig), flags)
    open_run("m", training_args, {}, fresh_run=False)
    checkpoint(tmp_path / "run" / "checkpoint-1", 1)
    training_args, _ = parse((TrainingArguments, ModelConfig), [*flags, *change])
    with pytest.raises(ValueError, match=named):
        open_run("m", training_args, {}, fresh_run=False)


def test_a_changed_lora_setting_is_refused(tmp_path):
    out = str(tmp_path / "run")
    flags = ["--output_dir", out, "--use_cpu", "true", "--report_to", "none", "--use_peft", "true"]
    open_run("m", parse((TrainingArguments, ModelConfig), flags)[0], {}, fresh_run=False)
    checkpoint(tmp_path / "run" / "checkpoint-1", 1)
    with pytest.raises(ValueError, match="lora_alpha: 32 -> 64"):
        open_run("m", parse((TrainingArguments, ModelConfig), [*flags, "--lora_alpha", "64"])[0], {}, fresh_run=False)


def test_output_dir_dot_with_fresh_run(tmp_path, monkeypatch):
    work = tmp_path / "work"
    prepare_run_folder(work, {"model": "a", "settings": {}})
    monkeypatch.chdir(work)
    with pytest.raises(ValueError, match="holds another run"):
        prepare_run_folder(".", {"model": "b", "settings": {}})
    assert prepare_run_folder(".", {"model": "b", "settings": {}}, fresh_run=True) == (tmp_path / "work-1", None)
    assert prepare_run_folder(".", {"model": "a", "settings": {}}) == (work, None)  # its own run: used


# ---------------------------------------------------------------------- damaged files


def test_a_run_whose_checkpoints_are_all_damaged_is_not_restarted_silently(tmp_path):
    record = {"model": "m", "settings": {}}
    prepare_run_folder(tmp_path, record)
    cut = checkpoint(tmp_path / "checkpoint-1", 1, STATE)
    (cut / "model.safetensors").write_bytes((cut / "model.safetensors").read_bytes()[:20])
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    with pytest.raises(ValueError, match=r"none of its checkpoints can be resumed from \(checkpoint-1: model.safetensors"):
        prepare_run_folder(tmp_path, record, required=(STATE,))
    assert cut.is_dir() and metric_steps(tmp_path) == [1]  # nothing moved or dropped


def test_a_cut_last_metrics_line_does_not_block_the_resume(tmp_path):
    record = {"model": "m", "settings": {}}
    prepare_run_folder(tmp_path, record)
    checkpoint(tmp_path / "checkpoint-2", 2)
    rows = "".join(json.dumps({"step": s}) + "\n" for s in (1, 2))
    (tmp_path / "metrics.jsonl").write_text(rows + '{"step": 3, "lo')  # killed while appending
    assert prepare_run_folder(tmp_path, record)[1] == str(tmp_path / "checkpoint-2")
    assert metric_steps(tmp_path) == [1, 2]


def test_an_empty_summary_does_not_block_the_resume(tmp_path, caplog):
    training_args = args(tmp_path)
    open_run("m", training_args, {}, fresh_run=False)
    checkpoint(tmp_path / "checkpoint-2", 2)
    (tmp_path / "summary.json").write_text("")
    run = open_run("m", args(tmp_path), {}, fresh_run=False)
    assert run.resume == str(tmp_path / "checkpoint-2") and run.previous == {}
    assert "summary.json" in caplog.text
    assert run.before(lambda: {"accuracy": 0.5}) == {"accuracy": 0.5}  # measured again


WRITE_UNDER_A_SIZE_LIMIT = """
import resource, sys
from pathlib import Path
from recipes.skeleton import Run
from recipes.run_folder import prepare_run_folder

out = Path(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))  # writes past 200 bytes fail (EFBIG), as on a full disk
record = {"model": "m", "settings": {"note": "x" * 300}}  # the run's own record, written again
for write in (lambda: Run(out, None).write_summary({"before": "b" * 300}), lambda: prepare_run_folder(out, record)):
    try:
        write()
    except OSError as e:
        print(e.errno)
"""


def test_summary_and_run_record_are_never_left_half_written(tmp_path):
    prepare_run_folder(tmp_path, {"model": "m", "settings": {"note": "x" * 300}})
    Run(tmp_path, None).write_summary({"before": {"accuracy": 0.25}})
    done = subprocess.run([sys.executable, "-c", WRITE_UNDER_A_SIZE_LIMIT, str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.stdout.split() == [str(errno.EFBIG)] * 2, done.stderr[-3000:]
    assert json.loads((tmp_path / "summary.json").read_text()) == {"before": {"accuracy": 0.25}}
    assert json.loads((tmp_path / "run.json").read_text())["model"] == "m"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json", "summary.json"]  # no temporary files left


# ---------------------------------------------------------------------- a full disk


class SavingTrainer:
    """Saves checkpoint-1, then fails while saving checkpoint-2 (or final/) with `error`."""

    engine = None

    def __init__(self, out: Path, error: Exception, when: str = "checkpoint"):
        self.out, self.error, self.when = out, error, when

    def train(self, resume_from_checkpoint=None):
        checkpoint(self.out / "checkpoint-1", 1)
        if self.when == "checkpoint":
            (self.out / "checkpoint-2").mkdir()
            (self.out / "checkpoint-2" / "model.safetensors").write_bytes(b"\0" * 64)
            raise self.error

    def save_model(self, path):
        Path(path).mkdir()
        (Path(path) / "model.safetensors").write_bytes(b"\0" * 64)
        raise self.error


TORCH_SAVE_ON_A_FULL_DISK = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")


@pytest.mark.parametrize("error, free", [
    (OSError(errno.ENOSPC, "No space left on device"), 10**11),  # json, open(): errno, whatever is free now
    (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"), 10**11),  # safetensors
    (TORCH_SAVE_ON_A_FULL_DISK, 4096),  # says nothing of the disk: the free space does
], ids=["OSError", "safetensors", "torch.save"])
@pytest.mark.parametrize("when", ["checkpoint", "final"])
def test_a_full_disk_names_the_disk_and_frees_the_partial_folder(tmp_path, monkeypatch, error, free, when):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - free, free))
    with pytest.raises(OSError, match=r"No space left on the disk of .* free of 931.3 GiB\) while saving .*removed") as e:
        Run(tmp_path, None).train(SavingTrainer(tmp_path, error, when))
    assert e.value.errno == errno.ENOSPC
    partial = tmp_path / ("checkpoint-2" if when == "checkpoint" else "final")
    assert str(partial) in str(e.value) and not partial.exists()
    assert (tmp_path / "checkpoint-1").is_dir()  # the complete one stays: the run resumes from it


def test_an_error_that_is_not_a_full_disk_passes_through(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**9, 10**11))
    with pytest.raises(RuntimeError, match="unexpected pos"):
        Run(tmp_path, None).train(SavingTrainer(tmp_path, TORCH_SAVE_ON_A_FULL_DISK))
