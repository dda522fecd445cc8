"""TRL's GRPOTrainer against NestedReFTTrainer on the same rollout engine, over seeds.

    python -m benchmarks.vs_trl [--runs trl-hf ours-onpolicy-hf ours-tis-hf ours-seq_is-hf ours-retrace-hf] [--seeds 0 1 2]
                                [--max_steps N] [--eval_every 10] [--eval_limit 100] [--threads 1]
                                [--out outputs/benchmarks/vs_trl] [--table_only]

Like for like: `-hf` runs sample with Hugging Face `generate()` on both sides (TRL `use_vllm=False`,
ours `engine=hf`); `-vllm` runs with a colocated, in-process vLLM on both sides, eager on both
(ours is the eager run-time-skip `VLLMEngine`, `vllm_compile: false`; TRL's is started eager by the
shim below), or compiled on both with `--compiled`. `ours-<variant>-async<N>-<engine>` runs the
variant with `async_rollouts` and `max_staleness` N (docs/async.md). The
hyper-parameters are those of recipes/configs/math_reft_tiny.yaml (the step budget is its
`max_steps` unless --max_steps is given); `ours-<engine>` keeps the config's skip ratio and correction
(and its `filter_groups`, which TRL does not have), `ours-onpolicy-<engine>` skips nothing, and
`ours-tis-…`, `ours-seq_is-…`, `ours-retrace-…` keep the skip ratio with that correction at its
default clip. TRL is on-policy (with its default vLLM importance-sampling correction on the vLLM
side). Every `--eval_every` steps
the clock is paused and held-out greedy accuracy is measured on `--eval_limit` problems (the same
problems for both sides of a seed). Wall-clock runs from trainer construction (vLLM start
included) and excludes evaluation.

Each run is its own process (one vLLM per process) writing `<out>/seed<S>/<run>.json`; the report
is made from every result under --out, so runs added later (more seeds, the vLLM pair) join the
same tables. Per seed: held-out accuracy against wall-clock, and for each of ours the ratio of the
wall-clock it needs to reach the final accuracy of TRL on the same engine to the wall-clock TRL
needed (first evaluation after step 0 at or above it); then the means over seeds. Writes
`vs_trl.json`, `vs_trl.md` and `vs_trl.png`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from benchmarks.report import write_report

CONFIG = "recipes/configs/math_reft_tiny.yaml"
SHARED_KEYS = ("num_generations", "per_device_train_batch_size", "max_completion_length", "temperature", "top_k",
               "top_p", "steps_per_generation", "learning_rate", "lr_scheduler_type", "warmup_steps", "beta", "loss_type",
               "reward_weights")
RUNS = ("trl-hf", "ours-hf", "trl-vllm", "ours-vllm")
# ours-<variant>-<engine>: 'onpolicy' samples with the full model (nothing skipped); a correction
# name keeps the config's skip ratio with that correction at its default clip (seq_is: untruncated).
VARIANTS = ("onpolicy", "tis", "seq_is", "retrace")


def _split_variant(variant: str) -> tuple[str, int | None]:
    """'tis-async2' -> ('tis', 2); 'tis' -> ('tis', None)."""
    base, marker, staleness = variant.partition("-async")
    return base, (int(staleness) if marker and staleness.isdigit() and int(staleness) >= 1 else -1 if marker else None)


def parse_run(name: str) -> tuple[str, str]:
    """'trl-vllm' -> ('trl', 'vllm'); 'ours-retrace-hf' -> ('ours', 'hf'); 'ours-tis-async1-hf' -> ('ours', 'hf')."""
    head, _, engine = name.rpartition("-")
    side, dash, variant = head.partition("-")
    base, staleness = _split_variant(variant)
    if side not in ("trl", "ours") or engine not in ("hf", "vllm") or (dash and (side == "trl" or base not in VARIANTS
                                                                                  or staleness == -1)):
        raise ValueError(f"run {name!r}: expected one of {', '.join(RUNS)}, or ours-<variant>-<engine> with a variant "
                         f"from {', '.join(VARIANTS)}, optionally asynchronous: ours-<variant>-async<N>-<engine> "
                         "(max_staleness N >= 1)")
    return side, engine


def run_variant(name: str) -> str | None:
    """'ours-retrace-hf' -> 'retrace'; 'ours-tis-async1-hf' -> 'tis'; None for the config's own settings."""
    head = name.rpartition("-")[0]
    return _split_variant(head.partition("-")[2])[0] or None


