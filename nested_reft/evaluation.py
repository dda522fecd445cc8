"""Held-out math accuracy of a causal LM: greedy and sampled, batched Hugging Face generation."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from rewards.math import accuracy_reward, format_reward

logger = logging.getLogger(__name__)


@dataclass
class MathEvalResult:
    accuracy: float
    format_rate: float
    n: int
    temperature: float
    seconds: float
    tokens_per_s: float
    mean_tokens: float = 0.0  # generated tokens per completion
    by_level: dict = field(default_factory=dict)
    samples: list = field(default_factory=list)  # a few (prompt, completion, gold, score) rows
    completions: list = field(default_factory=list)  # every completion, in the dataset's order

    def as_dict(self) -> dict:
        """JSON-ready (level keys as strings, as they come back from a JSON file)."""
        out = {k: v for k, v in self.__dict__.items() if k not in ("samples", "completions")}
        out["by_level"] = {str(k): v for k, v in self.by_level.items()}
        return out


def render_chat(prompt, tokenizer) -> str:
    """A prompt as text. Chat messages get the generation prompt, or, when they end on an assistant
    turn (a pre-fill such as R1-T1's `<think>`), that turn is continued; strings pass through."""
    if isinstance(prompt, str):
        return prompt
    if prompt and isinstance(prompt[-1], dict) and prompt[-1].get("role") == "assistant":
        return tokenizer.apply_chat_template(prompt, tokenize=False, continue_final_message=True)
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def _rng_devices(model) -> list:
    """The CUDA devices whose RNG generate() may draw from (the CPU generator is always forked)."""
    device = getattr(model, "device", torch.device("cpu"))
    return [device] if device.type == "cuda" else []


_reported_checkpoint_settings: set[int] = set()


@torch.no_grad()
def generate_completions(model, tokenizer, prompts: list, *, temperature: float = 0.0,
                         max_new_tokens: int = 128, batch_size: int = 64, seed: int = 0,
                         progress: bool = False, desc: str = "generating", top_k: int = 0,
                         top_p: float = 1.0) -> tuple[list[str], int]:
    """Completions (decoded text) for chat prompts; returns (texts, generated token count).

    temperature 0 means greedy. Sampling uses the full distribution by default (top_k 0, top_p 1:
    the distribution GRPO samples from); evaluation presets may truncate it (R1-T1's authors
    decode at temperature 0.1, top-k 64, top-p 0.75). The decoding is exactly that: the
    checkpoint's own `generation_config` (Qwen2.5-Instruct's repetition penalty 1.05, say) is
    neutralised, as for rollouts, and what it would have added is logged once.

    Nothing outside is changed: sampling draws from a forked RNG (the caller's random stream
    continues as if no evaluation ran), and the tokenizer's padding side and the model's
    train/eval mode are restored.
    """
    from nested_reft.engines.hf import checkpoint_sampler_settings, neutral_generation_config

    ignored = checkpoint_sampler_settings(model)
    if ignored and id(model) not in _reported_checkpoint_settings:
        _reported_checkpoint_settings.add(id(model))
        logger.info("evaluation ignores the checkpoint's generation_config settings %s and decodes with "
                    "temperature=%s, top_k=%s, top_p=%s only", ignored, temperature, top_k, top_p)
    was_training, padding_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    gen = torch.Generator().manual_seed(seed)
    if temperature > 0:
        config = GenerationConfig(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    else:
        config = GenerationConfig(do_sample=False)
    config.max_new_tokens, config.pad_token_id = max_new_tokens, tokenizer.pad_token_id
    texts, n_tokens = [], 0
    try:
        with torch.random.fork_rng(devices=_rng_devices(model)), neutral_generation_config(model):
            for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress):
                batch = prompts[start : start + batch_size]
                rendered = [render_chat(p, tokenizer) for p in batch]
                enc = tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
                out = model.generate(**enc, generation_config=config)
                completion_ids = out[:, enc["input_ids"].shape[1] :]
                n_tokens += int((completion_ids != tokenizer.pad_token_id).sum())
                texts += tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    finally:
        model.train(was_training)
        tokenizer.padding_side = padding_side
    return texts, n_tokens


def evaluate_math(model, tokenizer, dataset, *, temperature: float = 0.0, max_new_tokens: int = 128,
                  batch_size: int = 64, seed: int = 0, progress: bool = False,
                  num_keep: int = 5) -> MathEvalResult:
    """Accuracy of `model` on rows with `prompt` (chat messages) and `solution` (gold)."""
    prompts = [row["prompt"] for row in dataset]
    golds = [row["solution"] for row in dataset]
    start = time.perf_counter()
    kind = "greedy" if temperature == 0 else f"T={temperature:g}"
    texts, n_tokens = generate_completions(model, tokenizer, prompts, temperature=temperature,
                                           max_new_tokens=max_new_tokens, batch_size=batch_size,
                                           seed=seed, progress=progress, desc=f"eval ({kind})")
    seconds = time.perf_counter() - start
    scores = accuracy_reward(texts, golds)
    formats = format_reward(texts)
    levels = defaultdict(list)
    for row, s in zip(dataset, scores):
        if "level" in row and row["level"] is not None:
            levels[row["level"]].append(s)
    return MathEvalResult(
        accuracy=sum(scores) / max(1, len(scores)),
        format_rate=sum(formats) / max(1, len(formats)),
        n=len(scores),
        temperature=temperature,
        seconds=seconds,
        tokens_per_s=n_tokens / seconds if seconds > 0 else 0.0,
        mean_tokens=n_tokens / max(1, len(texts)),
        by_level={k: sum(v) / len(v) for k, v in sorted(levels.items())},
        samples=[(p, t, g, s) for p, t, g, s in list(zip(prompts, texts, golds, scores))[:num_keep]],
        completions=texts,
    )


@dataclass
class PassAtKResult:
    """k samples per problem: the mean sampled accuracy, the fraction solved at least once
    (pass@k), both per level, and the completions (problem-major: k per problem)."""

    accuracy: float
    pass_at_k: float
    k: int
    n: int
    temperature: float
    by_level: dict = field(default_factory=dict)  # level -> {"accuracy", "pass_at_k"}
    completions: list = field(default_factory=list)

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "completions"}
        out["by_level"] = {str(k): v for k, v in self.by_level.items()}
        return out


