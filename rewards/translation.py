"""Translation rewards (R1-T1, SPEC §2): format validity and the format-gated quality reward.

    r = 0.2 · 1[format valid] + 1[format valid] · 1[answer non-empty] · max(0, round(Q(src, mt, ref), 2))

`Q` is chrF (sacrebleu, scaled to [0, 1]; the default, runs anywhere), sentence BLEU (scaled to
[0, 1], tokenised for the target language) or COMET (unbabel-comet, from a local checkpoint path).
`mt` is the text of the answer block. Two format gates:
- `strict` [ours]: `<think>…</think><answer>…</answer>` with only whitespace around the blocks and
  both non-empty;
- `authors` [the released code]: each of the four tags exactly once and in order; text before,
  between and after them and an empty think are allowed, and an empty answer still earns the 0.2.
`prefix` is what the prompt pre-filled in the assistant turn (the authors' prompts end in `<think>`):
the gate reads `prefix + completion`, as the authors' check reads the response after the header.
Nothing here ever raises on model output: anything unreadable scores 0.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Sequence

from sacrebleu.metrics import BLEU, CHRF

from .completions import completion_text

METRICS = ("chrf", "bleu", "comet")
FORMAT_GATES = ("strict", "authors")
FORMAT_BONUS = 0.2

_TAGS = re.compile(r"</?(?:think|answer)>")
_FORMAT = re.compile(r"\A\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*\Z", re.DOTALL)
_LAST_ANSWER = re.compile(r"<answer>(?P<answer>(?:(?!<answer>).)*?)</answer>", re.DOTALL)
_ORDER = ("<think>", "</think>", "<answer>", "</answer>")


def _check_gate(gate: str) -> None:
    if gate not in FORMAT_GATES:
        raise ValueError(f"format gate must be one of {FORMAT_GATES}, got {gate!r}")


def parse(completion, gate: str = "strict", prefix: str = "") -> str | None:
    """The stripped answer of a format-valid completion under `gate`, or None if it is not valid.
    Under `authors` an empty answer ('') is valid; under `strict` it is not."""
    _check_gate(gate)
    text = prefix + completion_text(completion)
    if gate == "strict":
        if len(_TAGS.findall(text)) != 4:
            return None
        m = _FORMAT.match(text)
        if m is None or not m["think"].strip() or not m["answer"].strip():
            return None
        return m["answer"].strip()
    if any(text.count(tag) != 1 for tag in _ORDER):
        return None
    positions = [text.index(tag) for tag in _ORDER]
    if positions != sorted(positions):
        return None
    return text[positions[2] + len("<answer>"): positions[3]].strip()


def format_valid(completion, gate: str = "strict", prefix: str = "") -> bool:
    """True when the completion passes the format gate (see the module docstring)."""
    return parse(completion, gate, prefix) is not None


def extract_answer(completion, strict: bool = True, gate: str = "strict", prefix: str = "") -> str:
    """The translation in a completion, stripped; '' when there is none.

    strict: only from a completion that passes `gate` (what the reward scores). strict=False takes
    the last complete `<answer>…</answer>` block of any completion (what evaluation reports as the
    translation, next to the format-validity rate).
    """
    answer = parse(completion, gate, prefix)
    if answer is not None:
        return answer
    if strict:
        return ""
    answers = _LAST_ANSWER.findall(prefix + completion_text(completion))
    return answers[-1].strip() if answers else ""


# ------------------------------------------------------------------------------------ metrics

_chrf = CHRF()
_comet_models: dict[str, object] = {}
_comet_lock = threading.Lock()


def load_comet(path: str | os.PathLike):
    """A COMET model from a local checkpoint (a `.ckpt` file or a downloaded model folder)."""
    path = os.fspath(path) if path is not None else None
    if not path:
        raise ValueError("metric 'comet' needs comet_model: the path of a local COMET checkpoint")
    if not os.path.exists(path):
        raise FileNotFoundError(f"COMET checkpoint {path!r} does not exist")
    try:
        import comet
    except ImportError as e:
        raise ImportError("metric 'comet' needs unbabel-comet: pip install 'nested-reft-toolkit[comet]'") from e
    with _comet_lock:
        if path not in _comet_models:
            ckpt = path
            if os.path.isdir(path):
                ckpt = os.path.join(path, "checkpoints", "model.ckpt")
                if not os.path.exists(ckpt):
                    raise FileNotFoundError(f"COMET folder {path!r} has no checkpoints/model.ckpt")
            _comet_models[path] = comet.load_from_checkpoint(ckpt)
        return _comet_models[path]


# sacrebleu's tokenizer for BLEU by target language (our short codes; `kr` is the authors' Korean tag).
# 13a splits at spaces, so a language written without spaces between words is one "word" per sentence
# under it, and a hypothesis one word off its reference scores 0. Such languages get a tokenizer of
# their own: sacrebleu's word segmenters for Chinese, Japanese and Korean, characters for Thai, Lao,
# Burmese and Khmer (sacrebleu has no word segmenter for them). The rest use 13a.
BLEU_TOKENIZERS = {"zh": "zh", "zt": "zh", "ja": "ja-mecab", "ko": "ko-mecab", "kr": "ko-mecab",
                   "th": "char", "lo": "char", "my": "char", "km": "char"}
_TOKENIZER_EXTRAS = {"ja-mecab": "sacrebleu[ja]", "ko-mecab": "sacrebleu[ko]", "flores200": "sentencepiece",
                     "flores101": "sentencepiece", "spm": "sentencepiece"}
_bleus: dict[str, BLEU] = {}


def bleu_tokenizer(tgt_lang: str | None, tokenize: str | None = None) -> str:
    """The sacrebleu tokenizer BLEU uses for `tgt_lang`: `tokenize` when given (any sacrebleu
    name, e.g. 'flores200'), else the language's own (`BLEU_TOKENIZERS`) or '13a'."""
    if tokenize:
        return tokenize
    if tgt_lang is not None and not isinstance(tgt_lang, str):
        raise ValueError(f"target language must be a language code such as 'th', got {tgt_lang!r}")
    return BLEU_TOKENIZERS.get((tgt_lang or "").strip().lower(), "13a")


