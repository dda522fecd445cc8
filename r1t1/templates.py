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


# `steps` are the released corpus's step lists (paraphrased; six or seven steps each), which is what
# `template_in_prompt` shows a real model. `instruction` is [ours]: a one-line condensation that the
# embedded Toylang prompts use (their tokenizer is built from it), and `example` a Toylang trace.
TEMPLATES: dict[str, Template] = {t.name: t for t in (
    Template(
        "hierarchical", "Hierarchical / progressive refinement",
        ("identify the sentence's primary structure and translate its simplest elements first",
         "check the draft for basic accuracy: nouns, verbs and connectors",
         "refine the complex structures: subordinate clauses, passive voice",
         "adjust the word order to the target language's grammar",
         "refine for naturalness and contextual relevance",
         "review the whole sentence for consistency and flow"),
        "Refine step by step: core elements, then nouns, verbs and connectors, clauses, word order, naturalness, final review.",
        "core: who=the dogs, did=saw, what=a ball | words: dogs=hunden saw=sahen ball=Ball | "
        "order: subject verb object | review: ok",
    ),
    Template(
        "triangulating", "Triangulating translation (through an intermediate structure)",
        ("translate the basic elements of the sentence",
         "map them onto an intermediate language structure with simple syntactic rules",
         "refine the intermediate form into the target language",
         "check the accuracy of the meaning against the source",
         "adjust the word order to the target language",
         "make a final refinement for fluency"),
        "Translate through a pivot language first, then into the target, and compare with the source.",
        "pivot (French): les chiens ont vu une balle | target: die Hunde sahen einen Ball | compare: meaning kept",
    ),
    Template(
        "back_translation", "Back translation",
        ("analyse the sentence structure and key concepts of the source",
         "translate the source into the target language",
         "back-translate into the source language, focusing on key terms",
         "compare the back translation with the source for shifts in meaning",
         "adjust the translation where they differ",
         "re-translate the adjusted text back and re-check it",
         "repeat until the back translation and the source are aligned"),
        "Analyse, translate, back-translate the key terms, compare with the source, adjust and re-check.",
        "draft: die Hunde sahen einen Ball | back: Hunde=dogs sahen=saw Ball=ball | compare: all match | re-check: ok",
    ),
    Template(
        "context_aware", "Context-aware translation",
        ("read the sentence together with the previous and next sentences",
         "take dialogue-specific details into account: earlier questions, answers, implied references",
         "find cultural references and idioms and translate them from context",
         "translate, adjusting nuance to the surrounding text",
         "re-check the passage so the context-driven choices stay consistent",
         "resolve remaining ambiguities and finalise"),
        "Consider the context, cultural references and idioms, translate, check consistency and resolve ambiguities.",
        "context: a plain statement | idioms: none | draft: die Hunde sahen einen Ball | ambiguity: a=einen (accusative)",
    ),
    Template(
        "explanation", "Translation explanation",
        ("identify the key elements of the sentence",
         "choose a strategy: literal or idiomatic",
         "choose a rendering for each word or phrase",
         "explain the rationale of each choice",
         "review the translation and explain any adjustments",
         "give a final explanation of the trade-offs made"),
        "Translate, explain the difficult choices, then revise.",
        "draft: die Hunde sahen einen Ball | why: 'a ball' is the object, so einen | revise: unchanged",
    ),
    Template(
        "structural", "Structural transformation",
        ("determine whether the source uses an active or a passive construction",
         "decide whether converting the voice would read more naturally in the target",
         "arrange subject, verb and object for the target language",
         "translate with a syntactically correct construction",
         "check the flow of the translation",
         "rephrase if the construction feels forced, keeping the meaning"),
        "Work out voice and word order (active or passive, subject-verb-object reordering), translate, check the flow, rephrase.",
        "voice: active | order: S V O -> S V O | draft: die Hunde sahen einen Ball | flow: ok",
    ),
)}
TEMPLATE_NAMES: tuple[str, ...] = tuple(TEMPLATES)
SELECTION_MODES = ("fixed", "random", "by_rule")

SYSTEM_PROMPT = ("You are a careful translator. Reason inside <think></think>, "
                 "then give only the translation inside <answer></answer>.")

