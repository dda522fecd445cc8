"""The math recipe as 2 processes on CPU (gloo) under `accelerate launch` with the shipped configs
of recipes/accelerate/: DDP, DeepSpeed ZeRO-2, ZeRO-3 with the in-process engine (the policy
gathered for each generation round) and ZeRO-3 with the colocated vLLM engine (gathered for each
weight sync). Each process records evidence (tests/recipes/multiprocess_worker.py); the checks:

- both ranks hold identical weights at the start and after every optimizer step, and they moved;
- the in-process engine samples from whole parameters (under ZeRO-3, gathered for the round);
- every round both ranks draw the same skip set, and the sets differ between rounds (so "the
  same" is not trivially true), while k follows the ESS controller;
- no two (rank, round, turn) share a sampling seed, and each is `round_seed(seed, round, rank, turn)`;
- the logged correction/* metrics equal the diagnostics of both ranks' rows together, which
  differ from one rank's own, and the controller was given that global ESS on both ranks;
- with vLLM, every round samples from weights equal to the trainer's (ratio 1 to 1e-5 with
  nothing skipped while the weights move by 1e-2 a step): the ZeRO-3 sync sent whole tensors;
- the main process alone prints the table and writes the run's files.

DeepSpeed on CPU: accelerate runs it with `--use_cpu true` (gloo); its first run here compiles
DeepSpeed's shared-memory collective (about 2 minutes, cached in ~/.cache/torch_extensions).
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nested_reft.corrections import diagnostics
from nested_reft.engines.base import round_seed

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "recipes" / "multiprocess_worker.py"
STEPS = 3
COMMON = [
    "--config", "recipes/configs/math_reft_tiny.yaml", "--eval_limit", "4", "--eval_max_new_tokens", "8",
    "--max_completion_length", "12", "--per_device_train_batch_size", "4", "--num_generations", "4",
    "--steps_per_generation", "1", "--save_strategy", "no", "--full_model_probe_every", "0", "--eval_every", "0",
    "--warmup_steps", "0", "--lr_scheduler_type", "constant", "--max_steps", str(STEPS), "--use_cpu", "true",
]
# 4 skippable layers of 6, k = round(r * 6): 2, 2, then 3 as the controller raises r by 0.05 a round
SKIPPING = ["--skip_ratio", "0.34", "--keep_first", "1", "--keep_last", "1", "--correction", "ess_adaptive",
            "--ess_target", "0.5", "--learning_rate", "1e-3"]
FULL_MODEL_VLLM = ["--skip_ratio", "0", "--correction", "tis", "--learning_rate", "1e-2", "--engine", "vllm",
                   "--vllm_max_model_length", "256"]

CASES = {  # name: (config, extra args, distributed type, ZeRO stage, engine, needs)
    "ddp": ("multi_cpu.yaml", SKIPPING, "MULTI_CPU", None, "HFEngine", None),
    "zero2": ("deepspeed_zero2.yaml", SKIPPING, "DEEPSPEED", 2, "HFEngine", "deepspeed"),
    "zero3": ("deepspeed_zero3.yaml", SKIPPING, "DEEPSPEED", 3, "HFEngine", "deepspeed"),
    "zero3_vllm": ("deepspeed_zero3.yaml", FULL_MODEL_VLLM, "DEEPSPEED", 3, "CompiledVLLMEngine", "vllm"),
}


def free_port() -> int:
    with socket.socket() as s:  # other runs on this machine may hold accelerate's default 29500
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: str, args: list[str], model_dir: str, tmp_path: Path):
    out, evidence = tmp_path / "run", tmp_path / "evidence"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"recipes/accelerate/{config}",
           "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()),
           str(WORKER), str(evidence), *COMMON, *args, "--model_name_or_path", model_dir, "--output_dir", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's packages in the launched processes
    # the timeout guards against a hang (ranks waiting on each other), not a speed limit
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [torch.load(evidence / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return ranks, [r for r in rows if "correction/ess" in r], proc.stdout, out


def global_diagnostics(ranks, step: int, method: str) -> tuple[dict, dict]:
    """diagnostics() over both ranks' rows of `step` as the trainer gathers them (rank order,
    padded to the wider one), and over rank 0's rows alone."""
    parts = [r["local_rows"][4 * step: 4 * step + 4] for r in ranks]  # old, behavior, mask, weights
    width = max(p[0].size(1) for p in parts)
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.size(1)))  # noqa: E731
    both = [torch.cat([pad(parts[0][k]), pad(parts[1][k])]) for k in range(4)]
    return diagnostics(*both, method, clip=2.0), diagnostics(*parts[0], method, clip=2.0)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_train_as_one(case, small_model_dir, tmp_path):
    config, args, distributed, stage, engine, needs = CASES[case]
    if needs and importlib.util.find_spec(needs) is None:
        pytest.skip(f"needs {needs} (make test installs it)")
    ranks, rows, stdout, out = launch(config, args, small_model_dir, tmp_path)
    method = "ess_adaptive" if "ess_adaptive" in args else "tis"

    for r, e in enumerate(ranks):
        assert (e["rank"], e["world_size"]) == (r, 2)
        assert e["distributed_type"] == f"DistributedType.{distributed}" and e["zero_stage"] == stage
        assert e["engine"] == engine
    # identical weights after every step, and the steps changed them
    w0, w1 = ranks[0]["weights"], ranks[1]["weights"]
    assert len(w0) == len(w1) == STEPS + 1
    for step in range(STEPS + 1):
        assert torch.equal(w0[step], w1[step]), f"ranks differ after step {step}"
        if step:
            assert (w0[step] - w0[step - 1]).abs().max() > 1e-4, f"step {step} did not move the weights"
    # the in-process engine sampled from whole parameters (ZeRO-3: gathered), every round, on both ranks
    if engine == "HFEngine":
        assert all(e["sampled_numel"] == [w0[0].numel()] * STEPS for e in ranks), [e["sampled_numel"] for e in ranks]
    # one skip set per round, the same on both ranks
    rounds = ranks[0]["rounds"]
    assert rounds == ranks[1]["rounds"] and [i for i, _ in rounds] == list(range(STEPS))
    if method == "ess_adaptive":
        assert len({s for _, s in rounds}) >= 2, rounds
        assert [len(s) for _, s in rounds] == [2, 2, 3], rounds  # k steered by the controller
    else:
        assert all(s == () for _, s in rounds)
    # distinct sampling seeds, from the rank's own formula
    seeds = [(e["rank"], *rec) for e in ranks for rec in e["seeds"]]
    assert len(seeds) == 2 * STEPS and len({s for *_, s in seeds}) == len(seeds)
    assert all(seed == round_seed(0, rnd, rank, turn) for rank, rnd, turn, seed in seeds)
    # correction metrics over both ranks' tokens, as logged and as fed to the controller
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    local_differs = False
    for step, row in enumerate(rows):
        both, rank0 = global_diagnostics(ranks, step, method)
        for key, value in both.items():
            assert row[f"correction/{key}"] == pytest.approx(value, rel=1e-6, abs=1e-9), (step, key)
        local_differs |= abs(rank0["ess"] - both["ess"]) > 1e-6
        if method == "ess_adaptive":
            assert ranks[0]["controller_ess"][step] == ranks[1]["controller_ess"][step]
            assert ranks[0]["controller_ess"][step] == pytest.approx(both["ess"], rel=1e-9)
        if engine == "VLLMEngine":  # the engine's weights were the trainer's, every round
            assert abs(row["correction/ratio_min"] - 1) < 1e-5 and abs(row["correction/ratio_max"] - 1) < 1e-5, row
            assert row["rollout/weight_sync_seconds"] > 0
    if method == "ess_adaptive":  # (with nothing skipped every ESS is 1: the skipping cases show this)
        assert local_differs, "one rank's rows gave the ESS of both ranks': the check would not see a missing gather"
    # the main process alone reports
    assert stdout.count("| before |") == 1 and stdout.count("outputs: ") == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["mean_ess"] == pytest.approx(sum(r["correction/ess"] for r in rows) / STEPS)
    assert (out / "final" / "config.json").exists()


