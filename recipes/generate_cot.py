"""Write a cold-start CoT corpus from parallel data with any instruct model (R1-T1's stage 0).

    python -m recipes.generate_cot --model_name_or_path Qwen/Qwen2.5-72B-Instruct --engine vllm \
        --tensor_parallel_size 4 --parallel_path data/train.de-en.tsv --src_lang de --tgt_lang en --output data/cot.jsonl
    python -m recipes.generate_cot --model_name_or_path PATH --flores_dir data/flores101_dataset \
        --directions de-en,zh-en --split dev --templates all --min_quality 0.6 --output data/cot.jsonl

For each sentence pair the model is asked to translate while reasoning through one of the six
templates' steps (chosen per pair by `--template_mode`, or every template with `--templates all`
and `--per_template`), inside `<think>…</think><answer>…</answer>`. A completion is kept when it is
format-valid (the strict gate) and its answer scores at least `--min_quality` against the reference
(chrF / BLEU / COMET, scaled to [0, 1]). Kept rows are written as our CoT JSONL (`src`, `tgt`,
`src_lang`, `tgt_lang`, `template`, `cot`, plus `answer` and `quality`), which `recipes.translate_sft
--cot_path` reads: the SFT target is the reasoning followed by the *reference* translation, so the
threshold decides how far the reasoning's own answer may be from it. A summary (kept per template,
mean quality) is printed and written beside the output.

A 72B teacher (about 145 GB in bf16) fits no single GPU: `--engine vllm --tensor_parallel_size 4`
splits it over four 80 GB GPUs, `--engine hf --device_map auto` spreads its layers over every visible
GPU. The engine flags are `recipes.evaluate_translation`'s (`EngineArguments`); the hf engine decodes
exactly `--temperature`/`--top_p`, not the checkpoint's generation_config.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from r1t1.data import load_flores, load_parallel, parse_direction
from r1t1.languages import language
from r1t1.templates import TEMPLATE_NAMES, TemplateSelector, steps_text
from recipes.evaluate_translation import (
    DECODING,
    EngineArguments,
    check_engine,
    generate_hf,
    generate_vllm,
)
from recipes.skeleton import parse as parse_args
from rewards.translation import METRICS, parse, quality

logger = logging.getLogger("recipes.generate_cot")

TEACHER_SYSTEM = ("You are an expert translator who explains their reasoning. Reason inside <think></think>, "
                  "following the steps you are given, then give only the final translation inside <answer></answer>.")


def teacher_prompt(text: str, src_lang, tgt_lang, template) -> list[dict]:
    """The generation prompt: the template's numbered steps, the direction and the source text."""
    src, tgt = language(src_lang).name, language(tgt_lang).name
    user = (f"Translate the following {src} sentence into {tgt}, reasoning through these steps in order:\n"
            f"{steps_text(template)}\n\nSource sentence: {text}")
    return [{"role": "system", "content": TEACHER_SYSTEM}, {"role": "user", "content": user}]


def load_pairs(args) -> list[dict]:
    if args.parallel_path:
        rows = load_parallel(args.parallel_path, args.src_lang, args.tgt_lang)
        return rows[: args.limit] if args.limit is not None else rows
    if not args.flores_dir or not args.directions:
        raise ValueError("give --parallel_path FILE, or --flores_dir DIR with --directions (e.g. de-en,zh-en)")
    rows = []
    for d in (parse_direction(x) for x in args.directions.split(",") if x.strip()):
        rows += load_flores(args.flores_dir, d, args.split, limit=args.limit)
    return rows


def requests_for(pairs: list[dict], args) -> list[dict]:
    """One request per pair (its selected template), or one per pair and template (`--templates all`)."""
    names = list(TEMPLATE_NAMES) if args.templates in (None, "all") else [t.strip() for t in args.templates.split(",")]
    if args.per_template:
        return [{**p, "template": name} for p in pairs for name in names]
    selector = TemplateSelector(args.template_mode, template=names[0], templates=names, seed=args.seed)
    return [{**p, "template": selector.select(p["src"], p["src_lang"], p["tgt_lang"]).name} for p in pairs]


def filter_completions(requests: list[dict], texts: list[str], metric: str, min_quality: float,
                       comet_model: str | None = None) -> tuple[list[dict], Counter]:
    """Rows whose completion is format-valid and whose answer reaches `min_quality`; and why the others were not."""
    answers = [parse(t, gate="strict") for t in texts]
    valid = [i for i, a in enumerate(answers) if a]
    reasons = Counter(invalid_format=len(texts) - len(valid))
    scores = quality([answers[i] for i in valid], [requests[i]["tgt"] for i in valid], [requests[i]["src"] for i in valid],
                     metric=metric, comet_model=comet_model, tgt_langs=[requests[i]["tgt_lang"] for i in valid]) if valid else []
    kept = []
    for i, q in zip(valid, scores):
        if q < min_quality:
            reasons["below_min_quality"] += 1
            continue
        r, text = requests[i], texts[i]
        cot = text.split("<think>", 1)[1].split("</think>", 1)[0].strip()
        kept.append({"src": r["src"], "tgt": r["tgt"], "src_lang": r["src_lang"], "tgt_lang": r["tgt_lang"],
                     "template": r["template"], "cot": cot, "answer": answers[i], "quality": round(q, 4)})
    return kept, reasons


