"""The embedded default's data and model: English → Toylang rows in the R1-T1 prompt format."""

from __future__ import annotations

from pathlib import Path

import datasets

from archs.tiny.translation_build import TinyTranslationRecipe, build_tiny_translation_model
from archs.tiny.translation_task import (
    LITERAL_COT,
    SRC_LANG,
    TGT_LANG,
    generate_pairs,
    is_literal_example,
    literal_translation,
    toy_cot,
)

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
             with_cot: bool = False, system_prompt: str | None = SYSTEM_PROMPT,
             literal_fraction: float = 0.0, instruction: bool = True) -> list[dict]:
    """Toylang rows: `prompt` (chat messages), `src`, `ref`, `src_lang`, `tgt_lang`, `template`;
    with_cot=True adds `completion` (assistant message with the CoT trace and the answer), `cot` and
    `literal`: True for the `literal_fraction` of rows (chosen per sentence) whose completion is a
    careless teacher's (the thought LITERAL_COT, the answer word for word in English order); `ref`
    stays the reference. instruction=False leaves the template's condensed
    instruction out of the prompt (the model then picks the layout of its trace itself, as the
    authors' prompts carry no template). Test rows never repeat a sentence."""
    n = TOY_SIZES[split] if n is None else n
    selector = selector or TemplateSelector("fixed")
    if literal_fraction and not with_cot:
        raise ValueError(f"literal_fraction={literal_fraction!r} changes the completions: it needs with_cot=True")
    rows = []
    for pair in generate_pairs(n, split, seed=seed, unique=split == "test"):
        template = selector.select(pair.src, SRC_LANG, TGT_LANG)
        row = {"prompt": build_prompt(pair.src, SRC_LANG, TGT_LANG, template, system_prompt,
                                      template_in_prompt=instruction),
               "src": pair.src, "ref": pair.tgt, "src_lang": SRC_LANG, "tgt_lang": TGT_LANG,
               "template": template.name}
        if with_cot:
            literal = is_literal_example(pair.src, literal_fraction, seed)
            cot, answer = (LITERAL_COT, literal_translation(pair)) if literal else (toy_cot(pair, template.name), pair.tgt)
            row["cot"], row["literal"] = cot, literal
            row["completion"] = [{"role": "assistant", "content": format_completion(cot, answer)}]
        rows.append(row)
    return rows


def is_toy(rows) -> bool:
    """Whether rows are Toylang ones (English -> Toylang)."""
    return bool(rows) and all(r.get("src_lang") == SRC_LANG and r.get("tgt_lang") == TGT_LANG for r in rows)


def literal_rate(completions: list[str]) -> float:
    """Share of completions that think like the careless teacher: their first thought is LITERAL_COT."""
    if not completions:
        raise ValueError("literal_rate of no completions")
    literal = f"<think>{LITERAL_COT}</think>"
    return sum(isinstance(c, str) and c.lstrip().startswith(literal) for c in completions) / len(completions)


def toy_dataset(split: str, n: int | None = None, **kwargs) -> datasets.Dataset:
    return datasets.Dataset.from_list(toy_rows(split, n, **kwargs))


if __name__ == "__main__":
    import argparse

    from archs.tiny.translation_build import ship

    parser = argparse.ArgumentParser(description="The embedded Toylang model (untrained, with its tokenizer).")
    parser.add_argument("--ship", action="store_true", help="rebuild it into archs/tiny/models/translation")
    if parser.parse_args().ship:
        print(ship(toy_prompt_texts()))
    else:
        print(build_toy_model())