# ---------------------------------------------------------------- every shipped config, without launching

OK = None
FSDP = r"FSDP keeps only shards"
CUDA0 = r"engine='vllm' with 8 trainer processes: .* on cuda:0"
POT3 = r"behavior='pot' builds its sampler .* ZeRO-3 shards"
VERDICTS = {  # config: (processes, sharding, stage, {(engine, behavior): None or the error's pattern})
    "ddp.yaml": (8, None, 0, {("hf", "skip"): OK, ("hf", "pot"): OK, ("vllm", "skip"): CUDA0, ("vllm_server", "skip"): OK}),
    "deepspeed_zero2.yaml": (8, "deepspeed", 2, {("hf", "skip"): OK, ("hf", "pot"): OK, ("vllm", "skip"): CUDA0,
                                                 ("vllm_server", "skip"): OK}),
    "deepspeed_zero2_offload.yaml": (8, "deepspeed", 2, {("hf", "skip"): OK, ("hf", "pot"): OK, ("vllm", "skip"): CUDA0,
                                                         ("vllm_server", "skip"): OK}),
    "deepspeed_zero3.yaml": (8, "deepspeed", 3, {("hf", "skip"): OK, ("hf", "pot"): POT3, ("vllm", "skip"): CUDA0,
                                                 ("vllm_server", "skip"): OK}),
    "deepspeed_zero3_offload.yaml": (8, "deepspeed", 3, {("hf", "skip"): OK, ("hf", "pot"): POT3, ("vllm", "skip"): CUDA0,
                                                         ("vllm_server", "skip"): OK}),
    "fsdp.yaml": (8, "fsdp", 0, {("hf", "skip"): FSDP, ("hf", "pot"): FSDP, ("vllm", "skip"): FSDP,
                                 ("vllm_server", "skip"): FSDP}),
    "multi_cpu.yaml": (2, None, 0, {("hf", "skip"): OK, ("hf", "pot"): OK, ("vllm", "skip"): OK, ("vllm_server", "skip"): OK}),
}


