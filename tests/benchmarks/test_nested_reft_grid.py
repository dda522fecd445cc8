"""The study grid's cell list, parallel runner and table (cells mocked: a real cell is a recipe run)."""

import json

import pytest

from benchmarks import nested_reft_grid as grid


def fake_summary(ratio, correction, before=0.2, after=0.3):
    return {"skip_ratio": ratio, "correction": correction, "before": {"accuracy": before},
            "after": {"accuracy": after}, "behavior_tokens_per_s": 1400.0,
            "probe_behavior_tokens_per_s": 1500.0 if ratio else float("nan"), "full_tokens_per_s": 1200.0,
            "seconds_per_step": 3.25, "mean_ess": 0.9431, "mean_kl_behavior": 0.1049}


def test_ratio_zero_runs_once():
    cells = grid.grid_cells([0.0, 0.25], ["none", "tis", "retrace"])
    assert cells == [(0.0, "none"), (0.25, "none"), (0.25, "tis"), (0.25, "retrace")]


def test_table_row_numbers():
    row = grid.table([fake_summary(0.25, "tis", 0.217, 0.273)]).splitlines()[-1]
    assert row == "| 0.25 | tis | 21.7% | 27.3% | +5.6 | 1500 | 1200 | 3.2 | 0.943 | 0.105 |"
    zero = grid.table([fake_summary(0.0, "none")]).splitlines()[-1]
    assert zero.startswith("| 0.0 | any (w ≡ 1) |") and "| — | 1200 |" in zero


def test_parallel_grid_keeps_grid_order(tmp_path, monkeypatch):
    calls = []

    def run_cell(ratio, correction, args, extra):
        calls.append((ratio, correction, args.jobs, tuple(extra)))
        return fake_summary(ratio, correction)

    monkeypatch.setattr(grid, "run_cell", run_cell)
    grid.main(["--ratios", "0", "0.5", "--corrections", "none", "tis", "--jobs", "2",
               "--out", str(tmp_path), "--", "--seed", "3"])
    rows = json.loads((tmp_path / "grid.json").read_text())
    assert [(r["skip_ratio"], r["correction"]) for r in rows] == [(0.0, "none"), (0.5, "none"), (0.5, "tis")]
    assert sorted(calls) == [(0.0, "none", 2, ("--seed", "3")), (0.5, "none", 2, ("--seed", "3")),
                             (0.5, "tis", 2, ("--seed", "3"))]
    assert (tmp_path / "grid.md").read_text().count("\n") == 5


def test_table_only_rereads_finished_cells(tmp_path):
    for ratio, correction in grid.grid_cells([0.0, 0.25], ["none"]):
        cell = grid.cell_dir(tmp_path, ratio, correction)
        cell.mkdir(parents=True)
        summary = fake_summary(ratio, correction)
        del summary["mean_kl_behavior"]
        (cell / "summary.json").write_text(json.dumps(summary))
        metrics = [{"step": 1, "correction/kl_behavior": 0.1}, {"step": 2, "loss": 0.0},
                   {"step": 5, "correction/kl_behavior": 0.3}]
        (cell / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in metrics))
    grid.main(["--ratios", "0", "0.25", "--corrections", "none", "--table_only", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "grid.json").read_text())
    assert [r["mean_kl_behavior"] for r in rows] == [pytest.approx(0.2), pytest.approx(0.2)]
