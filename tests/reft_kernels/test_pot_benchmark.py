"""The dequantization benchmark runs end to end (CPU: interpreter correctness mode)."""

import json

import torch

from benchmarks.pot_dequant import main


def test_benchmark_cpu_mode_checks_kernels_and_reports_no_timings(tmp_path, monkeypatch):
    if torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # restored after the test
    out = tmp_path / "b.json"
    result = main(["--bits", "3", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["mode"].startswith("cpu-interpreter") and saved == json.loads(json.dumps(result))
    assert len(saved["rows"]) == 3 and all(r["pot_exact"] and r["int_exact"] for r in saved["rows"])
    assert not any("pot_gbs" in r for r in saved["rows"])
