"""What the translation recipes share: data arguments, held-out rows, model loading, the plot."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nested_reft.reporting import plot_training
from r1t1.data import load_flores, load_parallel
from r1t1.evaluation import TranslationScores, evaluate_translation
from r1t1.templates import PREFILL, PROMPT_STYLES, SYSTEM_PROMPT, TemplateSelector, build_prompt
from r1t1.toy import build_toy_model, is_toy, literal_rate, toy_rows

logger = logging.getLogger("recipes.translation")


@dataclass
class TranslationDataArguments:
    src_lang: str | None = field(default=None, metadata={"help": "Source language for files whose rows do not name one (code or name)."})
    tgt_lang: str | None = field(default=None, metadata={"help": "Target language for files whose rows do not name one."})
    eval_path: str | None = field(default=None, metadata={"help": "Held-out parallel file (.tsv or .jsonl). Default: the Toylang test split."})
    eval_flores_dir: str | None = field(default=None, metadata={"help": "Held-out Flores-101/200 folder (with eval_direction; overrides eval_path)."})
    eval_direction: str | None = field(default=None, metadata={"help": "Direction of the Flores held-out set, e.g. 'de-en'."})
    eval_split: str = field(default="devtest", metadata={"help": "Flores split of the held-out set: dev or devtest."})
    eval_limit: int | None = field(default=200, metadata={"help": "Evaluate on at most this many held-out sentences."})
    eval_max_new_tokens: int = field(default=128, metadata={"help": "Generation budget of the held-out evaluation."})
    eval_batch_size: int = field(default=64, metadata={"help": "Prompts per generate() call in the held-out evaluation."})
    eval_sampled: bool = field(default=True, metadata={"help": "Also report chrF of sampled translations (temperature 1), the quality GRPO's groups see."})
    prompt_style: str = field(default="authors", metadata={"help": f"Prompts of real data: one of {PROMPT_STYLES}. 'authors': their system message and wording, the assistant turn pre-filled with <think>. 'ours': our system message and 'Translate from X to Y:'. The embedded Toylang runs always use their own prompts.", "choices": list(PROMPT_STYLES)})
    template_in_prompt: bool = field(default=False, metadata={"help": "Show the selected template's steps in the prompt [ours]; the authors' prompts carry none (templates shape the cold-start data only)."})
    system_prompt: str | None = field(default=None, metadata={"help": "System message of every prompt (default: the prompt style's own; '' for none)."})
    tiny_cache_dir: str | None = field(default=None, metadata={"help": "Where the embedded tiny model is cached (default ~/.cache/nested_reft)."})
    tiny_seed: int = field(default=0, metadata={"help": "Seed of the embedded tiny model's build and of the Toylang data."})
    toy_instruction: bool = field(default=True, metadata={"help": "Toylang prompts carry the selected template's condensed instruction (our default); false: only 'Translate from English to Toylang:' and the sentence, so the model chooses the layout of its trace itself, as with the authors' prompts."})
    fresh_run: bool = field(default=False, metadata={"help": "When --output_dir holds another run's checkpoints, start fresh in the next free <output_dir>-N instead of stopping."})
    torch_threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads for this run (on a shared CPU, 1 avoids thread contention)."})


def set_threads(a: TranslationDataArguments) -> None:
    if a.torch_threads is not None:
        if a.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1, got {a.torch_threads!r}")
        torch.set_num_threads(a.torch_threads)


def toy_system_prompt(a) -> str | None:
    """The system message of the Toylang prompts: ours unless one is given ('' for none)."""
    return SYSTEM_PROMPT if a.system_prompt is None else (a.system_prompt or None)


def prompt_rows(rows: list[dict], selector: TemplateSelector, a) -> list[dict]:
    """Add `prompt` (chat messages in `a.prompt_style`, the selected template; pre-filled with `<think>`
    as the style does unless `a.prefill_think` says otherwise) and `ref` to loaded pairs."""
    out = []
    for r in rows:
        template = selector.select(r["src"], r["src_lang"], r["tgt_lang"])
        prompt = build_prompt(r["src"], r["src_lang"], r["tgt_lang"], template, a.system_prompt or None,
                              style=a.prompt_style, template_in_prompt=a.template_in_prompt,
                              prefill=getattr(a, "prefill_think", None))
        out.append({**r, "ref": r["tgt"], "template": template.name, "prompt": prompt})
    return out


def reward_prefix(a, real_data: bool) -> str:
    """What the prompts pre-fill in the assistant turn, which the reward reads before each completion."""
    return PREFILL if real_data and a.prompt_style == "authors" else ""


def held_out_rows(a: TranslationDataArguments, selector: TemplateSelector, corpus: str | None = None) -> list[dict]:
    """The held-out rows: a Flores folder, a parallel file, or (toy runs only) the Toylang test split.
    `corpus` is the real training file, if any: it needs a real held-out set."""
    if corpus and not (a.eval_flores_dir or a.eval_path):
        raise ValueError(f"training on {corpus!r} needs a held-out set: pass --eval_flores_dir DIR --eval_direction "
                         "SRC-TGT (e.g. de-en) or --eval_path FILE; without them the held-out set would be the "
                         "Toylang test split of the toy runs")
    if a.eval_flores_dir:
        if not a.eval_direction:
            raise ValueError("eval_flores_dir needs eval_direction, e.g. 'de-en'")
        rows = load_flores(a.eval_flores_dir, a.eval_direction, a.eval_split, limit=a.eval_limit)
        where = f"Flores {a.eval_flores_dir} ({a.eval_direction}, {a.eval_split})"
    elif a.eval_path:
        rows = load_parallel(a.eval_path, a.src_lang, a.tgt_lang)[: a.eval_limit]
        where = a.eval_path
    else:
        rows = toy_rows("test", a.eval_limit, seed=a.tiny_seed, selector=selector, system_prompt=toy_system_prompt(a),
                        instruction=a.toy_instruction)
        logger.info("held-out set: the embedded Toylang test split (%d sentences, en-qtl); a real model needs "
                    "--eval_flores_dir or --eval_path", len(rows))
        return rows
    logger.info("held-out set: %s (%d sentences)", where, len(rows))
    return prompt_rows(rows, selector, a)


MISSING_MODEL_HINT = (" (for the R1-T1 default, run `python -m recipes.translate_sft --config "
                      "recipes/configs/translate_sft_toy.yaml` first)")


def load_model(model_path: str, model_args, use_cpu: bool = False):
    from recipes.model_loading import load_model_and_tokenizer
    from recipes.preflight import check_model_path

    check_model_path(model_path, MISSING_MODEL_HINT)
    return load_model_and_tokenizer(model_path, model_args, use_cpu=use_cpu, use_peft=model_args.use_peft)


def adapter_base(model_path: str) -> str | None:
    """The base model a local PEFT adapter folder names (adapter_config.json and no config.json:
    what an SFT run with --use_peft saves), or None for anything else."""
    folder = Path(model_path).expanduser()
    if not (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file():
        return None
    return str(json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path"))


def _adapter_digest(folder: Path) -> str:
    """sha256 of the adapter's config and weights: the merged folder is reused only for these."""
    h = hashlib.sha256()
    for f in sorted(folder.glob("adapter_*")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def merge_adapter(adapter: Path, out: Path) -> None:
    """PEFT's merge_and_unload of `adapter` over the base it names, saved with the tokenizer (the
    adapter folder's own, else the base's) as a full model folder; written whole or not at all."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    logger.info("merging the adapter %s into its base %s -> %s", adapter, adapter_base(str(adapter)), out)
    merged = AutoPeftModelForCausalLM.from_pretrained(str(adapter), dtype="auto").merge_and_unload()
    has_tokenizer = (adapter / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(str(adapter) if has_tokenizer else adapter_base(str(adapter)))
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    merged.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def full_model_path(model_path: str, merge: bool) -> str:
    """GRPO trains a full model: a LoRA adapter folder is refused (naming how to merge it) before
    anything loads, or with `merge` merged into `<adapter>-merged`, reused while the adapter's
    files are unchanged. Any other path is returned as it is."""
    base = adapter_base(model_path)
    if base is None:
        return model_path
    adapter = Path(model_path).expanduser()
    out = adapter.parent / f"{adapter.name}-merged"
    if not merge:
        raise ValueError(
            f"{model_path!r} is a LoRA adapter (adapter_config.json, no config.json) on the base {base!r}: GRPO "
            f"starts from a full model. Add --merge_adapter true to merge it into {str(out)!r} and start from there, "
            "or merge it yourself (peft: AutoPeftModelForCausalLM.from_pretrained(adapter).merge_and_unload()"
            ".save_pretrained(folder), and the tokenizer) and pass that folder as --model_name_or_path")
    stamp = {"adapter": str(adapter.resolve()), "sha256": _adapter_digest(adapter)}
    marker = out / "merged_from.json"
    if not (marker.is_file() and json.loads(marker.read_text()) == stamp):
        merge_adapter(adapter, out)
        marker.write_text(json.dumps(stamp, indent=2))
    else:
        logger.info("starting from %s, merged earlier from the unchanged adapter %s", out, model_path)
    return str(out)


def embedded_model(a: TranslationDataArguments) -> str:
    logger.info("no --model_name_or_path: using the embedded tiny Toylang model")
    return str(build_toy_model(a.tiny_cache_dir, seed=a.tiny_seed))


def held_out(model, tokenizer, rows, a: TranslationDataArguments, label: str, seed: int, gate: str = "strict") -> dict:
    """Greedy (and optionally sampled) held-out scores, logged and returned as a dict; `gate` is the
    reward's format check (the format rate and mean reward are reported under it)."""
    out = {}
    for kind, temperature in (("greedy", 0.0), ("sampled", 1.0)):
        if kind == "sampled" and not a.eval_sampled:
            continue
        s: TranslationScores = evaluate_translation(model, tokenizer, rows, temperature=temperature,
                                                    max_new_tokens=a.eval_max_new_tokens,
                                                    batch_size=a.eval_batch_size, seed=seed, progress=True, gate=gate)
        logger.info("held-out %s %s: chrF %.2f, BLEU %.2f, format %.1f%%, reward %.3f, %.1f tokens per completion "
                    "(%d sentences)", kind, label, s.chrf, s.bleu, 100 * s.format_rate, s.mean_reward,
                    s.completion_tokens, s.n)
        out[kind] = s.as_dict()
        if is_toy(rows):  # the careless teacher's word-for-word answers (a cold start with toy_literal_fraction)
            out[kind]["literal_rate"] = literal_rate(s.completions)
            logger.info("held-out %s %s: %.1f%% word-for-word answers", kind, label, 100 * out[kind]["literal_rate"])
        if kind == "greedy":
            out["example"] = {"src": s.samples[0][0], "completion": s.samples[0][1], "ref": s.samples[0][2]}
    return out


def print_table(before: dict, after: dict, after_label: str) -> None:
    print("\n| | held-out chrF (greedy) | chrF (sampled T=1) | BLEU (greedy) | format valid |")
    print("|---|---|---|---|---|")
    for label, r in (("before", before), (after_label, after)):
        sampled = f"{r['sampled']['chrf']:.2f}" if "sampled" in r else "-"
        g = r["greedy"]
        print(f"| {label} | {g['chrf']:.2f} | {sampled} | {g['bleu']:.2f} | {g['format_rate']:.1%} |")
    print(f"\n{after['greedy']['chrf_signature']}\n{after['greedy']['bleu_signature']}")
    print(f"example: {after['example']['src']!r}\n  -> {after['example']['completion']!r}\n  ref {after['example']['ref']!r}")


def plot(rows, out_png, title, before, after, steps, panels):
    return plot_training(rows, out_png, title=title, panels=panels, eval_panel="chrf", eval_label="held-out chrF",
                         evals={"before": (0, before["greedy"]["chrf"]), "after": (steps, after["greedy"]["chrf"])})