# The authors' RL prompt (their data preparation, `qwen-instruct`): this system message, a user turn
# that names the two languages, and the assistant turn pre-filled with `<think>`.
AUTHORS_SYSTEM_PROMPT = (
    "You are a helpful assistant. The assistant first thinks about the reasoning process in the mind and then "
    "provides the translation. The reasoning process and translation are enclosed within <think> </think> and "
    "<answer> </answer> tags, respectively. i.e., <think> reasoning process here </think><answer> translated "
    "text here </answer>. Now the user asks you to translate a given text. After thinking, when you reach a "
    "conclusion, provide the translated text within <answer> </answer> tags. i.e., <answer> translated text "
    "here </answer>.")
PREFILL = "<think>"
PROMPT_STYLES = ("authors", "ours")

# Words that tell the released corpus's step lists apart (checked in this order: the first step of
# several patterns mentions context or structure, so the distinctive ones go first).
_TEMPLATE_KEYS = (
    ("back_translation", ("back translation", "back-translat", "back translat")),
    ("triangulating", ("intermediate",)),
    ("context_aware", ("previous and subsequent", "previous and next", "dialogue")),
    ("structural", ("active or passive", "passive construction", "active/passive", "syntactic structure")),
    ("explanation", ("literal", "rationale", "explain")),
    ("hierarchical", ("primary structure", "simplest elements")),
)


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


def identify_template(thought_chains: str) -> str | None:
    """The template a released step list follows (by its distinctive wording), or None."""
    text = (thought_chains or "").lower()
    for name, keys in _TEMPLATE_KEYS:
        if any(k in text for k in keys):
            return name
    return None


def steps_text(template: str | Template) -> str:
    """The template's steps as a numbered list (what `template_in_prompt` shows a real model)."""
    return "\n".join(f"{i}. {step[0].upper()}{step[1:]}." for i, step in enumerate(get_template(template).steps, 1))


def user_message(text: str, src_lang, tgt_lang, template: str | Template) -> str:
    """Our user turn with the condensed template instruction (the embedded Toylang prompts)."""
    t = get_template(template)
    return f"{t.instruction}\nTranslate from {language(src_lang).name} to {language(tgt_lang).name}:\n{text}"


def build_prompt(text: str, src_lang, tgt_lang, template: str | Template = "hierarchical",
                 system_prompt: str | None = SYSTEM_PROMPT, style: str = "ours",
                 template_in_prompt: bool = True, prefill: bool | None = None) -> list[dict]:
    """Chat messages asking to translate `text` in the R1-T1 format.

    style 'ours': `system_prompt` and a user turn with the template's condensed instruction (without
    it when template_in_prompt=False). style 'authors': their system message (unless `system_prompt`
    is given), their user wording, and an assistant turn pre-filled with `<think>` (the completion
    continues it; rewards read it with prefix=PREFILL); template_in_prompt adds the template's
    numbered steps to the user turn [ours: the authors' prompts carry no template]. `prefill`
    overrides the style's pre-fill (None: pre-filled in 'authors', their RL prompt; not in 'ours').
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"source text must be a non-empty string, got {text!r}")
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style must be one of {PROMPT_STYLES}, got {style!r}")
    src, tgt = language(src_lang).name, language(tgt_lang).name
    if style == "ours":
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        user = (user_message(text, src_lang, tgt_lang, template) if template_in_prompt
                else f"Translate from {src} to {tgt}:\n{text}")
        messages.append({"role": "user", "content": user})
    else:
        user = f"Please translate the following {src} Source sentence into {tgt}.\nSource sentence: {text}"
        if template_in_prompt:
            user = f"Reason through these steps:\n{steps_text(template)}\n\n{user}"
        messages = [{"role": "system", "content": system_prompt or AUTHORS_SYSTEM_PROMPT}, {"role": "user", "content": user}]
    if prefill if prefill is not None else style == "authors":
        messages.append({"role": "assistant", "content": PREFILL})
    return messages


def prefill_of(prompt) -> str:
    """The pre-filled start of the assistant turn of a chat prompt ('' when it ends on a user turn)."""
    if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[-1], dict) and prompt[-1].get("role") == "assistant":
        return prompt[-1].get("content") or ""
    return ""


def format_completion(cot: str, translation: str) -> str:
    """The target output of a supervised CoT example."""
    return f"<think>{cot}</think><answer>{translation}</answer>"
