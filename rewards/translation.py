"""Translation rewards (R1-T1, SPEC §2): format validity and the format-gated quality reward.

    r = 0.2 · 1[format valid] + 1[format valid] · max(0, round(Q(src, mt, ref), 2))

`Q` is chrF (sacrebleu, scaled to [0, 1]; the default, runs anywhere), sentence BLEU (scaled to
[0, 1]) or COMET (unbabel-comet, from a local checkpoint path). `mt` is the text of the answer
block. Nothing here ever raises on model output: anything unreadable scores 0.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Sequence

from sacrebleu.metrics import BLEU, CHRF

from .completions import completion_text

METRICS = ("chrf", "bleu", "comet")
FORMAT_BONUS = 0.2

_TAGS = re.compile(r"</?(?:think|answer)>")
_FORMAT = re.compile(r"\A\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*\Z", re.DOTALL)
_LAST_ANSWER = re.compile(r"<answer>(?P<answer>(?:(?!<answer>).)*?)</answer>", re.DOTALL)


def _parse(text: str):
    """The match of a well-formed completion: exactly one think block, then exactly one answer
    block, nothing but whitespace around them, both non-empty, no stray tags inside."""
    if len(_TAGS.findall(text)) != 4:
        return None
    m = _FORMAT.match(text)
    if m is None or not m["think"].strip() or not m["answer"].strip():
        return None
    return m


def format_valid(completion) -> bool:
    """True for `<think>reasoning</think><answer>translation</answer>` and nothing else."""
    return _parse(completion_text(completion)) is not None


def extract_answer(completion, strict: bool = True) -> str:
    """The translation in a completion, stripped; '' when there is none.

    strict: only from a format-valid completion (what the reward scores). strict=False takes the
    last complete `<answer>…</answer>` block of any completion (what evaluation reports as the
    translation, next to the format-validity rate).
    """
    text = completion_text(completion)
    m = _parse(text)
    if m is not None:
        return m["answer"].strip()
    if strict:
        return ""
    answers = _LAST_ANSWER.findall(text)
    return answers[-1].strip() if answers else ""


# ------------------------------------------------------------------------------------ metrics

_chrf = CHRF()
_bleu = BLEU(effective_order=True)
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


def quality(hyps: Sequence[str], refs: Sequence[str], srcs: Sequence[str] | None = None, metric: str = "chrf",
            comet_model: str | None = None, comet_batch_size: int = 32, comet_gpus: int = 0) -> list[float]:
    """Sentence-level Q in [0, 1] (COMET can leave it slightly) for each (hyp, ref[, src])."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if len(hyps) != len(refs):
        raise ValueError(f"got {len(hyps)} hypotheses but {len(refs)} references")
    if metric == "chrf":
        return [_chrf.sentence_score(h, [r]).score / 100 for h, r in zip(hyps, refs)]
    if metric == "bleu":
        return [_bleu.sentence_score(h, [r]).score / 100 for h, r in zip(hyps, refs)]
    model = load_comet(comet_model)
    if srcs is None or len(srcs) != len(hyps):
        raise ValueError("metric 'comet' needs one source sentence per hypothesis")
    data = [{"src": s, "mt": h, "ref": r} for s, h, r in zip(srcs, hyps, refs)]
    out = model.predict(data, batch_size=comet_batch_size, gpus=comet_gpus, progress_bar=False)
    return [float(x) for x in out.scores]


def _as_strings(values, name: str) -> list[str]:
    values = list(values)
    bad = [v for v in values if not isinstance(v, str)]
    if bad:
        raise ValueError(f"{name} must be strings, got {bad[0]!r}")
    return values


def translation_reward(completions, src, ref, metric: str = "chrf", comet_model: str | None = None,
                       **kwargs) -> list[float]:
    """R1-T1's format-gated reward for each completion (batched: Q is computed in one call)."""
    srcs, refs = _as_strings(src, "src"), _as_strings(ref, "ref")
    texts = [completion_text(c) for c in completions]
    if not len(texts) == len(srcs) == len(refs):
        raise ValueError(f"got {len(texts)} completions, {len(srcs)} sources and {len(refs)} references")
    valid = [i for i, t in enumerate(texts) if _parse(t) is not None]
    rewards = [0.0] * len(texts)
    if not valid:
        return rewards
    scores = quality([extract_answer(texts[i]) for i in valid], [refs[i] for i in valid],
                     [srcs[i] for i in valid], metric=metric, comet_model=comet_model)
    for i, q in zip(valid, scores):
        rewards[i] = FORMAT_BONUS + max(0.0, round(q, 2))
    return rewards


def make_translation_reward(metric: str = "chrf", comet_model: str | None = None):
    """`translation_reward` with TRL's reward-function signature `f(completions, src, ref, **kwargs)`,
    named after its metric (TRL logs `rewards/<name>/mean`). Validates the metric now."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if metric == "comet":
        load_comet(comet_model)  # fail before training starts, not at the first reward

    def reward(completions, src, ref, **kwargs) -> list[float]:
        return translation_reward(completions, src, ref, metric=metric, comet_model=comet_model)

    reward.__name__ = reward.__qualname__ = f"translation_{metric}"
    return reward


def format_reward(completions, **kwargs) -> list[float]:
    """1.0 for a format-valid completion, else 0.0 (a diagnostic; the main reward already gates on it)."""
    return [float(format_valid(c)) for c in completions]
