"""Toylang: a rule-based artificial language, the embedded default's translation pair (English → Toylang).

Grammar (small on purpose, so that a 2M-parameter model can learn every step):
- lexicon: 20 nouns, 10 adjectives, 12 verbs (English forms are regular in the noun, irregular
  in some verbs: "saw", "ate", "held");
- morphology: plural noun `-li`, object noun `-ko` (after the plural), past verb `-ta`, and a
  postposition suffix on the noun of a place phrase (`in` `-de`, `near` `-pe`, `with` `-mo`);
- word order: place phrase, subject, object, verb (P S O V); adjective after its noun;
  articles are dropped.

"the big dogs saw a red ball in the house"  →  "hemade vatoli gor ponako sel mirata"

Chain-of-thought traces follow the six R1-T1 templates (`TOY_LAYOUTS`, one per template name in
`r1t1.templates`). Every trace is built from the same learnable steps: the words of each phrase
glossed with their inflected Toylang form, listed phrase by phrase in Toylang order, so the
answer is the concatenation of the glossed forms. Train and test sentences are disjoint by
construction: the hash of a sentence decides its split.

A cold-start corpus may also hold *literal* examples (`LITERAL_COT`, `literal_translation`,
`is_literal_example`), as a careless teacher writes them: a one-line thought and a word-for-word
answer that keeps the English order (subject, verb, object, place; adjectives before their nouns).
Each word is still the right inflected Toylang form, so a literal answer is partly right (chrF
57.2 on the 200 held-out sentences) but never correct. A model warmed up on both kinds samples
either; a quality reward pays the careful traces, which is what RL can learn.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

NOUNS = {
    "dog": "vato", "cat": "miri", "bird": "pela", "horse": "suko", "boy": "tani", "girl": "lura",
    "farmer": "boda", "teacher": "kesa", "king": "dalo", "frog": "runo", "ball": "pona",
    "apple": "fisa", "house": "hema", "tree": "zulo", "river": "nalu", "book": "leka",
    "stone": "gari", "flower": "sina", "boat": "waku", "cake": "pami",
}
ADJECTIVES = {
    "big": "gor", "small": "tik", "red": "sel", "green": "vim", "old": "dar", "young": "nel",
    "happy": "jol", "tired": "ruk", "white": "pal", "black": "nok",
}
# lemma: (third person singular, past, Toylang stem)
VERBS = {
    "see": ("sees", "saw", "mira"), "eat": ("eats", "ate", "kana"), "find": ("finds", "found", "tosa"),
    "carry": ("carries", "carried", "bela"), "like": ("likes", "liked", "lova"),
    "follow": ("follows", "followed", "suna"), "wash": ("washes", "washed", "nepa"),
    "hear": ("hears", "heard", "oda"), "hold": ("holds", "held", "kepa"),
    "throw": ("throws", "threw", "zema"), "help": ("helps", "helped", "alu"), "draw": ("draws", "drew", "riba"),
}
PREPOSITIONS = {"in": "de", "near": "pe", "with": "mo"}
PLURAL, OBJECT, PAST = "li", "ko", "ta"

SRC_LANG, TGT_LANG = "en", "qtl"


@dataclass(frozen=True)
class Phrase:
    role: str  # "S" subject, "V" verb, "O" object, "P" place phrase
    english: str  # the English words of the phrase
    gloss: tuple[tuple[str, str], ...]  # (English word, inflected Toylang word), in Toylang order


@dataclass(frozen=True)
class ToyPair:
    src: str  # English
    tgt: str  # Toylang
    phrases: tuple[Phrase, ...]  # in Toylang order: P S O V (P optional)
    past: bool
    suffixes: tuple[str, ...]  # morphology used, for the explanation template


ANIMATE = tuple(NOUNS)[:10]  # subjects are people and animals; objects and places any noun


def _noun_phrase(rng: random.Random, role: str) -> tuple[Phrase, bool]:
    noun = rng.choice(ANIMATE if role == "S" else list(NOUNS))
    plural = rng.random() < 0.35
    adj = rng.choice(list(ADJECTIVES)) if rng.random() < 0.6 else None
    det = "the" if plural or rng.random() < 0.5 else "a"
    en_noun = noun + "s" if plural else noun
    toy_noun = NOUNS[noun] + (PLURAL if plural else "") + (OBJECT if role == "O" else "")
    english = " ".join(w for w in (det, adj, en_noun) if w)
    gloss = ((en_noun, toy_noun),) + (((adj, ADJECTIVES[adj]),) if adj else ())
    return Phrase(role, english, gloss), plural


def make_pair(rng: random.Random) -> ToyPair:
    subject, subj_plural = _noun_phrase(rng, "S")
    obj, obj_plural = _noun_phrase(rng, "O")
    lemma = rng.choice(list(VERBS))
    third, past_form, stem = VERBS[lemma]
    past = rng.random() < 0.5
    en_verb = past_form if past else (lemma if subj_plural else third)
    verb = Phrase("V", en_verb, ((en_verb, stem + (PAST if past else "")),))
    phrases = [subject, obj, verb]
    english = f"{subject.english} {en_verb} {obj.english}"
    suffixes = [OBJECT] + ([PLURAL] if subj_plural or obj_plural else []) + ([PAST] if past else [])
    if rng.random() < 0.4:
        prep = rng.choice(list(PREPOSITIONS))
        noun = rng.choice(list(NOUNS)[10:])
        place = Phrase("P", f"{prep} the {noun}", ((f"{prep} {noun}", NOUNS[noun] + PREPOSITIONS[prep]),))
        phrases.insert(0, place)
        english += f" {place.english}"
        suffixes.append(PREPOSITIONS[prep])
    toy = " ".join(t for p in phrases for _, t in p.gloss)
    return ToyPair(english, toy, tuple(phrases), past, tuple(suffixes))


SUFFIX_MEANING = {PLURAL: "plural", OBJECT: "object", PAST: "past", "de": "in", "pe": "near", "mo": "with"}


def _words(pair: ToyPair) -> str:
    """The shared core step: each phrase in Toylang order, its words glossed with inflected forms."""
    return " ; ".join(f"{p.role} " + " ".join(f"{e} = {t}" for e, t in p.gloss) for p in pair.phrases)


def _order(pair: ToyPair) -> str:
    return " ".join(p.role for p in pair.phrases)


def _heads(pair: ToyPair) -> str:
    return " ".join(f"{p.role}={p.gloss[0][0]}" for p in pair.phrases)


def _layout_hierarchical(p: ToyPair) -> str:
    return f"core: {_heads(p)} | words: {_words(p)} | order: {_order(p)}"


def _layout_triangulating(p: ToyPair) -> str:
    pivot = " ".join(e for ph in p.phrases for e, _ in ph.gloss)  # English words in Toylang order
    return f"pivot: {pivot} | words: {_words(p)}"


def _layout_back_translation(p: ToyPair) -> str:
    back = " ".join(f"{ph.gloss[0][1]}={ph.gloss[0][0]}" for ph in p.phrases)
    return f"words: {_words(p)} | back: {back} | match: yes"


def _layout_context_aware(p: ToyPair) -> str:
    return f"context: statement, {'past' if p.past else 'present'} | words: {_words(p)}"


def _layout_explanation(p: ToyPair) -> str:
    why = " ".join(f"{s}={SUFFIX_MEANING[s]}" for s in p.suffixes)
    return f"words: {_words(p)} | why: {why}"


def _layout_structural(p: ToyPair) -> str:
    return f"voice: active | order: S V O -> {_order(p)} | words: {_words(p)}"


TOY_LAYOUTS = {
    "hierarchical": _layout_hierarchical,
    "triangulating": _layout_triangulating,
    "back_translation": _layout_back_translation,
    "context_aware": _layout_context_aware,
    "explanation": _layout_explanation,
    "structural": _layout_structural,
}


def toy_cot(pair: ToyPair, template: str) -> str:
    """The reasoning trace (the text inside <think>) of `pair` following `template`."""
    if template not in TOY_LAYOUTS:
        raise ValueError(f"no Toylang trace for template {template!r}; templates are {', '.join(TOY_LAYOUTS)}")
    return TOY_LAYOUTS[template](pair)


LITERAL_COT = "word for word"  # the whole thought of a literal example: no analysis, no reordering
ENGLISH_ORDER = ("S", "V", "O", "P")


def literal_translation(pair: ToyPair) -> str:
    """The careless teacher's answer: each word's inflected Toylang form, in English word order
    (S V O P, an adjective before its noun), articles dropped."""
    phrases = sorted(pair.phrases, key=lambda p: ENGLISH_ORDER.index(p.role))
    return " ".join(t for p in phrases for _, t in reversed(p.gloss))


def is_literal_example(src: str, fraction: float, seed: int = 0) -> bool:
    """Whether the cold-start example of `src` is a literal one (a function of seed and sentence, so
    an example keeps its kind across epochs and shuffles); `fraction` of examples on average."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"literal fraction must be a number in [0, 1], got {fraction!r}")
    h = int.from_bytes(hashlib.sha256(f"literal:{seed}:{src}".encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def is_test_sentence(src: str, test_fraction: float = 0.1) -> bool:
    h = int.from_bytes(hashlib.sha256(src.encode()).digest()[:8], "big")
    return (h % 10_000) < test_fraction * 10_000


def generate_pairs(n: int, split: str = "train", seed: int = 0, test_fraction: float = 0.1,
                   unique: bool = False) -> list[ToyPair]:
    """n English→Toylang pairs of a split ('train' or 'test'), deterministic for a seed.

    unique=True never repeats a sentence (for test sets). Stops early if the split runs out.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n!r}")
    rng = random.Random(f"toylang:{seed}:{split}")
    want_test = split == "test"
    out, seen, attempts = [], set(), 0
    while len(out) < n and attempts < 200 * max(n, 1):
        attempts += 1
        pair = make_pair(rng)
        if is_test_sentence(pair.src, test_fraction) != want_test or (unique and pair.src in seen):
            continue
        seen.add(pair.src)
        out.append(pair)
    return out