@dataclass
class GenerateCoTArguments:
    model_name_or_path: str = field(metadata={"aliases": ["--model"], "help": "An instruct model: folder or Hub id."})
    output: str = field(metadata={"help": "The CoT JSONL to write (a summary goes beside it)."})
    parallel_path: str | None = field(default=None, metadata={"help": "Parallel data (.tsv or .jsonl)."})
    src_lang: str | None = field(default=None, metadata={"help": "Source language of a file whose rows do not name one."})
    tgt_lang: str | None = field(default=None, metadata={"help": "Target language of a file whose rows do not name one."})
    flores_dir: str | None = field(default=None, metadata={"help": "Or a Flores folder (with --directions and --split)."})
    directions: str | None = field(default=None, metadata={"help": "Comma-separated directions of --flores_dir, e.g. de-en,zh-en."})
    split: str = field(default="dev", metadata={"help": "Flores split (dev: keep devtest for evaluation)."})
    limit: int | None = field(default=None, metadata={"help": "At most this many pairs (per direction for Flores)."})
    templates: str = field(default="all", metadata={"help": f"Comma-separated subset of {', '.join(TEMPLATE_NAMES)}, or 'all'."})
    template_mode: str = field(default="random", metadata={"help": "One template per pair: random over --templates (a function of the pair), or the first of them.", "choices": ["random", "fixed"]})
    per_template: bool = field(default=False, metadata={"help": "One request per pair and template instead."})
    metric: str = field(default="chrf", metadata={"help": "Quality of the answer against the reference.", "choices": list(METRICS)})
    min_quality: float = field(default=0.6, metadata={"help": "Keep answers scoring at least this (the metric scaled to [0, 1])."})
    comet_model: str | None = field(default=None, metadata={"help": "Local COMET checkpoint for --metric comet."})
    temperature: float = field(default=0.7, metadata={"help": "0 is greedy."})
    top_p: float = field(default=0.95)
    max_new_tokens: int = field(default=1024)
    batch_size: int = field(default=16)
    seed: int = field(default=0)


def main(argv=None) -> dict:
    args, engine = parse_args((GenerateCoTArguments, EngineArguments), argv)
    # Inputs fail before the model loads.
    check_engine(engine)
    if not 0 <= args.min_quality <= 1:
        raise ValueError(f"min_quality must be in [0, 1] (the metric scaled to [0, 1]), got {args.min_quality!r}")
    if args.metric == "comet":
        from rewards.translation import load_comet

        load_comet(args.comet_model)
    pairs = load_pairs(args)
    requests = requests_for(pairs, args)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    logger.info("%d pairs, %d requests", len(pairs), len(requests))

    decoding = {**DECODING["greedy"], "temperature": args.temperature, "top_p": args.top_p}
    generate = generate_hf if engine.engine == "hf" else generate_vllm
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    prompts = [teacher_prompt(r["src"], r["src_lang"], r["tgt_lang"], r["template"]) for r in requests]
    texts = generate(args.model_name_or_path, prompts, decoding, args.max_new_tokens, args.batch_size, args.seed, engine)
    seconds = time.perf_counter() - start
    kept, reasons = filter_completions(requests, texts, args.metric, args.min_quality, args.comet_model)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")

    asked = Counter(r["template"] for r in requests)
    got = Counter(r["template"] for r in kept)
    summary = {"model": args.model_name_or_path, "requests": len(requests), "kept": len(kept), "dropped": dict(reasons),
               "metric": args.metric, "min_quality": args.min_quality, "generate_seconds": seconds,
               "mean_quality": sum(r["quality"] for r in kept) / len(kept) if kept else None,
               "per_template": {t: {"asked": asked[t], "kept": got[t]} for t in asked}}
    out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=2))
    print("\n| template | asked | kept |\n|---|---|---|")
    for t, c in summary["per_template"].items():
        print(f"| {t} | {c['asked']} | {c['kept']} |")
    print(f"\nkept {len(kept)} of {len(requests)} ({dict(reasons)}); outputs: {out}, {out.with_suffix('.summary.json')}")
    if not kept:
        logger.warning("no completion was kept: check the model's format (see a raw output with --limit 1) or lower --min_quality")
    return summary


if __name__ == "__main__":
    main()
