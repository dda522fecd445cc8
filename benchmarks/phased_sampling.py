"""Phased generation samples the same distribution as one generate() call, on the real model.

The HF engine's `rollout_compact_every` generates in phases and drops finished rows between them;
the tests check that its log-probs equal a teacher-forced forward (`assert_compacted_sampling_exact`).
This benchmark checks the consequence a user cares about on the embedded model and its tokenizer:
many completions sampled each way, with disjoint seeds, give the same training reward and lengths
within their standard errors.

    python -m benchmarks.phased_sampling                 # the embedded model, 64 prompts x 32 samples per mode

Prints a table and writes `phased_sampling.json` / `.md` under --out.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch

from benchmarks.report import command_line, write_report


def mean_and_error(values: list[float]) -> tuple[float, float]:
    """Sample mean and its standard error."""
    if len(values) < 2:
        raise ValueError(f"need at least 2 values for a standard error, got {len(values)}")
    return statistics.mean(values), statistics.stdev(values) / math.sqrt(len(values))


def z_score(a: tuple[float, float], b: tuple[float, float]) -> float:
    """(mean_a - mean_b) over the standard error of the difference of two independent means."""
    se = math.hypot(a[1], b[1])
    return (a[0] - b[0]) / se if se > 0 else 0.0


def sample_mode(engine, prompts, solutions, tokenizer, max_new_tokens: int, seed: int) -> dict:
    """Sample every prompt once at temperature 1: the accuracy reward and length of each completion."""
    from nested_reft.engines import SamplingSpec
    from rewards.math import accuracy_reward

    start = time.perf_counter()
    out = engine.generate(prompts, SamplingSpec(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed))
    texts = tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)
    rewards = accuracy_reward([[{"content": t}] for t in texts], solutions)
    lengths = [float(len(c)) for c in out.completion_ids]
    return {"samples": len(rewards), "accuracy": mean_and_error(rewards), "length": mean_and_error(lengths),
            "seconds": time.perf_counter() - start}


def table(rows: dict, z: dict) -> str:
    lines = ["| generation | samples | training accuracy (± s.e.) | completion length (± s.e.) | seconds |",
             "|---|---:|---:|---:|---:|"]
    for name, r in rows.items():
        (a, ae), (n, ne) = r["accuracy"], r["length"]
        lines.append(f"| {name} | {r['samples']} | {a:.4f} ± {ae:.4f} | {n:.2f} ± {ne:.2f} | {r['seconds']:.0f} |")
    lines.append("")
    lines.append(f"difference (phases − one call) in standard errors: accuracy z = {z['accuracy']:+.2f}, "
                 f"length z = {z['length']:+.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model path (default: the embedded tiny math model)")
    p.add_argument("--prompts", type=int, default=64, help="training prompts")
    p.add_argument("--samples_per_prompt", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=128, help="completions per generate() call")
    p.add_argument("--compact_every", type=int, default=32, help="phase length of the phased mode")
    p.add_argument("--max_new_tokens", type=int, default=96)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="outputs/benchmarks/phased_sampling")
    args = p.parse_args(argv)
    for name in ("prompts", "samples_per_prompt", "batch_size", "compact_every", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nested_reft.data import synthetic_rows
    from nested_reft.engines import HFEngine

    path = args.model
    if path is None:
        from archs.tiny import build_tiny_math_model

        path = str(build_tiny_math_model())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rows = synthetic_rows("train", n=args.prompts, seed=123)
    prompts = [list(tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"]) for r in rows]
    eos = sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")})
    # every prompt samples_per_prompt times, in groups as GRPO has them; the engine splits it into batch_size calls
    all_prompts = [q for q in prompts for _ in range(args.samples_per_prompt)]
    solutions = [r["solution"] for r in rows for _ in range(args.samples_per_prompt)]
    results = {}
    for name, compact, seed in (("one generate() call", 0, 10_000), (f"phases of {args.compact_every}", args.compact_every, 20_000)):
        engine = HFEngine(model, tokenizer, eos_token_ids=eos, batch_size=args.batch_size, compact_every=compact)
        results[name] = sample_mode(engine, all_prompts, solutions, tokenizer, args.max_new_tokens, seed)
        print(f"{name}: {results[name]['samples']} samples in {results[name]['seconds']:.0f} s", flush=True)
    one, phased = results.values()
    z = {k: z_score(phased[k], one[k]) for k in ("accuracy", "length")}
    md = table(results, z)
    print(md)
    payload = {"command": command_line("benchmarks.phased_sampling", argv), "model": path, "results": results, "z": z,
               "args": vars(args)}
    write_report(Path(args.out), "phased_sampling", payload, md)
    return payload


if __name__ == "__main__":
    main()