def evaluate_pass_at_k(model, tokenizer, dataset, *, k: int = 16, temperature: float = 1.0,
                       max_new_tokens: int = 128, batch_size: int = 256, seed: int = 0,
                       progress: bool = False) -> PassAtKResult:
    """Sample `k` completions per row (`prompt`, `solution`, optional `level`) and score them: what
    GRPO's groups of k see. pass@k is exact for n = k samples (solved by at least one)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k!r}")
    if temperature <= 0:
        raise ValueError(f"pass@k samples: temperature must be > 0, got {temperature!r}")
    prompts = [row["prompt"] for row in dataset for _ in range(k)]
    golds = [row["solution"] for row in dataset for _ in range(k)]
    texts, _ = generate_completions(model, tokenizer, prompts, temperature=temperature, max_new_tokens=max_new_tokens,
                                    batch_size=batch_size, seed=seed, progress=progress, desc=f"pass@{k} (T={temperature:g})")
    scores = accuracy_reward(texts, golds)
    per_problem = [scores[i * k : (i + 1) * k] for i in range(len(dataset))]
    levels = defaultdict(list)
    for row, s in zip(dataset, per_problem):
        if row.get("level") is not None:
            levels[row["level"]].append(s)

    def summary(groups):
        return sum(sum(g) / k for g in groups) / max(1, len(groups)), sum(max(g) > 0 for g in groups) / max(1, len(groups))

    accuracy, solved = summary(per_problem)
    return PassAtKResult(
        accuracy=accuracy, pass_at_k=solved, k=k, n=len(per_problem), temperature=temperature,
        by_level={lv: dict(zip(("accuracy", "pass_at_k"), summary(g))) for lv, g in sorted(levels.items())},
        completions=texts,
    )
