"""vs_trl's pure parts: run names, time-to-target, ratios, tables, and the weight-sync shim on mocks."""

import json
from types import SimpleNamespace

import pytest
import torch

from benchmarks import vs_trl


def result(name, seed, points, wall=100.0, steps=60):
    side, engine = vs_trl.parse_run(name)
    curve = [{"step": s, "wall_seconds": t, "accuracy": a} for s, t, a in points]
    return {"name": name, "seed": seed, "side": side, "engine": engine, "curve": curve, "construct_seconds": 2.0,
            "train_wall_seconds": wall, "steps": steps}


def test_parse_run():
    assert vs_trl.parse_run("trl-vllm") == ("trl", "vllm")
    assert vs_trl.parse_run("ours-hf") == ("ours", "hf") and vs_trl.run_variant("ours-hf") is None
    assert vs_trl.parse_run("ours-seq_is-vllm") == ("ours", "vllm") and vs_trl.run_variant("ours-seq_is-vllm") == "seq_is"
    assert vs_trl.run_variant("ours-onpolicy-hf") == "onpolicy"
    assert vs_trl.parse_run("ours-tis-async4-hf") == ("ours", "hf")
    assert vs_trl.run_variant("ours-tis-async4-hf") == "tis" and vs_trl.run_staleness("ours-tis-async4-hf") == 4
    assert vs_trl.run_staleness("ours-tis-hf") is None and vs_trl.run_staleness("trl-hf") is None
    for bad in ("trl", "ours-sglang", "skip0.25", "trl-tis-hf", "ours-ppo-hf", "ours--hf", "ours-tis-async0-hf",
                "ours-tis-asyncx-hf", "ours-ppo-async1-hf"):
        with pytest.raises(ValueError, match="expected one of"):
            vs_trl.parse_run(bad)
    names = ["ours-retrace-hf", "ours-tis-async8-hf", "ours-hf", "trl-hf", "ours-onpolicy-hf", "ours-tis-async4-hf", "ours-tis-hf"]
    assert sorted(names, key=vs_trl.run_order) == ["trl-hf", "ours-hf", "ours-onpolicy-hf", "ours-tis-hf", "ours-tis-async4-hf",
                                                   "ours-tis-async8-hf", "ours-retrace-hf"]


def test_time_to_reach_ignores_step_zero():
    curve = [{"step": 0, "wall_seconds": 0.0, "accuracy": 0.5}, {"step": 10, "wall_seconds": 30.0, "accuracy": 0.4},
             {"step": 20, "wall_seconds": 60.0, "accuracy": 0.5}]
    assert vs_trl.time_to_reach(curve, 0.5) == 60.0
    assert vs_trl.time_to_reach(curve, 0.6) is None


def test_compare_against_trl_on_same_seed_and_engine():
    trl = result("trl-hf", 0, [(0, 0, 0.20), (10, 20, 0.25), (20, 40, 0.30), (30, 60, 0.28)])
    ours = result("ours-hf", 0, [(0, 0, 0.20), (10, 15, 0.29), (20, 30, 0.31)])
    slow = result("ours-hf", 1, [(0, 0, 0.20), (10, 15, 0.21)])
    trl1 = result("trl-hf", 1, [(0, 0, 0.20), (10, 30, 0.22)])
    lone = result("ours-vllm", 0, [(0, 0, 0.2), (10, 10, 0.3)])  # no TRL vLLM run: nothing to compare with
    out = {(r["name"], r["seed"]): r for r in vs_trl.compare([trl, ours, slow, trl1, lone])}
    assert out["trl-hf", 0]["trl_final_accuracy"] == 0.28
    assert out["trl-hf", 0]["time_to_trl_final"] == 40  # TRL's own first evaluation at or above its final
    assert out["trl-hf", 0]["ratio_to_trl"] == 1.0
    assert out["ours-hf", 0]["time_to_trl_final"] == 15
    assert out["ours-hf", 0]["ratio_to_trl"] == pytest.approx(15 / 40)
    assert out["ours-hf", 1]["time_to_trl_final"] is None and out["ours-hf", 1]["ratio_to_trl"] is None
    assert out["ours-vllm", 0]["trl_final_accuracy"] is None and out["ours-vllm", 0]["ratio_to_trl"] is None