def run_staleness(name: str) -> int | None:
    """'ours-tis-async2-hf' -> 2 (async_rollouts with max_staleness 2); None: synchronous."""
    return _split_variant(name.rpartition("-")[0].partition("-")[2])[1]


def run_order(name: str) -> tuple:
    """TRL first, then ours with the config's settings, on-policy, and the corrections in VARIANTS order;
    each synchronous before its asynchronous runs."""
    side, engine = parse_run(name)
    variant = run_variant(name)
    return (engine, side != "trl", -1 if variant is None else VARIANTS.index(variant), run_staleness(name) or 0)


# --------------------------------------------------------------------------- TRL colocated vLLM shim
#
# TRL 1.16 syncs a colocated vLLM by calling the model's `load_weights` directly, one parameter at a
# time (`llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights([(name, p)])`).
# On CPU, vLLM 0.32 post-processes every linear layer after loading: `dispatch_cpu_unquantized_gemm`
# packs the weight for oneDNN (float32 on this CPU) and, with `remove_weight=True`, replaces
# `layer.weight` by an empty `nn.Parameter` that has no `weight_loader`. The next `load_weights`
# then fails with `AttributeError: 'Parameter' object has no attribute 'weight_loader'` (and even
# if it did not, the packed kernel weight would keep the old values). vLLM's own in-place
# `reload_weights(..., is_checkpoint_format=True)` restores each layer's loadable parameters,
# loads, and re-runs the post-processing, so the shim sends TRL's tensors (TRL's own names, from
# TRL's own iterator) through `LLM.collective_rpc("reload_weights", ...)`. A tied LM head is not
# re-processed by that reload (its packed GEMM weight would keep the old embedding), so it is
# re-tied afterwards, as our vLLM worker does. The shim also starts TRL's vLLM with
# `enforce_eager=True`, which TRL does not expose, so both sides run vLLM the same way.
# Nothing of TRL's installed files is changed: the subclass is used only while the trainer is built.
#
# Both sides also start vLLM with `enable_chunked_prefill=False`. A round's 128 prompts (~6k tokens)
# exceed vLLM's 4096-token step budget, so with chunked prefill one prompt is prefilled in two steps
# and vLLM rewinds that request's generator (`gen.set_offset(...)` in `_bookkeeping_sync`), which on
# CPU raises `RuntimeError: CPU Generator does not use offset` whenever the request is seeded, as
# every request of our engine is. TRL's requests are unseeded and would not crash; it gets the same
# setting so that the two schedulers match.
#
# TRL passes no dtype, so vLLM's "auto" downcasts the float32 checkpoint to bfloat16 on CPU (it logs
# "Downcasting torch.float32 to torch.bfloat16"); its samples then differ from the float32 trainer
# by up to 0.15-0.33 nats per token (TRL's `sampling/sampling_logp_difference/max`, per round).
# Ours runs vLLM in the config's `vllm_dtype` (float32); the shim starts TRL's vLLM in the same dtype.
VLLM_START = dict(enforce_eager=True, enable_chunked_prefill=False)


def retie_lm_head(worker) -> None:
    """Run on a vLLM worker (`collective_rpc` passes the worker as the first argument)."""
    from nested_reft.engines.vllm_worker import NestedReFTWorkerExtension

    NestedReFTWorkerExtension._retie_embeddings(worker)


def sync_colocated_weights(llm, named_params) -> int:
    """Load (name, tensor) pairs into a colocated vLLM through its public RPC; returns how many."""
    named = [(name, tensor.detach()) for name, tensor in named_params]
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named, "is_checkpoint_format": True})
    llm.collective_rpc(retie_lm_head)
    llm.reset_prefix_cache()
    return len(named)


