"""Build (or load from cache) the embedded tiny translation model: a tokenizer that covers English,
Toylang and the prompts, and a freshly initialised Qwen2 model of the tiny-math shape.

The weights are not trained here: R1-T1's first stage, the supervised cold start on CoT
translations (`recipes/translate_sft.py`, TRL's SFTTrainer), is what teaches it. The folder loads
with `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .build import TinyMathRecipe, build_model, default_cache_dir
from .tokenizer import render_chat, train_chat_tokenizer
from .translation_task import TOY_LAYOUTS, generate_pairs, toy_cot

# Bump when the recipe below changes, so stale caches are rebuilt instead of silently reused.
TINY_TRANSLATION_VERSION = 1


@dataclass
class TinyTranslationRecipe:
    """Everything that determines the built model; part of the cache key."""

    vocab_size: int = 768
    hidden_size: int = 128
    num_layers: int = 4  # Toylang needs lookups and reordering, not arithmetic: 4 layers learn it, twice as fast
    num_heads: int = 4  # head_dim 32: the smallest vLLM accepts
    num_kv_heads: int = 4
    intermediate_size: int = 512
    tokenizer_pairs: int = 3000


# The build for the Toylang demo (the default recipe, seed 0, the toy prompts of `r1t1.toy`) ships with
# the package as a checkpoint folder; `make tiny-models` rewrites it (`python -m r1t1.toy --ship`).
SHIPPED_TRANSLATION = Path(__file__).resolve().parent / "models" / "translation"


def shipped_translation_model(key: str) -> Path | None:
    """The shipped folder when it holds the build with cache key `key`, else None."""
    info = SHIPPED_TRANSLATION / "build_info.json"
    if info.exists() and json.loads(info.read_text()).get("cache_key") == key:
        return SHIPPED_TRANSLATION
    return None


def _cache_key(recipe: TinyTranslationRecipe, seed: int, prompt_texts: Sequence[str]) -> str:
    blob = json.dumps({"v": TINY_TRANSLATION_VERSION, "seed": seed, "prompts": list(prompt_texts),
                       **asdict(recipe)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def tokenizer_corpus(recipe: TinyTranslationRecipe, seed: int, prompt_texts: Sequence[str]) -> list[str]:
    """Chat-formatted Toylang examples (every template's trace) plus the prompt texts."""
    layouts = list(TOY_LAYOUTS)
    texts = []
    for i, pair in enumerate(generate_pairs(recipe.tokenizer_pairs, "train", seed=seed)):
        prompt = prompt_texts[i % len(prompt_texts)] if prompt_texts else ""
        answer = f"<think>{toy_cot(pair, layouts[i % len(layouts)])}</think><answer>{pair.tgt}</answer>"
        texts.append(render_chat([{"role": "system", "content": prompt},
                                  {"role": "user", "content": pair.src},
                                  {"role": "assistant", "content": answer}]))
    return texts


def build_tiny_translation_model(
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    recipe: TinyTranslationRecipe | None = None,
    prompt_texts: Sequence[str] = (),
    rebuild: bool = False,
) -> Path:
    """Path to a saved tiny Qwen2 model (initialised, untrained) and its Toylang tokenizer: the
    shipped folder (`archs/tiny/models/translation`) when it is this build, else built and cached.

    prompt_texts: texts the prompts will contain (system prompt, template instructions), so the
    tokenizer learns them as few tokens; they are part of the cache key. Deterministic for
    (recipe, seed, prompt_texts); reused from `cache_dir` (default `~/.cache/nested_reft` or
    `$REFT_CACHE`).
    """
    recipe = recipe or TinyTranslationRecipe()
    key = _cache_key(recipe, seed, prompt_texts)
    if not rebuild and (shipped := shipped_translation_model(key)) is not None:
        return shipped
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = root / f"tiny-translation-{key}"
    if (out / "build_info.json").exists() and not rebuild:
        return out
    start = time.perf_counter()
    torch.manual_seed(seed)
    tokenizer = train_chat_tokenizer(tokenizer_corpus(recipe, seed, prompt_texts), vocab_size=recipe.vocab_size)
    shape = TinyMathRecipe(vocab_size=recipe.vocab_size, hidden_size=recipe.hidden_size,
                           num_layers=recipe.num_layers, num_heads=recipe.num_heads,
                           num_kv_heads=recipe.num_kv_heads, intermediate_size=recipe.intermediate_size)
    model = build_model(shape, tokenizer)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    info = {"seed": seed, "version": TINY_TRANSLATION_VERSION, "cache_key": key, "recipe": asdict(recipe),
            "parameters": sum(p.numel() for p in model.parameters()), "vocab": len(tokenizer),
            "build_seconds": time.perf_counter() - start}
    (tmp / "build_info.json").write_text(json.dumps(info, indent=2))
    if out.exists():  # a stale or partial folder from an interrupted build
        shutil.rmtree(out)
    tmp.rename(out)  # atomic: an interrupted build never leaves a folder that looks complete
    return out


def ship(prompt_texts: Sequence[str], seed: int = 0) -> Path:
    """Rebuild the default recipe's model for `prompt_texts` into SHIPPED_TRANSLATION."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        built = build_tiny_translation_model(tmp, seed=seed, prompt_texts=prompt_texts, rebuild=True)
        if SHIPPED_TRANSLATION.exists():
            shutil.rmtree(SHIPPED_TRANSLATION)
        shutil.copytree(built, SHIPPED_TRANSLATION)
    return SHIPPED_TRANSLATION
