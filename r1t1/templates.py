"""The six chain-of-thought translation templates of R1-T1 (SPEC §2), a selector, and prompts.

A `Template` is data: a name, its ordered steps, the instruction shown to the model and a short
example of a reasoning trace. `TemplateSelector` picks one per example (`fixed`, `random`, or
`by_rule` with a user callable). `build_prompt` turns (source language, target language, text,
template) into chat messages that ask for `<think>…</think><answer>…</answer>`.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

from .languages import Language, language


@dataclass(frozen=True)
class Template:
    name: str
    title: str
    steps: tuple[str, ...]
    instruction: str
    example: str


TEMPLATES: dict[str, Template] = {t.name: t for t in (
    Template(
        "hierarchical", "Hierarchical / progressive refinement",
        ("core elements", "nouns, verbs and connectors", "clauses", "word order", "naturalness", "final review"),
        "Refine step by step: core elements, then nouns, verbs and connectors, clauses, word order, naturalness, final review.",
        "core: who=the dogs, did=saw, what=a ball | words: dogs=hunden saw=sahen ball=Ball | "
        "order: subject verb object | review: ok",
    ),
    Template(
        "triangulating", "Triangulating (pivot) translation",
        ("translate into a pivot language", "translate the pivot into the target", "compare with the source", "final choice"),
        "Translate through a pivot language first, then into the target, and compare with the source.",
        "pivot (French): les chiens ont vu une balle | target: die Hunde sahen einen Ball | compare: meaning kept",
    ),
    Template(
        "back_translation", "Back translation",
        ("analyse the source", "translate", "back-translate key terms", "compare", "adjust", "re-check"),
        "Analyse, translate, back-translate the key terms, compare with the source, adjust and re-check.",
        "draft: die Hunde sahen einen Ball | back: Hunde=dogs sahen=saw Ball=ball | compare: all match | re-check: ok",
    ),
    Template(
        "context_aware", "Context-aware translation",
        ("surrounding context", "cultural references and idioms", "translate", "consistency", "ambiguities"),
        "Consider the context, cultural references and idioms, translate, check consistency and resolve ambiguities.",
        "context: a plain statement | idioms: none | draft: die Hunde sahen einen Ball | ambiguity: a=einen (accusative)",
    ),
    Template(
        "explanation", "Translation explanation",
        ("translate", "explain the difficult choices", "revise"),
        "Translate, explain the difficult choices, then revise.",
        "draft: die Hunde sahen einen Ball | why: 'a ball' is the object, so einen | revise: unchanged",
    ),
    Template(
        "structural", "Structural transformation",
        ("voice and order (active/passive, S-V-O reordering)", "translate", "flow check", "rephrase"),
        "Work out voice and word order (active or passive, subject-verb-object reordering), translate, check the flow, rephrase.",
        "voice: active | order: S V O -> S V O | draft: die Hunde sahen einen Ball | flow: ok",
    ),
)}
TEMPLATE_NAMES: tuple[str, ...] = tuple(TEMPLATES)
SELECTION_MODES = ("fixed", "random", "by_rule")

SYSTEM_PROMPT = ("You are a careful translator. Reason inside <think></think>, "
                 "then give only the translation inside <answer></answer>.")


def get_template(name: str | Template) -> Template:
    if isinstance(name, Template):
        return name
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; templates are {', '.join(TEMPLATE_NAMES)}")
    return TEMPLATES[name]


Rule = Callable[[str, Language, Language], "str | Template"]


class TemplateSelector:
    """Chooses the template of each example.

    fixed: always `template`. random: uniform over `templates` (default all six), a function of
    (seed, source text, direction), so the same example gets the same template in every epoch
    and in any order. by_rule: `rule(text, src_lang, tgt_lang)` returns a template or its name.
    """

    def __init__(self, mode: str = "fixed", template: str = "hierarchical", templates=None,
                 rule: Rule | None = None, seed: int = 0):
        if mode not in SELECTION_MODES:
            raise ValueError(f"template selection mode must be one of {SELECTION_MODES}, got {mode!r}")
        self.mode = mode
        self.template = get_template(template)
        self.templates = tuple(get_template(t) for t in (templates or TEMPLATE_NAMES))
        if not self.templates:
            raise ValueError("templates must name at least one template")
        if mode == "by_rule" and not callable(rule):
            raise ValueError(f"mode 'by_rule' needs a callable rule(text, src_lang, tgt_lang), got {rule!r}")
        self.rule = rule
        self.seed = seed

    def select(self, text: str, src_lang, tgt_lang) -> Template:
        src, tgt = language(src_lang), language(tgt_lang)
        if self.mode == "fixed":
            return self.template
        if self.mode == "random":
            digest = hashlib.sha256(f"{self.seed}\x00{src.code}\x00{tgt.code}\x00{text}".encode()).digest()
            return random.Random(digest).choice(self.templates)
        chosen = self.rule(text, src, tgt)
        try:
            return get_template(chosen)
        except ValueError as e:
            raise ValueError(f"template rule returned {chosen!r} for {text[:40]!r}: {e}") from None


def user_message(text: str, src_lang, tgt_lang, template: str | Template) -> str:
    t = get_template(template)
    return f"{t.instruction}\nTranslate from {language(src_lang).name} to {language(tgt_lang).name}:\n{text}"


def build_prompt(text: str, src_lang, tgt_lang, template: str | Template = "hierarchical",
                 system_prompt: str | None = SYSTEM_PROMPT) -> list[dict]:
    """Chat messages asking to translate `text`, reasoning with `template`, in the R1-T1 format."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"source text must be a non-empty string, got {text!r}")
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": user_message(text, src_lang, tgt_lang, template)}]


def format_completion(cot: str, translation: str) -> str:
    """The target output of a supervised CoT example."""
    return f"<think>{cot}</think><answer>{translation}</answer>"