def reloading_vllm_generation(dtype: str, compiled: bool = False):
    """TRL's `VLLMGeneration` with the weight sync and the vLLM start described above."""
    import functools

    import trl.generation.vllm_generation as tvg

    class ReloadingVLLMGeneration(tvg.VLLMGeneration):
        def _init_vllm(self):
            llm_cls = tvg.LLM
            tvg.LLM = functools.partial(llm_cls, dtype=dtype, **{**VLLM_START, "enforce_eager": not compiled})
            try:
                super()._init_vllm()
            finally:
                tvg.LLM = llm_cls

        def sync_weights(self):
            if self.mode != "colocate" or self.enable_sleep_mode or self.accelerator.num_processes > 1:
                return super().sync_weights()  # the shim covers the single-process colocated case only
            # materialised in one list: fine without ZeRO-3 / FSDP sharding (one process here)
            sync_colocated_weights(self.llm, self._iter_named_params())

    return ReloadingVLLMGeneration


def ours_vllm_engine(targs, model, tokenizer, compiled: bool = False):
    """The eager `VLLMEngine` that `build_engine` makes for `targs` with `vllm_compile: false` (with
    `compiled`: the `CompiledVLLMEngine` of `vllm_compile: true`), started with `VLLM_START`'s chunked
    prefill off (see above). EOS ids as TRL's trainer derives them."""
    from nested_reft.engines.factory import model_source
    from nested_reft.engines.vllm_engine import VLLMEngine

    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer.eos_token_id not in eos:
        eos = [tokenizer.eos_token_id, *eos]
    engine_class = VLLMEngine
    if compiled:  # the compiled engine (holds only the kept layers), as `vllm_compile: true` builds it
        from nested_reft.engines.vllm_compiled import CompiledVLLMEngine as engine_class
    return engine_class(model_source(model), eos_token_ids=eos, dtype=targs.vllm_dtype, seed=targs.seed,
                      gpu_memory_utilization=targs.vllm_gpu_memory_utilization,
                      max_model_len=targs.vllm_max_model_length, multiprocessing=not targs.vllm_in_process,
                      cpu_kvcache_gib=targs.vllm_cpu_kvcache_gib,
                      **{k: v for k, v in VLLM_START.items() if k != "enforce_eager"})


@contextlib.contextmanager
def trl_colocated_vllm_shim(dtype: str, compiled: bool = False):
    """While TRL's GRPOTrainer is built, it constructs our `VLLMGeneration` subclass."""
    import trl.trainer.grpo_trainer as grpo

    original = grpo.VLLMGeneration
    grpo.VLLMGeneration = reloading_vllm_generation(dtype, compiled)
    try:
        yield
    finally:
        grpo.VLLMGeneration = original


# --------------------------------------------------------------------------- one run