def launch_env(config: str) -> tuple[dict, object]:
    """The environment `accelerate launch --config_file <config>` gives each process (from
    accelerate's own launcher code), and the parsed launch arguments."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(ROOT / "recipes" / "accelerate" / config),
                                               "-m", "recipes.math_reft"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        env = prepare_deepspeed_cmd_env(args)[1]
    else:
        env = prepare_multi_gpu_env(args)
    env["WORLD_SIZE"] = str(args.num_processes * args.num_machines)  # what torch's launcher adds
    return env, args


def test_every_shipped_config_is_listed():
    assert sorted(p.name for p in (ROOT / "recipes" / "accelerate").glob("*.yaml")) == sorted(VERDICTS)


@pytest.mark.parametrize("config", list(VERDICTS))
def test_config_loads_and_preflight_decides(config, monkeypatch):
    """Each config loads through accelerate's loader and its plugin validates it; preflight then
    accepts or rejects every engine and behavior before any model loads, as docs/scaling.md says.
    The GPU configs are judged as on a GPU machine, multi_cpu.yaml as on CPU."""
    from types import SimpleNamespace

    from recipes.preflight import check_engine_and_sharding, launch_sharding

    env, launch_args = launch_env(config)
    for key in [k for k in os.environ if k.startswith(("ACCELERATE_", "FSDP_"))]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    processes, sharding, stage, verdicts = VERDICTS[config]
    use_cpu = bool(launch_args.use_cpu)
    if sharding == "deepspeed" and importlib.util.find_spec("deepspeed"):
        from accelerate.utils import DeepSpeedPlugin

        plugin = DeepSpeedPlugin()  # reads the same variables; raises on an invalid combination
        assert plugin.zero_stage == stage
        offload = plugin.deepspeed_config["zero_optimization"]["offload_optimizer"]["device"]
        assert (offload == "cpu") == config.endswith("_offload.yaml")
    if sharding == "fsdp":
        from accelerate.utils import FullyShardedDataParallelPlugin

        assert FullyShardedDataParallelPlugin().fsdp_version == 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: not use_cpu)
    base = SimpleNamespace(deepspeed=None, fsdp=None, ds3_gather_for_generation=True, use_cpu=use_cpu)
    assert launch_sharding(base) == (processes, sharding, stage)
    for (engine, behavior), error in verdicts.items():
        args = SimpleNamespace(**vars(base), engine=engine, behavior=behavior)
        if error is None:
            check_engine_and_sharding(args, use_peft=False)
        else:
            with pytest.raises(ValueError, match=error):
                check_engine_and_sharding(args, use_peft=False)


# ---------------------------------------------------------------- decisions made once

def _decide(rank: int, port: int, results) -> None:
    from types import SimpleNamespace

    from accelerate import PartialState

    from recipes.distributed import on_main_process

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    PartialState(cpu=True)  # a gloo group of 2, as the recipes' TrainingArguments make it
    args = SimpleNamespace(world_size=2, process_index=rank)
    calls = []
    shared = on_main_process(args, lambda: calls.append(rank) or {"folder": "run-1", "rank": rank})

    def refuse():
        raise ValueError("run holds another run's checkpoints")

    try:
        on_main_process(args, refuse)
        error = None
    except Exception as e:  # noqa: BLE001
        error = f"{type(e).__name__}: {e}"
    results[rank] = (shared, calls, error)


def test_on_main_process_runs_once_and_shares_answer_and_error():
    """The main process alone decides (the run folder), every process gets its answer, and when it
    fails every process fails (none waits forever for an answer)."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_decide, args=(free_port(), results), nprocs=2, join=True)
        results = dict(results)
    assert results[0][0] == results[1][0] == {"folder": "run-1", "rank": 0}
    assert results[0][1] == [0] and results[1][1] == []  # fn ran on the main process only
    assert results[0][2] == "ValueError: run holds another run's checkpoints"
    assert results[1][2] == "RuntimeError: the main process stopped: ValueError: run holds another run's checkpoints"
