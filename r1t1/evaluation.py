"""Held-out translation quality: generate, extract answers, corpus chrF / BLEU with sacrebleu
signatures, optional COMET, format-validity rate and mean R1-T1 reward."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from sacrebleu.metrics import BLEU, CHRF

from nested_reft.evaluation import generate_completions
from rewards.translation import (
    bleu_tokenizer,
    extract_answer,
    format_valid,
    quality,
    translation_reward,
)

from .templates import prefill_of


@dataclass
class TranslationScores:
    chrf: float  # corpus chrF, 0-100
    bleu: float  # corpus BLEU, 0-100
    format_rate: float  # share of format-valid completions
    mean_reward: float  # mean R1-T1 reward (chrF quality), what GRPO optimises
    n: int
    chrf_signature: str
    bleu_signature: str
    comet: float | None = None
    temperature: float = 0.0
    seconds: float = 0.0
    completion_tokens: float | None = None  # mean generated tokens per completion (evaluate_translation)
    samples: list = field(default_factory=list)  # a few (source, completion, reference) rows
    completions: list = field(default_factory=list)  # every completion, in row order (not serialised)

    def as_dict(self, with_samples: bool = False) -> dict:
        out = asdict(self)
        out.pop("completions")
        if not with_samples:
            out.pop("samples")
        return out


def score_translations(completions: list[str], srcs: list[str], refs: list[str], comet_model: str | None = None,
                       num_keep: int = 5, bleu_tokenize: str | None = None, tgt_lang: str | None = None,
                       gate: str = "strict", prefixes: list[str] | None = None,
                       comet_batch_size: int = 32, comet_gpus: int | None = None) -> TranslationScores:
    """Scores of model completions against references; hypotheses are the last answer block of
    each completion ('' if none), so quality and format are reported separately. `prefixes`: what
    each prompt pre-filled (read before its completion); BLEU is tokenised for `tgt_lang` unless
    `bleu_tokenize` names a tokenizer; `gate` is the reward's format check."""
    if not len(completions) == len(srcs) == len(refs):
        raise ValueError(f"got {len(completions)} completions, {len(srcs)} sources and {len(refs)} references")
    if not refs:
        raise ValueError("nothing to score: no references")
    prefixes = list(prefixes) if prefixes is not None else [""] * len(completions)
    completions = [p + c for p, c in zip(prefixes, completions)]  # the whole assistant turn
    hyps = [extract_answer(c, strict=False) for c in completions]
    chrf, bleu = CHRF(), BLEU(tokenize=bleu_tokenizer(tgt_lang, bleu_tokenize))
    chrf_score, bleu_score = chrf.corpus_score(hyps, [refs]), bleu.corpus_score(hyps, [refs])
    comet = None
    if comet_model:
        scores = quality(hyps, refs, srcs, metric="comet", comet_model=comet_model,
                         comet_batch_size=comet_batch_size, comet_gpus=comet_gpus)
        comet = sum(scores) / len(scores)
    rewards = translation_reward(completions, srcs, refs, gate=gate)
    return TranslationScores(
        chrf=chrf_score.score, bleu=bleu_score.score,
        format_rate=sum(format_valid(c, gate) for c in completions) / len(completions),
        mean_reward=sum(rewards) / len(rewards), n=len(refs),
        chrf_signature=str(chrf.get_signature()), bleu_signature=str(bleu.get_signature()), comet=comet,
        samples=list(zip(srcs, completions, refs))[:num_keep], completions=completions,
    )


def evaluate_translation(model, tokenizer, rows, *, temperature: float = 0.0, max_new_tokens: int = 128,
                         batch_size: int = 64, seed: int = 0, progress: bool = False,
                         comet_model: str | None = None, gate: str = "strict", top_k: int = 0,
                         top_p: float = 1.0, bleu_tokenize: str | None = None) -> TranslationScores:
    """Generate for rows with `prompt` (chat messages), `src` and `ref` (and `tgt_lang`), and score them."""
    rows = list(rows)
    start = time.perf_counter()
    kind = "greedy" if temperature == 0 else f"T={temperature:g}"
    texts, n_tokens = generate_completions(model, tokenizer, [r["prompt"] for r in rows], temperature=temperature,
                                    max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
                                    progress=progress, desc=f"translate ({kind})", top_k=top_k, top_p=top_p)
    langs = {r.get("tgt_lang") for r in rows}
    scores = score_translations(texts, [r["src"] for r in rows], [r["ref"] for r in rows], comet_model=comet_model,
                                gate=gate, prefixes=[prefill_of(r["prompt"]) for r in rows],
                                tgt_lang=langs.pop() if len(langs) == 1 else None, bleu_tokenize=bleu_tokenize)
    scores.temperature = temperature
    scores.completion_tokens = n_tokens / len(texts)
    scores.seconds = time.perf_counter() - start
    return scores
