"""Power-of-two weight quantization of a causal LM, with held-out perplexity against baselines.

    python -m recipes.quantize_pot [--bits 3] [--group_size 128] [--model_name_or_path PATH]

With no `--model_name_or_path`, the embedded tiny math model is used (built once, cached).
Calibration and held-out data default to the synthetic math task rendered as chat (train and
test splits, disjoint by construction); held-out perplexity then scores the worked-solution
tokens (the model's training targets). `--calib_file` / `--eval_file` take plain text instead
(windows of `--seq_len` tokens, every token scored).
Reports perplexity for fp32, PoT init only (grid-searched scales), PoT refined, and uniform-INT
round-to-nearest at the same bits and group size; prints a table and writes `results.json` (and
the refined model with `--save_model`) into `--output_dir`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import TrlParser

from reft_kernels.pot.quantize import (
    bits_per_weight,
    int_rtn_fake_quantize,
    quantize_model,
    save_quantized,
    target_linears,
)

logger = logging.getLogger("recipes.quantize_pot")


@dataclass
class QuantizePoTArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Local checkpoint or Hub id; default: the embedded tiny math model."})
    bits: int = field(default=3, metadata={"help": "Bits per weight: 2, 3 or 4 (PoT: 1 sign + bits-1 exponent bits)."})
    group_size: int = field(default=128, metadata={"help": "Weights per fp16 scale, along the input dimension."})
    refine_granularity: str = field(default="model", metadata={"help": "Scale refinement per 'layer' (each linear, output error), per 'block' (decoder block output) or 'model' (all scales jointly on the KL of the logits to the fp32 model)."})
    refine_steps: int | None = field(default=None, metadata={"help": "Adam steps of scale refinement per layer / block / model; default 200 for layer and block, 1000 for model."})
    rounding: str = field(default="log2", metadata={"help": "How codes are chosen for given scales: 'log2' (SPEC: round(log2|w|/s)) or 'linear' (nearest level in value)."})
    sequential: bool = field(default=False, metadata={"help": "Layer / block refinement: calibrate each decoder block on inputs from the model with earlier blocks already quantized."})
    refine_val_fraction: float = field(default=0.125, metadata={"help": "Model refinement: fraction of the calibration batches held out to pick the scales."})
    refine_eval_every: int = field(default=50, metadata={"help": "Model refinement: score the held-out calibration batches every N steps."})
    refine_lr: float = field(default=1e-3, metadata={"help": "Adam learning rate of Γ."})
    refine_lam: float = field(default=1e-4, metadata={"help": "λ of the (λ/2)·mean(Γ²) regulariser."})
    calib_sequences: int = field(default=512, metadata={"help": "Calibration sequences (synthetic problems, or text windows)."})
    eval_sequences: int = field(default=500, metadata={"help": "Held-out sequences (synthetic test problems, or text windows)."})
    seq_len: int = field(default=512, metadata={"help": "Tokens per window of --calib_file / --eval_file text."})
    calib_file: str | None = field(default=None, metadata={"help": "Plain-text calibration file (default: synthetic math, train split)."})
    eval_file: str | None = field(default=None, metadata={"help": "Plain-text held-out file (default: synthetic math, test split)."})
    batch_size: int = field(default=8, metadata={"help": "Calibration sequences per forward pass."})
    eval_batch_size: int = field(default=32, metadata={"help": "Held-out sequences per forward pass."})
    seed: int = field(default=0, metadata={"help": "Seed of the synthetic text and of torch."})
    output_dir: str = field(default="outputs/quantize_pot", metadata={"help": "Where results.json (and the model) go."})
    save_model: bool = field(default=False, metadata={"help": "Also save the refined PoT model (save_quantized format)."})
    tiny_cache_dir: str | None = field(default=None, metadata={"help": "Where the embedded tiny model is cached."})


def synthetic_examples(tokenizer, split: str, n: int, seed: int) -> list[tuple[list[int], int]]:
    """(token ids of prompt + worked solution, prompt length) per synthetic math problem."""
    from archs.tiny.math_task import as_chat, generate_problems
    from archs.tiny.tokenizer import render_chat

    out = []
    for p in generate_problems(n, split, seed=seed, unique=split == "test"):
        prompt = tokenizer(render_chat(as_chat(p), add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        full = tokenizer(render_chat(as_chat(p) + [{"role": "assistant", "content": p.solution}]),
                         add_special_tokens=False)["input_ids"]
        out.append((full, len(prompt)))
    return out


def text_examples(tokenizer, path: str, seq_len: int, max_windows: int) -> list[tuple[list[int], int]]:
    """Consecutive windows of a plain-text file; every token after the first is scored."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text file {path!r} does not exist")
    ids = tokenizer(p.read_text(), add_special_tokens=False)["input_ids"]
    n = min(len(ids) // seq_len, max_windows)
    if n < 1:
        raise ValueError(f"{path} has {len(ids)} tokens, fewer than one window of {seq_len}")
    return [(ids[i * seq_len:(i + 1) * seq_len], 1) for i in range(n)]


def length_batches(examples, batch_size: int) -> list[torch.Tensor]:
    """Sequences grouped by exact length into LongTensor batches (no padding anywhere)."""
    by_len: dict[int, list[list[int]]] = {}
    for ids, _ in examples:
        by_len.setdefault(len(ids), []).append(ids)
    return [torch.tensor(seqs[i:i + batch_size]) for seqs in by_len.values()
            for i in range(0, len(seqs), batch_size)]


@torch.no_grad()
def perplexity(model, examples, batch_size: int, desc: str) -> float:
    """exp(mean NLL) of the scored tokens: the solution tokens of a synthetic problem (what the
    model was trained to produce; its prompts never were targets), or every token of a window."""
    model.eval()
    nll, count = 0.0, 0
    for i in tqdm(range(0, len(examples), batch_size), desc=f"perplexity {desc}", leave=False):
        batch = examples[i:i + batch_size]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for r, (seq, start) in enumerate(batch):
            ids[r, :len(seq)] = torch.tensor(seq)
            labels[r, start:len(seq)] = torch.tensor(seq[start:])
            mask[r, :len(seq)] = 1
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        target = labels[:, 1:]
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                 ignore_index=-100, reduction="sum").item()
        count += int((target != -100).sum())
    return math.exp(nll / count)


