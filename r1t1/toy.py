"""The embedded default's data and model: English → Toylang rows in the R1-T1 prompt format."""

from __future__ import annotations

from pathlib import Path

import datasets

from archs.tiny.translation_build import TinyTranslationRecipe, build_tiny_translation_model
from archs.tiny.translation_task import SRC_LANG, TGT_LANG, generate_pairs, toy_cot

from .languages import language
from .templates import SYSTEM_PROMPT, TEMPLATES, TemplateSelector, build_prompt, format_completion

TOY_SIZES = {"train": 20_000, "test": 200}


def toy_prompt_texts(system_prompt: str = SYSTEM_PROMPT) -> tuple[str, ...]:
    """Every text the toy prompts contain besides the sentence (what the tokenizer should cover)."""
    header = f"Translate from {language(SRC_LANG).name} to {language(TGT_LANG).name}:"
    return (system_prompt,) + tuple(f"{t.instruction}\n{header}" for t in TEMPLATES.values())


def build_toy_model(cache_dir: str | Path | None = None, seed: int = 0,
                    recipe: TinyTranslationRecipe | None = None) -> Path:
    """The tiny translation model (untrained) with a tokenizer covering Toylang and our prompts."""
    return build_tiny_translation_model(cache_dir, seed=seed, recipe=recipe, prompt_texts=toy_prompt_texts())


def toy_rows(split: str, n: int | None = None, seed: int = 0, selector: TemplateSelector | None = None,
             with_cot: bool = False, system_prompt: str | None = SYSTEM_PROMPT) -> list[dict]:
    """Toylang rows: `prompt` (chat messages), `src`, `ref`, `src_lang`, `tgt_lang`, `template`;
    with_cot=True adds `completion` (assistant message with the CoT trace and the answer) and `cot`.
    Test rows never repeat a sentence."""
    n = TOY_SIZES[split] if n is None else n
    selector = selector or TemplateSelector("fixed")
    rows = []
    for pair in generate_pairs(n, split, seed=seed, unique=split == "test"):
        template = selector.select(pair.src, SRC_LANG, TGT_LANG)
        row = {"prompt": build_prompt(pair.src, SRC_LANG, TGT_LANG, template, system_prompt),
               "src": pair.src, "ref": pair.tgt, "src_lang": SRC_LANG, "tgt_lang": TGT_LANG,
               "template": template.name}
        if with_cot:
            cot = toy_cot(pair, template.name)
            row["cot"] = cot
            row["completion"] = [{"role": "assistant", "content": format_completion(cot, pair.tgt)}]
        rows.append(row)
    return rows


def toy_dataset(split: str, n: int | None = None, **kwargs) -> datasets.Dataset:
    return datasets.Dataset.from_list(toy_rows(split, n, **kwargs))
