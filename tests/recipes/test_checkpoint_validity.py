"""A checkpoint cut short while saving (or corrupted) is detected and the previous one resumed; the
one set aside survives transformers' checkpoint rotation."""

import json

import pytest
import torch

from recipes.run_folder import checkpoint_problem, last_valid_checkpoint


def save_checkpoint(folder, model, step):
    folder.mkdir(parents=True)
    model.save_pretrained(folder)
    torch.save({"state": {0: torch.zeros(3)}}, folder / "optimizer.pt")
    torch.save(torch.get_rng_state(), folder / "rng_state.pth")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (folder / "nested_reft_state.json").write_text(json.dumps({"round": step}))


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("damage, reason", [
    (lambda f: truncate(f / "model.safetensors"), "model.safetensors is truncated"),
    (lambda f: truncate(f / "optimizer.pt"), "optimizer.pt is not a complete torch archive"),
    (lambda f: truncate(f / "trainer_state.json"), "trainer_state.json"),
    (lambda f: (f / "trainer_state.json").unlink(), "trainer_state.json"),
    (lambda f: truncate(f / "nested_reft_state.json"), "nested_reft_state.json"),
    (lambda f: (f / "model.safetensors").unlink(), "no model or adapter weights"),
    (lambda f: (f / "model.safetensors").write_bytes(b"\xff" * 12), "model.safetensors"),
])
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_used(small_qwen2, tmp_path, damage, reason,
                                                                           caplog):
    save_checkpoint(tmp_path / "checkpoint-2", small_qwen2, 2)
    save_checkpoint(tmp_path / "checkpoint-4", small_qwen2, 4)
    assert checkpoint_problem(tmp_path / "checkpoint-4") is None
    damage(tmp_path / "checkpoint-4")
    assert reason in checkpoint_problem(tmp_path / "checkpoint-4")
    assert last_valid_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert (tmp_path / "incomplete-checkpoint-4").is_dir() and not (tmp_path / "checkpoint-4").exists()
    assert "checkpoint-4" in caplog.text and "using the previous checkpoint" in caplog.text


def test_an_earlier_set_aside_copy_is_kept(small_qwen2, tmp_path):
    save_checkpoint(tmp_path / "checkpoint-1", small_qwen2, 1)
    truncate(tmp_path / "checkpoint-1" / "model.safetensors", 0.1)
    (tmp_path / "incomplete-checkpoint-1").mkdir()  # an earlier set-aside copy is kept, not overwritten
    assert last_valid_checkpoint(tmp_path) is None
    assert (tmp_path / "incomplete-checkpoint-1.1").is_dir()


def test_a_set_aside_checkpoint_survives_the_trainers_rotation(small_qwen2, tmp_path):
    """transformers deletes the oldest `checkpoint-*` folders beyond save_total_limit, whatever
    follows the step number: a set-aside name must not look like one."""
    from transformers.trainer_utils import rotate_checkpoints

    for step in (1, 2, 3):
        save_checkpoint(tmp_path / f"checkpoint-{step}", small_qwen2, step)
    truncate(tmp_path / "checkpoint-3" / "model.safetensors")
    assert last_valid_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    rotate_checkpoints(str(tmp_path), save_total_limit=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "incomplete-checkpoint-3"]