def sentence_bleu_metric(tokenize: str) -> BLEU:
    """A sentence-BLEU scorer with `tokenize`; fails with the extra to install when its package is missing."""
    if tokenize not in _bleus:
        try:
            _bleus[tokenize] = BLEU(tokenize=tokenize, effective_order=True)
        except (ImportError, RuntimeError) as e:
            extra = _TOKENIZER_EXTRAS.get(tokenize)
            hint = f": pip install '{extra}' (or the project's [cjk] extra)" if extra else ""
            raise ImportError(f"BLEU tokenizer {tokenize!r} is not available{hint} ({e})") from e
        except (KeyError, ValueError) as e:
            raise ValueError(f"unknown sacrebleu tokenizer {tokenize!r} ({e})") from None
    return _bleus[tokenize]


def default_comet_gpus() -> int:
    """COMET scores on one GPU when there is one."""
    import torch

    return 1 if torch.cuda.is_available() else 0


def quality(hyps: Sequence[str], refs: Sequence[str], srcs: Sequence[str] | None = None, metric: str = "chrf",
            comet_model: str | None = None, comet_batch_size: int = 32, comet_gpus: int | None = None,
            tgt_langs: Sequence[str | None] | None = None, bleu_tokenize: str | None = None) -> list[float]:
    """Sentence-level Q in [0, 1] (COMET can leave it slightly) for each (hyp, ref[, src]).
    BLEU tokenises each pair for its target language (`tgt_langs`) unless `bleu_tokenize` is given."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if len(hyps) != len(refs):
        raise ValueError(f"got {len(hyps)} hypotheses but {len(refs)} references")
    if metric == "chrf":
        return [_chrf.sentence_score(h, [r]).score / 100 for h, r in zip(hyps, refs)]
    if metric == "bleu":
        langs = list(tgt_langs) if tgt_langs is not None else [None] * len(hyps)
        if len(langs) != len(hyps):
            raise ValueError(f"got {len(hyps)} hypotheses but {len(langs)} target languages")
        return [sentence_bleu_metric(bleu_tokenizer(lang, bleu_tokenize)).sentence_score(h, [r]).score / 100
                for h, r, lang in zip(hyps, refs, langs)]
    model = load_comet(comet_model)
    if srcs is None or len(srcs) != len(hyps):
        raise ValueError("metric 'comet' needs one source sentence per hypothesis")
    data = [{"src": s, "mt": h, "ref": r} for s, h, r in zip(srcs, hyps, refs)]
    gpus = default_comet_gpus() if comet_gpus is None else comet_gpus
    out = model.predict(data, batch_size=comet_batch_size, gpus=gpus, progress_bar=False)
    return [float(x) for x in out.scores]


def _as_strings(values, name: str) -> list[str]:
    values = list(values)
    bad = [v for v in values if not isinstance(v, str)]
    if bad:
        raise ValueError(f"{name} must be strings, got {bad[0]!r}")
    return values


def translation_reward(completions, src, ref, metric: str = "chrf", comet_model: str | None = None,
                       gate: str = "strict", prefix: str = "", tgt_lang=None, bleu_tokenize: str | None = None,
                       comet_batch_size: int = 32, comet_gpus: int | None = None, **kwargs) -> list[float]:
    """R1-T1's format-gated reward for each completion (batched: Q is computed in one call).
    `tgt_lang` (a dataset column: one code per completion) picks BLEU's tokenizer."""
    srcs, refs = _as_strings(src, "src"), _as_strings(ref, "ref")
    answers = [parse(c, gate, prefix) for c in completions]
    if not len(answers) == len(srcs) == len(refs):
        raise ValueError(f"got {len(answers)} completions, {len(srcs)} sources and {len(refs)} references")
    langs = list(tgt_lang) if tgt_lang is not None else [None] * len(answers)
    rewards = [FORMAT_BONUS if a is not None else 0.0 for a in answers]
    scored = [i for i, a in enumerate(answers) if a]  # valid and non-empty: an empty answer keeps only the 0.2
    if not scored:
        return rewards
    scores = quality([answers[i] for i in scored], [refs[i] for i in scored], [srcs[i] for i in scored],
                     metric=metric, comet_model=comet_model, comet_batch_size=comet_batch_size, comet_gpus=comet_gpus,
                     tgt_langs=[langs[i] for i in scored], bleu_tokenize=bleu_tokenize)
    for i, q in zip(scored, scores):
        rewards[i] += max(0.0, round(q, 2))
    return rewards