def run_one(name: str, seed: int, args) -> dict:
    """One training run in this process; returns its accuracy-vs-wall-clock curve."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch

    if args.threads:  # same CPU threads for the trainer and vLLM in every run
        torch.set_num_threads(args.threads)
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"  # let the OS place the threads (cores are shared)
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from archs.tiny import build_tiny_math_model
    from nested_reft.config import NestedReFTConfig
    from nested_reft.data import load_math_dataset
    from nested_reft.evaluation import evaluate_math
    from nested_reft.trainer import NestedReFTTrainer
    from rewards.math import accuracy_reward, format_reward

    side, engine = parse_run(name)
    cfg = yaml.safe_load(Path(args.config).read_text())
    max_steps = args.max_steps or cfg["max_steps"]
    common = dict(output_dir=str(Path(args.out) / f"seed{seed}" / name), max_steps=max_steps, save_strategy="no",
                  report_to=[], logging_steps=1, bf16=False, use_cpu=not torch.cuda.is_available(),
                  log_completions=False, seed=seed, **{k: cfg[k] for k in SHARED_KEYS})
    path = str(build_tiny_math_model())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    train = load_math_dataset("synthetic", "train", seed=seed)  # as the recipe: the seed picks data and held-out set
    test = load_math_dataset("synthetic", "test", limit=args.eval_limit, seed=seed)
    curve: list[dict] = []
    clock = {"start": 0.0, "paused": 0.0}
    model_ref = [model]
    trainer_ref = [None]

    def evaluate(step: int) -> None:
        # an asynchronous run's producer would sample on while the clock is paused: let it finish the
        # rounds it has in flight first, on the clock (the trainer then idles, which a run without
        # evaluations would not: this errs against asynchronous runs)
        for job in list(getattr(trainer_ref[0], "_jobs", {}).values()):
            job.future.exception()
        t = time.perf_counter()
        r = evaluate_math(model_ref[0], tokenizer, test, temperature=0.0, max_new_tokens=cfg["eval_max_new_tokens"], batch_size=64)
        elapsed = t - clock["start"] - clock["paused"] if clock["start"] else 0.0
        clock["paused"] += time.perf_counter() - t
        curve.append({"step": step, "wall_seconds": elapsed, "accuracy": r.accuracy})
        print(f"[{name} seed {seed}] step {step}: held-out accuracy {r.accuracy:.1%} at {elapsed:.0f} s", flush=True)

    logs_: list[dict] = []  # the trainers' own metrics per step (reward, TRL's vLLM/trainer log-prob gap, ESS, ...)

    class EvalEvery(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            if state.global_step % args.eval_every == 0 or state.global_step == max_steps:
                evaluate(state.global_step)

        def on_log(self, targs, state, control, logs=None, **kw):
            logs_.append({"step": state.global_step, **{k: v for k, v in (logs or {}).items() if isinstance(v, int | float)}})

    evaluate(0)
    clock["start"] = time.perf_counter()
    kw = dict(model=model, reward_funcs=[accuracy_reward, format_reward], train_dataset=train,
              processing_class=tokenizer, callbacks=[EvalEvery()])
    if side == "trl":
        vllm = dict(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.3) if engine == "vllm" else {}
        targs = GRPOConfig(**vllm, **common)
        with trl_colocated_vllm_shim(cfg["vllm_dtype"], args.compiled) if engine == "vllm" else contextlib.nullcontext():
            trainer = GRPOTrainer(args=targs, **kw)
    else:
        variant = run_variant(name)
        skip_ratio = cfg["skip_ratio"] if args.skip_ratio is None else args.skip_ratio
        correction, clip = cfg["correction"], cfg["clip"]
        if variant == "onpolicy":
            skip_ratio = 0.0
        elif variant is not None:
            correction, clip = variant, None  # the correction's own default clip
        staleness = run_staleness(name)
        targs = NestedReFTConfig(engine=engine, vllm_dtype=cfg["vllm_dtype"], skip_ratio=skip_ratio,
                                 async_rollouts=staleness is not None, max_staleness=staleness or 1,
                                 correction=correction, clip=clip, keep_first=cfg["keep_first"],
                                 keep_last=cfg["keep_last"], skip_mode=cfg["skip_mode"],
                                 filter_groups=cfg.get("filter_groups", False),
                                 rollout_batch_size=cfg["rollout_batch_size"], full_model_probe_every=0, **common)
        engine_obj = ours_vllm_engine(targs, model, tokenizer, args.compiled) if engine == "vllm" else None
        trainer = NestedReFTTrainer(args=targs, engine=engine_obj, **kw)
    model_ref[0], trainer_ref[0] = trainer.model, trainer
    construct = time.perf_counter() - clock["start"]
    trainer.train()
    total = time.perf_counter() - clock["start"] - clock["paused"]
    if hasattr(trainer, "engine"):
        trainer.engine.close()
    return {"name": name, "seed": seed, "side": side, "engine": engine, "curve": curve, "construct_seconds": construct,
            "train_wall_seconds": total, "steps": trainer.state.global_step,
            "skip_ratio": getattr(targs, "skip_ratio", 0.0), "correction": getattr(targs, "correction", None),
            "max_staleness": run_staleness(name) if side == "ours" else None, "threads": args.threads,
            "load_average_1min": os.getloadavg()[0], "logs": logs_}


# --------------------------------------------------------------------------- report


def time_to_reach(curve: list[dict], target: float) -> float | None:
    """Wall-clock of the first evaluation after step 0 at or above `target` (None: never)."""
    return next((p["wall_seconds"] for p in curve if p["step"] > 0 and p["accuracy"] >= target), None)


def compare(results: list[dict]) -> list[dict]:
    """Adds to each result the target (TRL's final accuracy on the same seed and engine), the time to
    reach it, and the ratio of that time to TRL's own; None where TRL's run or the time is missing."""
    trl = {(r["seed"], r["engine"]): r for r in results if r["side"] == "trl"}
    for r in results:
        ref = trl.get((r["seed"], r["engine"]))
        target = ref["curve"][-1]["accuracy"] if ref else None
        t = time_to_reach(r["curve"], target) if target is not None else None
        t_ref = time_to_reach(ref["curve"], target) if ref else None
        r.update(trl_final_accuracy=target, time_to_trl_final=t,
                 ratio_to_trl=t / t_ref if t is not None and t_ref else None)
    return results


def _fmt(x, spec: str, none: str = "—") -> str:
    return none if x is None else format(x, spec)


def seed_table(results: list[dict]) -> str:
    steps = sorted({p["step"] for r in results for p in r["curve"]})
    lines = ["| seed | run | steps | start s | train wall-clock s | s/step | " + " | ".join(f"acc @{s}" for s in steps)
             + " | time to TRL's final acc | ratio to TRL |",
             "|---|---|---|---|---|---|" + "---|" * len(steps) + "---|---|"]
    for r in sorted(results, key=lambda r: (r["engine"], r["seed"], run_order(r["name"]))):
        acc = {p["step"]: p["accuracy"] for p in r["curve"]}
        cells = " | ".join(_fmt(acc.get(s), ".1%") for s in steps)
        reach = "not reached" if r["trl_final_accuracy"] is not None and r["time_to_trl_final"] is None else _fmt(r["time_to_trl_final"], ".0f")
        lines.append(f"| {r['seed']} | {r['name']} | {r['steps']} | {r['construct_seconds']:.0f} | {r['train_wall_seconds']:.0f} | "
                     f"{r['train_wall_seconds'] / max(1, r['steps']):.2f} | {cells} | {reach} | {_fmt(r['ratio_to_trl'], '.2f')} |")
    return "\n".join(lines)


def mean_table(results: list[dict]) -> tuple[str, list[dict]]:
    rows = []
    for name in dict.fromkeys(r["name"] for r in sorted(results, key=lambda r: run_order(r["name"]))):
        mine = sorted((r for r in results if r["name"] == name), key=lambda r: r["seed"])
        ratios = [r["ratio_to_trl"] for r in mine]
        defined = [x for x in ratios if x is not None]
        finals = [r["curve"][-1]["accuracy"] for r in mine]
        rows.append({"name": name, "seeds": [r["seed"] for r in mine],
                     "mean_before": statistics.mean(r["curve"][0]["accuracy"] for r in mine),
                     "mean_final": statistics.mean(finals),
                     "final_standard_error": statistics.stdev(finals) / len(finals) ** 0.5 if len(finals) > 1 else None,
                     "mean_train_wall_seconds": statistics.mean(r["train_wall_seconds"] for r in mine),
                     "mean_seconds_per_step": statistics.mean(r["train_wall_seconds"] / max(1, r["steps"]) for r in mine),
                     "ratios": ratios, "mean_ratio": statistics.mean(defined) if defined else None,
                     "not_reached": sum(x is None for x in ratios) if mine[0]["side"] == "ours" else 0})
    lines = ["| run | seeds | mean acc @0 | mean final acc ± s.e. | mean Δ | mean train wall-clock s | mean s/step "
             "| ratio to TRL per seed | mean ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m in rows:
        per_seed = ", ".join(_fmt(x, ".2f", "not reached") for x in m["ratios"]) if not m["name"].startswith("trl") else "1 (reference)"
        mean = _fmt(m["mean_ratio"], ".2f") + (f" ({m['not_reached']} not reached)" if m["not_reached"] else "")
        error = "" if m["final_standard_error"] is None else f" ± {100 * m['final_standard_error']:.1f}"
        lines.append(f"| {m['name']} | {','.join(map(str, m['seeds']))} | {m['mean_before']:.1%} | {m['mean_final']:.1%}{error} | "
                     f"{100 * (m['mean_final'] - m['mean_before']):+.1f} | {m['mean_train_wall_seconds']:.0f} | "
                     f"{m['mean_seconds_per_step']:.2f} | {per_seed} | {mean if not m['name'].startswith('trl') else '—'} |")
    return "\n".join(lines), rows


def report(results: list[dict], out: Path) -> str:
    results = compare(results)
    means_md, means = mean_table(results)
    md = "Per seed:\n\n" + seed_table(results) + "\n\nMeans over seeds:\n\n" + means_md
    print("\n" + md)
    write_report(out, "vs_trl", {"results": results, "means": means}, md)
    plot(results, out / "vs_trl.png")
    print(f"wrote {out}/vs_trl.json, vs_trl.md, vs_trl.png")
    return md


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = sorted({r["engine"] for r in results})
    fig, axes = plt.subplots(1, len(engines), figsize=(6.5 * len(engines), 4.5), squeeze=False)
    names = sorted({r["name"].rpartition("-")[0] for r in results}, key=lambda n: run_order(n + "-hf"))
    colors = dict(zip(names, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")))
    for ax, engine in zip(axes[0], engines):
        for r in sorted((r for r in results if r["engine"] == engine), key=lambda r: (run_order(r["name"]), r["seed"])):
            run = r["name"].rpartition("-")[0]
            first = r["seed"] == min(x["seed"] for x in results if x["name"] == r["name"])
            ax.plot([p["wall_seconds"] for p in r["curve"]], [p["accuracy"] for p in r["curve"]], "o-", ms=3,
                    color=colors.get(run, "tab:gray"), alpha=0.7, label=run if first else None)
        ax.set_title(f"{engine} rollouts on both sides", fontsize=10)
        ax.set_xlabel("training wall-clock (s, evaluation excluded)")
        ax.set_ylabel("held-out greedy accuracy")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_results(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("seed*/*.json"))]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=["trl-hf", "ours-onpolicy-hf", "ours-tis-hf", "ours-seq_is-hf", "ours-retrace-hf"],
                   help=f"from {', '.join(RUNS)}, or ours-<variant>-<engine> with a variant from {', '.join(VARIANTS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max_steps", type=int, default=None, help="default: the config's max_steps")
    p.add_argument("--eval_every", type=int, default=10)
    p.add_argument("--eval_limit", type=int, default=100)
    p.add_argument("--skip_ratio", type=float, default=None, help="ours: default the config's")
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--out", default="outputs/benchmarks/vs_trl")
    p.add_argument("--compiled", action="store_true", help="-vllm runs: compiled vLLM on both sides (ours: "
                   "CompiledVLLMEngine; TRL's without enforce_eager) instead of eager on both")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per run (1 avoids oversubscription on a shared machine)")
    p.add_argument("--table_only", action="store_true", help="report the results already under --out, run nothing")
    p.add_argument("--run", default=None, help=argparse.SUPPRESS)  # child mode: one run, JSON to --out/seed<S>/<run>.json
    args = p.parse_args(argv)
    for name in args.runs if args.run is None else [args.run]:
        try:
            parse_run(name)
        except ValueError as e:
            p.error(f"--runs: {e}")
    out = Path(args.out)
    if args.run is not None:
        seed = args.seeds[0]
        (out / f"seed{seed}").mkdir(parents=True, exist_ok=True)
        (out / f"seed{seed}" / f"{args.run}.json").write_text(json.dumps(run_one(args.run, seed, args)))
        return
    out.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        for i, seed in enumerate(args.seeds):
            # every other seed the other order, so neither side always runs first
            for name in args.runs if i % 2 == 0 else args.runs[::-1]:
                cmd = [sys.executable, "-m", "benchmarks.vs_trl", "--run", name, "--seeds", str(seed),
                       "--eval_every", str(args.eval_every), "--eval_limit", str(args.eval_limit), "--out", str(out),
                       "--config", args.config]
                for flag in ("max_steps", "threads", "skip_ratio"):
                    if getattr(args, flag) is not None:
                        cmd += [f"--{flag}", str(getattr(args, flag))]
                if args.compiled:
                    cmd.append("--compiled")
                log = out / f"seed{seed}" / f"{name}.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                start = time.perf_counter()
                with log.open("w") as f:
                    if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
                        raise RuntimeError(f"run {name} (seed {seed}) failed; see {log}")
                print(f"{name} seed {seed}: done in {time.perf_counter() - start:.0f} s", flush=True)
    results = read_results(out)
    if not results:
        raise SystemExit(f"no results under {out}")
    report(results, out)


if __name__ == "__main__":
    main()
