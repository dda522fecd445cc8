"""KL(μ‖π) per token of layer-skipped behavior models against the full model, on their own samples.

For each skip set S: completions are sampled at temperature 1 from μ = the model with S skipped (HF
engine, held-out prompts), and KL(μ‖π) per token is the mean over sampled tokens of the exact
per-position KL Σ_v μ(v) (log μ(v) − log π(v)) (the full distributions, not a one-sample estimate).

    python -m benchmarks.skip_kl --skip_sets "2;5;9;2,3,4;5,6,7;7,8,9;3,6,9"     # the embedded model
    python -m benchmarks.skip_kl --model PATH --skip_sets "10;10,11"
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.report import command_line, write_report


def parse_skip_sets(text: str) -> list[tuple[int, ...]]:
    """ "2;3;2,3" -> [(2,), (3,), (2, 3)]; one clear error for anything else."""
    sets = []
    for part in text.split(";"):
        try:
            sets.append(tuple(sorted(int(x) for x in part.split(","))))
        except ValueError:
            raise ValueError(f"--skip_sets: {part!r} is not a comma-separated list of layer indices "
                             "(sets are separated by ';', e.g. \"2;3;2,3\")") from None
    return sets


@torch.no_grad()
def per_token_kl(model, prompts: list[list[int]], completions: list[list[int]], skip) -> tuple[float, int]:
    """(Σ over completion positions of KL(μ_t‖π_t), number of positions), one unpadded row at a time."""
    from archs.skipping import skip_layers

    total, count = 0.0, 0
    for prompt, completion in zip(prompts, completions):
        if not completion:
            continue
        ids = torch.tensor([prompt + completion])
        sl = slice(len(prompt) - 1, len(prompt) - 1 + len(completion))
        log_pi = torch.log_softmax(model(ids).logits[0, sl].double(), -1)
        with skip_layers(model, skip):
            log_mu = torch.log_softmax(model(ids).logits[0, sl].double(), -1)
        total += float((log_mu.exp() * (log_mu - log_pi)).sum())
        count += len(completion)
    return total, count


def measure(model, tokenizer, prompts, skip_sets, max_new_tokens: int, seed: int) -> list[dict]:
    from nested_reft.engines import HFEngine, SamplingSpec

    eos = sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")} - {None})
    engine = HFEngine(model, tokenizer, eos_token_ids=eos, score_logprobs=False)
    rows = []
    for skip in skip_sets:
        engine.set_skip(skip)
        sampled = engine.generate(prompts, SamplingSpec(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed))
        total, count = per_token_kl(model, prompts, sampled.completion_ids, skip)
        rows.append({"skip": list(skip), "kl_per_token": total / max(1, count), "tokens": count})
    engine.set_skip(())
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| skipped layers | KL(μ‖π) per token | tokens |", "|---|---|---|"]
    lines += [f"| {{{', '.join(map(str, r['skip']))}}} | {r['kl_per_token']:.3f} | {r['tokens']} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model path (default: the embedded tiny math model)")
    p.add_argument("--skip_sets", default="2;5;9;2,3,4;5,6,7;7,8,9;3,6,9", help="skip sets separated by ';', layers by ','")
    p.add_argument("--prompts", type=int, default=64, help="held-out prompts (one completion each)")
    p.add_argument("--max_new_tokens", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="outputs/benchmarks/skip_kl")
    args = p.parse_args(argv)
    skip_sets = parse_skip_sets(args.skip_sets)
    if args.prompts < 1 or args.max_new_tokens < 1:
        raise ValueError(f"--prompts and --max_new_tokens must be >= 1, got {args.prompts}, {args.max_new_tokens}")
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nested_reft.data import synthetic_rows
    from nested_reft.skipping import num_decoder_layers

    path = args.model
    if path is None:
        from archs.tiny import build_tiny_math_model

        path = str(build_tiny_math_model())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    layers = num_decoder_layers(model)
    bad = [s for s in skip_sets if any(not 0 <= i < layers for i in s)]
    if bad:
        raise ValueError(f"--skip_sets {bad} name layers outside 0..{layers - 1} of this {layers}-layer model")
    rows = synthetic_rows("test", n=args.prompts, seed=args.seed)
    prompts = [list(tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"]) for r in rows]
    results = measure(model, tokenizer, prompts, skip_sets, args.max_new_tokens, args.seed)
    md = table(results)
    print(md)
    payload = {"command": command_line("benchmarks.skip_kl", argv), "model": path, "results": results, "args": vars(args)}
    write_report(Path(args.out), "skip_kl", payload, md)
    return payload


if __name__ == "__main__":
    main()