def test_tables_and_means():
    results = vs_trl.compare([
        result("trl-hf", 0, [(0, 0, 0.2), (10, 40, 0.3)]), result("ours-hf", 0, [(0, 0, 0.2), (10, 20, 0.3)]),
        result("trl-hf", 1, [(0, 0, 0.2), (10, 40, 0.4)]), result("ours-hf", 1, [(0, 0, 0.2), (10, 20, 0.3)]),
        result("trl-hf", 2, [(0, 0, 0.2), (10, 50, 0.3)]), result("ours-hf", 2, [(0, 0, 0.2), (10, 25, 0.35)]),
    ])
    md, means = vs_trl.mean_table(results)
    ours = next(m for m in means if m["name"] == "ours-hf")
    assert ours["ratios"] == [0.5, None, 0.5]
    assert ours["mean_ratio"] == 0.5 and ours["not_reached"] == 1
    assert ours["mean_final"] == pytest.approx((0.3 + 0.3 + 0.35) / 3)
    assert ours["final_standard_error"] == pytest.approx(0.05 / 3)  # sample s.d. / sqrt(n)
    assert "| ours-hf | 0,1,2 | 20.0% | 31.7% ± 1.7 | +11.7 | 100 | 1.67 | 0.50, not reached, 0.50 | 0.50 (1 not reached) |" in md
    rows = vs_trl.seed_table(results).splitlines()
    assert rows[0].startswith("| seed | run | steps |") and "acc @0 | acc @10" in rows[0]
    assert "| 1 | ours-hf | 60 | 2 | 100 | 1.67 | 20.0% | 30.0% | not reached | — |" in rows


def test_table_only_reads_every_seed(tmp_path):
    for seed in (0, 1):
        (tmp_path / f"seed{seed}").mkdir()
        for name in ("trl-hf", "ours-hf"):
            r = result(name, seed, [(0, 0, 0.2), (10, 30 if name == "trl-hf" else 10, 0.3)])
            (tmp_path / f"seed{seed}" / f"{name}.json").write_text(json.dumps(r))
    vs_trl.main(["--table_only", "--out", str(tmp_path)])
    means = json.loads((tmp_path / "vs_trl.json").read_text())["means"]
    assert [m["name"] for m in means] == ["trl-hf", "ours-hf"]
    assert means[1]["ratios"] == [pytest.approx(1 / 3), pytest.approx(1 / 3)]
    assert (tmp_path / "vs_trl.png").exists()


class FakeLLM:
    def __init__(self):
        self.calls = []

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.calls.append((method, args, kwargs))
        return [None]

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache", (), None))


def test_shim_routes_weights_through_reload_weights_rpc():
    llm = FakeLLM()
    w = torch.randn(3, 4, requires_grad=True)
    n = vs_trl.sync_colocated_weights(llm, iter([("model.embed_tokens.weight", w)]))
    assert n == 1
    (m1, a1, kw1), (m2, _, _), (m3, _, _) = llm.calls
    assert m1 == "reload_weights" and a1 == () and kw1["is_checkpoint_format"] is True
    [(name, sent)] = kw1["weights_iterator"]
    assert name == "model.embed_tokens.weight" and torch.equal(sent, w) and not sent.requires_grad
    assert m2 is vs_trl.retie_lm_head  # a callable: vLLM runs it on each worker with the worker as argument
    assert m3 == "reset_prefix_cache"


def test_retie_lm_head_on_a_fake_worker():
    processed = []
    embed = SimpleNamespace(weight=torch.nn.Parameter(torch.ones(2, 2)))
    head = SimpleNamespace(weight=torch.nn.Parameter(torch.zeros(2, 2)),
                           quant_method=SimpleNamespace(process_weights_after_loading=processed.append))
    model = SimpleNamespace(config=SimpleNamespace(tie_word_embeddings=True), lm_head=head,
                            model=SimpleNamespace(embed_tokens=embed))
    worker = SimpleNamespace(model_runner=SimpleNamespace(get_model=lambda: model))
    vs_trl.retie_lm_head(worker)
    assert head.weight is embed.weight and processed == [head]