def make_translation_reward(metric: str = "chrf", comet_model: str | None = None, gate: str = "strict",
                            prefix: str = "", bleu_tokenize: str | None = None, target_languages=(),
                            comet_batch_size: int = 32, comet_gpus: int | None = None):
    """`translation_reward` with TRL's reward-function signature `f(completions, src, ref, **kwargs)`,
    named after its metric (TRL logs `rewards/<name>/mean`). Validates everything now, before training:
    the metric, the gate, the COMET checkpoint, and BLEU's tokenizer for each of `target_languages`."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    _check_gate(gate)
    if metric == "comet":
        load_comet(comet_model)  # fail before training starts, not at the first reward
    if metric == "bleu":
        for lang in set(target_languages) or {None}:
            sentence_bleu_metric(bleu_tokenizer(lang, bleu_tokenize))

    def reward(completions, src, ref, tgt_lang=None, **kwargs) -> list[float]:
        return translation_reward(completions, src, ref, metric=metric, comet_model=comet_model, gate=gate,
                                  prefix=prefix, tgt_lang=tgt_lang, bleu_tokenize=bleu_tokenize,
                                  comet_batch_size=comet_batch_size, comet_gpus=comet_gpus)

    reward.__name__ = reward.__qualname__ = f"translation_{metric}"
    return reward


def make_format_reward(gate: str = "strict", prefix: str = ""):
    """1.0 for a completion that passes `gate`, else 0.0 (a logged diagnostic: the main reward already gates)."""
    _check_gate(gate)

    def format_valid_reward(completions, **kwargs) -> list[float]:
        return [float(format_valid(c, gate, prefix)) for c in completions]

    format_valid_reward.__name__ = format_valid_reward.__qualname__ = "format_reward"  # logged as rewards/format_reward
    return format_valid_reward


format_reward = make_format_reward()