def main(argv=None) -> dict:
    (a,) = TrlParser((QuantizePoTArguments,)).parse_args_and_config(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.manual_seed(a.seed)
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = a.model_name_or_path
    if path is None:
        from archs.tiny import build_tiny_math_model

        path = str(build_tiny_math_model(a.tiny_cache_dir))
        logger.info("no --model_name_or_path: using the embedded tiny math model at %s", path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    if a.calib_file:
        calib_ex = text_examples(tokenizer, a.calib_file, a.seq_len, a.calib_sequences)
    else:
        calib_ex = synthetic_examples(tokenizer, "train", a.calib_sequences, a.seed)
    if a.eval_file:
        held = text_examples(tokenizer, a.eval_file, a.seq_len, a.eval_sequences)
    else:
        held = synthetic_examples(tokenizer, "test", a.eval_sequences, a.seed + 1)
    calib = length_batches(calib_ex, a.batch_size)
    n_calib = sum(len(ids) for ids, _ in calib_ex)
    n_scored = sum(len(ids) - max(start, 1) for ids, start in held)
    logger.info("calibration: %d sequences, %d tokens; held-out: %d sequences, %d scored tokens",
                len(calib_ex), n_calib, len(held), n_scored)

    rows = {}
    rows["fp32"] = {"ppl": perplexity(base, held, a.eval_batch_size, "fp32"), "seconds": 0.0}

    def run(name, fn):
        t = time.perf_counter()
        model = fn(copy.deepcopy(base))
        seconds = time.perf_counter() - t
        rows[name] = {"ppl": perplexity(model, held, a.eval_batch_size, name), "seconds": seconds}
        logger.info("%s: perplexity %.4f (quantized in %.1f s)", name, rows[name]["ppl"], seconds)
        return model

    q = dict(bits=a.bits, group_size=a.group_size)
    steps = a.refine_steps if a.refine_steps is not None else (1000 if a.refine_granularity == "model" else 200)
    shapes = [(m.in_features, m.out_features) for m in target_linears(base).values()]
    bpw = {"fp32": {"nominal": 32.0, "stored": 32.0},
           f"INT{a.bits} RTN": bits_per_weight(shapes, a.bits, a.group_size, zero_points=True)}
    bpw[f"PoT{a.bits} init"] = bpw[f"PoT{a.bits} refined"] = bits_per_weight(shapes, a.bits, a.group_size, False)
    run(f"INT{a.bits} RTN", lambda m: int_rtn_fake_quantize(m, **q))
    run(f"PoT{a.bits} init", lambda m: quantize_model(m, **q, refine=False, rounding=a.rounding))
    refined = run(f"PoT{a.bits} refined", lambda m: quantize_model(
        m, **q, calib_data=calib, refine=True, granularity=a.refine_granularity, steps=steps,
        lr=a.refine_lr, lam=a.refine_lam, calib_batch_size=a.batch_size, rounding=a.rounding,
        sequential=a.sequential, val_fraction=a.refine_val_fraction, eval_every=a.refine_eval_every))
    stats = refined.pot_quantization["stats"]
    if a.save_model:
        save_quantized(refined, out / "pot_model", tokenizer)

    result = {"model": path, "args": asdict(a), "calib_tokens": n_calib, "eval_scored_tokens": n_scored,
              "perplexity": {k: v["ppl"] for k, v in rows.items()},
              "quantize_seconds": {k: v["seconds"] for k, v in rows.items()},
              "bits_per_weight": bpw, "refine_steps": steps,
              "refine_rel_err": {k: v for k, v in stats.items()}}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"\nheld-out perplexity, {a.bits} bits, group size {a.group_size} ({n_scored} scored tokens); "
          f"PoT rounding {a.rounding}, refinement {a.refine_granularity}{' sequential' if a.sequential else ''}, "
          f"{steps} steps\n")
    print("| model | perplexity | bits/weight (nominal) | bits/weight (stored) | quantize s |\n|---|---|---|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v['ppl']:.4f} | {bpw[k]['nominal']:.4g} | {bpw[k]['stored']:.4g} | {v['seconds']:.1f} |")
    print(f"\nwrote {out / 'results.json'}")
    return result


if __name__ == "__main__":
    main()
