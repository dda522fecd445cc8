"""Build (or load from cache) the embedded tiny math model: tokenizer, Qwen2 model, warm-up SFT.

Everything is made offline from the synthetic task in `math_task.py`, deterministic for a seed,
and cached with `save_pretrained`, so the default recipes run anywhere with no download.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import random
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import tokenizers
import torch
import transformers
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config

from ..skipping import skip_layers
from .math_task import LEVEL_WEIGHTS, LEVELS, as_chat, drill_text, generate_problems
from .tokenizer import render_chat, train_chat_tokenizer

logger = logging.getLogger(__name__)

# Bump when the recipe below changes, so stale caches are rebuilt instead of silently reused.
TINY_MATH_VERSION = 4

# The build's float math is pinned so that a recipe and seed give the same weights on any machine
# (docs/tiny_model.md, "Same weights on every machine"). Torch and MKL split reductions and GEMMs
# by thread count (3, 5 or 6 threads gave other weights than 1, 2, 4, 8 or 16), so training runs
# on a fixed number of intra-op threads: one, since 1 and 2 give the same weights and two OpenMP
# threads stall each other on a 2-core machine with anything else running (a step took seconds).
# AVX-512 kernels round differently from AVX2 ones, so on x86 ATen and MKL are held to AVX2; both
# are read when torch loads, hence a child process.
BUILD_THREADS = 1


@dataclass
class TinyMathRecipe:
    """Everything that determines the built model; part of the cache key."""

    vocab_size: int = 512
    hidden_size: int = 128
    num_layers: int = 12
    num_heads: int = 4  # head_dim 32: the smallest vLLM accepts
    num_kv_heads: int = 4
    intermediate_size: int = 384
    train_problems: int = 24_000
    levels: tuple[int, ...] = LEVELS
    level_weights: tuple[float, ...] = LEVEL_WEIGHTS
    # Two ways to answer (math_task.py): until `careful_only` of the steps every reply is the worked
    # solution, so the whole early budget teaches the column algorithm; after it each reply is the
    # worked one with probability `careful_fraction`, else the quick answer. The warm model then
    # answers carefully about that often, which GRPO raises.
    careful_only: float = 0.6
    careful_fraction: float = 0.45
    # Column drills: single-digit facts are what a model this small learns slowest inside worked
    # solutions (each is 1-2 of ~40 reply tokens). Until `careful_only`, every `drill_every`-th step
    # trains on `drill_batch` rows of `drill_steps` column steps ("7+8=15 c1; 4+3+1=8; ..."), the
    # loss on what follows each "=" only (0: no drills).
    drill_every: int = 2
    drill_batch: int = 32
    drill_steps: int = 10
    steps: int = 3000
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 40
    weight_decay: float = 0.01
    # LayerDrop: from `layerdrop_start` (a fraction of the steps) on, on `layerdrop_prob` of the
    # steps, 1..layerdrop_max_k random layers (never the first or last `layerdrop_keep`) are
    # skipped, so the model works as its own layer-skipped behavior model (docs/tiny_model.md):
    # one skipped layer moves it 0.05-0.12 nats/token instead of 0.4-0.8.
    layerdrop_prob: float = 0.3
    layerdrop_max_k: int = 3
    layerdrop_keep: int = 2
    layerdrop_start: float = 0.5


def default_cache_dir() -> Path:
    root = os.environ.get("REFT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "nested_reft"
    )
    return Path(root)


# Options added after a version shipped: at their neutral value they stay out of the cache key,
# so existing caches of the same model stay valid.
OPTIONS_ADDED_LATER = {"layerdrop_start": 0.0}


def _cache_key(recipe: TinyMathRecipe, seed: int) -> str:
    import hashlib

    fields = {k: v for k, v in asdict(recipe).items() if OPTIONS_ADDED_LATER.get(k, object()) != v}
    blob = json.dumps({"v": TINY_MATH_VERSION, "seed": seed, **fields}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _encode(tokenizer, problems, reply: str = "solution") -> list[tuple[list[int], int]]:
    """(input_ids, prompt_length) per problem, answered by its `reply` attribute (the worked
    `solution` or the `quick_solution`): the loss covers only the assistant's reply."""
    out = []
    for p in problems:
        prompt = render_chat(as_chat(p), add_generation_prompt=True)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c_ids = tokenizer(getattr(p, reply) + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        out.append((p_ids + c_ids, len(p_ids)))
    return out


def _drill_rows(tokenizer, recipe: TinyMathRecipe, rng: random.Random) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) drill rows: column steps, labels only on what follows each "="."""
    rows = []
    for _ in range(recipe.drill_batch):
        text = drill_text(rng, recipe.drill_steps, recipe.levels, recipe.level_weights)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        targets = set()
        for step_start in [0] + [i + 2 for i in range(len(text)) if text.startswith("; ", i)]:
            end = text.find("; ", step_start)
            end = len(text) if end < 0 else end
            eq = text.find("=", step_start, end)
            targets.update(range(eq + 1, end))
        labels = [t if start in targets else -100 for t, (start, _) in zip(enc["input_ids"], enc["offset_mapping"])]
        rows.append((enc["input_ids"], labels))
    return rows


def _replies(recipe: TinyMathRecipe, rng: random.Random, step: int, batch: list[int], careful, quick):
    """The batch's examples: all worked before `careful_only` of the steps, then each one worked
    with probability `careful_fraction`, else quick."""
    if step < recipe.careful_only * recipe.steps or recipe.careful_fraction >= 1:
        return [careful[i] for i in batch]
    return [careful[i] if rng.random() < recipe.careful_fraction else quick[i] for i in batch]


def _length_bucketed_batches(examples, batch_size: int, rng: random.Random):
    """Shuffle, then sort within windows of 50 batches by length: little padding, still random."""
    idx = list(range(len(examples)))
    rng.shuffle(idx)
    window = batch_size * 50
    batches = []
    for start in range(0, len(idx), window):
        chunk = sorted(idx[start : start + window], key=lambda i: len(examples[i][0]))
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def _collate(rows: list[tuple[list[int], int | list[int]]], pad_id: int):
    """Right-padded ids, attention mask and labels of (input_ids, prompt_length) rows (labels -100
    on the prompt) or of (input_ids, labels) rows."""
    width = max(len(seq) for seq, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (seq, target) in enumerate(rows):
        ids[row, : len(seq)] = torch.tensor(seq)
        if isinstance(target, int):
            labels[row, target : len(seq)] = torch.tensor(seq[target:])
        else:
            labels[row, : len(seq)] = torch.tensor(target)
        attn[row, : len(seq)] = 1
    return ids, attn, labels


def _layerdrop(recipe: TinyMathRecipe, rng: random.Random, step: int) -> tuple[int, ...]:
    if step < recipe.layerdrop_start * recipe.steps:
        return ()
    if recipe.layerdrop_prob <= 0 or rng.random() >= recipe.layerdrop_prob:
        return ()
    eligible = range(recipe.layerdrop_keep, recipe.num_layers - recipe.layerdrop_keep)
    k = rng.randint(1, min(recipe.layerdrop_max_k, len(eligible)))
    return tuple(sorted(rng.sample(eligible, k)))


def build_tokenizer(recipe: TinyMathRecipe, seed: int) -> PreTrainedTokenizerFast:
    problems = generate_problems(4000, "train", seed=seed, levels=recipe.levels)
    texts = [  # both ways of answering, so the quick one's marker is a token of its own
        render_chat(as_chat(p) + [{"role": "assistant", "content": p.quick_solution if i % 4 == 0 else p.solution}])
        for i, p in enumerate(problems)
    ]
    return train_chat_tokenizer(texts, vocab_size=recipe.vocab_size)


def build_model(recipe: TinyMathRecipe, tokenizer) -> torch.nn.Module:
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads,
        intermediate_size=recipe.intermediate_size,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


# The weights after this many warm-up steps are hashed into build_info.json (`prefix_sha256`): a
# short rerun of the recipe checks that it still reproduces a shipped build bit for bit.
PREFIX_STEPS = 20


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes, in `named_parameters` order."""
    import hashlib

    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def supervise(model, tokenizer, recipe: TinyMathRecipe, seed: int, progress: bool = True,
              stop_after: int | None = None) -> dict:
    """Warm-up SFT on worked solutions and quick answers (see `careful_only`); returns training stats,
    with the weights' hash after PREFIX_STEPS steps. stop_after: run only that many steps of the
    recipe's schedule (a prefix of the build, for the reproducibility check)."""
    problems = generate_problems(recipe.train_problems, "train", seed=seed, levels=recipe.levels,
                                 level_weights=recipe.level_weights)
    rng = random.Random(seed)
    examples = _encode(tokenizer, problems)
    quick = _encode(tokenizer, problems, reply="quick_solution")
    opt = torch.optim.AdamW(
        model.parameters(), lr=recipe.lr, betas=(0.9, 0.98), weight_decay=recipe.weight_decay
    )

    def lr_at(step):
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        frac = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    batches: list = []
    tokens, start, losses = 0, time.perf_counter(), []
    bar = tqdm(range(recipe.steps if stop_after is None else min(stop_after, recipe.steps)),
               desc="tiny model warm-up SFT", disable=not progress)
    prefix_sha256 = None
    for _step in bar:
        if _step == PREFIX_STEPS:
            prefix_sha256 = weights_sha256(model)
        if not batches:
            batches = _length_bucketed_batches(examples, recipe.batch_size, rng)
        drill = recipe.drill_every and _step < recipe.careful_only * recipe.steps and _step % recipe.drill_every == 1
        if drill:
            rows = _drill_rows(tokenizer, recipe, rng)
        else:
            rows = _replies(recipe, rng, _step, batches.pop(), examples, quick)
        ids, attn, labels = _collate(rows, tokenizer.pad_token_id)
        with skip_layers(model, _layerdrop(recipe, rng, _step)):
            loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(attn.sum())
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}",
                        tok_s=f"{tokens / (time.perf_counter() - start):.0f}")
        if (_step + 1) % 100 == 0:
            logger.info("step %d loss %.3f", _step + 1, sum(losses[-20:]) / len(losses[-20:]))
    model.eval()
    seconds = time.perf_counter() - start
    if len(losses) == PREFIX_STEPS:
        prefix_sha256 = weights_sha256(model)
    return {"train_seconds": seconds, "train_tokens": tokens, "tokens_per_s": tokens / seconds,
            "final_loss": sum(losses[-20:]) / len(losses[-20:]), "prefix_steps": PREFIX_STEPS,
            "prefix_sha256": prefix_sha256}


def pinned_environment() -> dict[str, str]:
    """The environment the build's process needs: on x86 with AVX2, AVX2 kernels in ATen and MKL.

    MKL_CBWR=AVX2 is MKL's own switch for identical results on Intel and compatible CPUs. Other
    CPUs (ARM) have no such pin: their builds are deterministic there but differ from x86 ones.
    """
    if platform.machine().lower() in ("x86_64", "amd64") and torch.cpu._is_avx2_supported():
        return {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}
    return {}


@contextmanager
def fixed_threads(n: int):
    """Run with n intra-op threads (the float sums then split the same way), restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# The default recipe's build (seed SHIPPED_SEED) ships with the package as a checkpoint folder, so
# no run pays the build; `make tiny-models` rebuilds it (`python -m archs.tiny.build --ship`).
SHIPPED_MATH = Path(__file__).resolve().parent / "models" / "math"
SHIPPED_SEED = 0


def shipped_math_model() -> Path | None:
    """The shipped folder when it holds the current default recipe's build, else None (a recipe
    changed since it was made: the caller builds instead, and the shipped-files test fails)."""
    info = SHIPPED_MATH / "build_info.json"
    if not info.exists():
        return None
    key = json.loads(info.read_text()).get("cache_key")
    return SHIPPED_MATH if key == _cache_key(TinyMathRecipe(), SHIPPED_SEED) else None


def build_tiny_math_model(
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    recipe: TinyMathRecipe | None = None,
    progress: bool = True,
    rebuild: bool = False,
) -> Path:
    """Path to a saved tiny Qwen2 math model + tokenizer: the shipped folder for the default recipe
    and seed, else built on first use and cached.

    The folder loads with `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`
    like any Hub checkpoint. Deterministic for (recipe, seed), whatever the thread count or the x86
    CPU; reused from `cache_dir` (default `~/.cache/nested_reft`, or `$REFT_CACHE`) on later calls.
    rebuild: build even when shipped or cached.
    """
    recipe = recipe or TinyMathRecipe()
    if not rebuild and recipe == TinyMathRecipe() and seed == SHIPPED_SEED:
        shipped = shipped_math_model()
        if shipped is not None:
            return shipped
        logger.warning("the shipped tiny math model in %s is not the current recipe's build: building it "
                       "(`make tiny-models` updates the shipped files)", SHIPPED_MATH)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = root / f"tiny-math-{_cache_key(recipe, seed)}"
    if (out / "build_info.json").exists() and not rebuild:
        return out
    pins = pinned_environment()
    if any(os.environ.get(k) != v for k, v in pins.items()):
        _build_in_child(root, seed, recipe, progress, pins)
    else:
        _build(out, seed, recipe, progress)
    return out


def _build_in_child(root: Path, seed: int, recipe: TinyMathRecipe, progress: bool, pins: dict):
    """Run the build in a fresh interpreter whose torch loads with `pins` set."""
    package_root = str(Path(__file__).resolve().parents[2])  # so the child imports this very code
    path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "archs.tiny.build", "--cache_dir", str(root), "--seed", str(seed),
           "--recipe", json.dumps(asdict(recipe)), "--rebuild"] + ([] if progress else ["--quiet"])
    logger.info("building the tiny math model in a child process with %s", pins)
    done = subprocess.run(cmd, env={**os.environ, **pins, "PYTHONPATH": path})
    if done.returncode != 0:
        raise RuntimeError(f"the tiny math model's build failed (exit code {done.returncode}): {cmd}")


def _build(out: Path, seed: int, recipe: TinyMathRecipe, progress: bool) -> None:
    torch.manual_seed(seed)
    start = time.perf_counter()
    with fixed_threads(BUILD_THREADS):
        tokenizer = build_tokenizer(recipe, seed)
        model = build_model(recipe, tokenizer)
        n_params = sum(p.numel() for p in model.parameters())
        logger.info("building tiny math model (%.2fM parameters, %d threads, %s kernels) into %s",
                    n_params / 1e6, BUILD_THREADS, torch.backends.cpu.get_cpu_capability(), out)
        stats = supervise(model, tokenizer, recipe, seed, progress=progress)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    info = {"seed": seed, "version": TINY_MATH_VERSION, "cache_key": _cache_key(recipe, seed), "parameters": n_params,
            "build_seconds": time.perf_counter() - start, "recipe": asdict(recipe), **stats,
            # what the weights depend on beyond the recipe, to compare builds across machines
            "threads": BUILD_THREADS, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "mkl_cbwr": os.environ.get("MKL_CBWR"), "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}
    (tmp / "build_info.json").write_text(json.dumps(info, indent=2))
    if out.exists():  # a stale or partial folder from an interrupted build
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)  # atomic: a crash mid-build never leaves a folder that looks complete


def load_tiny_math_model(path: str | os.PathLike):
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _prefix_fingerprint(seed: int, recipe: TinyMathRecipe) -> dict:
    """In this process: the tokenizer file's hash and the weights' hash after PREFIX_STEPS steps."""
    import hashlib
    import tempfile

    torch.manual_seed(seed)
    with fixed_threads(BUILD_THREADS):
        tokenizer = build_tokenizer(recipe, seed)
        model = build_model(recipe, tokenizer)
        stats = supervise(model, tokenizer, recipe, seed, progress=False, stop_after=PREFIX_STEPS)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        tokenizer_sha = hashlib.sha256((Path(tmp) / "tokenizer.json").read_bytes()).hexdigest()
    return {"tokenizer_sha256": tokenizer_sha, "prefix_sha256": stats["prefix_sha256"]}


def prefix_fingerprint(seed: int = SHIPPED_SEED, recipe: TinyMathRecipe | None = None) -> dict:
    """The first PREFIX_STEPS steps of a build, run as the build runs (pinned threads and kernels,
    a child process on x86): {"tokenizer_sha256", "prefix_sha256"}, to compare with a build's files."""
    recipe = recipe or TinyMathRecipe()
    pins = pinned_environment()
    if not any(os.environ.get(k) != v for k, v in pins.items()):
        return _prefix_fingerprint(seed, recipe)
    package_root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "archs.tiny.build", "--seed", str(seed), "--recipe", json.dumps(asdict(recipe)),
           "--fingerprint"]
    done = subprocess.run(cmd, env={**os.environ, **pins, "PYTHONPATH": path}, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the build's fingerprint failed (exit code {done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ship(cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Rebuild the default recipe (seed SHIPPED_SEED) and replace the shipped folder with it."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        built = build_tiny_math_model(tmp, SHIPPED_SEED, progress=progress, rebuild=True)
        staging = SHIPPED_MATH.with_name(SHIPPED_MATH.name + ".new")
        if staging.exists():
            shutil.rmtree(staging)
        shutil.copytree(built, staging)
    if SHIPPED_MATH.exists():
        shutil.rmtree(SHIPPED_MATH)
    staging.rename(SHIPPED_MATH)
    return SHIPPED_MATH


def main(argv=None) -> None:
    """The child process of `build_tiny_math_model` (or a build from the command line)."""
    parser = argparse.ArgumentParser(description="Build the embedded tiny math model.")
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recipe", default="{}", help="TinyMathRecipe fields as JSON")
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--ship", action="store_true", help=f"rebuild the default recipe into {SHIPPED_MATH}")
    parser.add_argument("--fingerprint", action="store_true",
                        help=f"print the tokenizer's and the first {PREFIX_STEPS} steps' hashes as JSON (this process)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.recipe).items()}
    if args.ship:
        print(ship(args.cache_dir, progress=not args.quiet))
    elif args.fingerprint:
        print(json.dumps(_prefix_fingerprint(args.seed, TinyMathRecipe(**fields))))
    else:
        print(build_tiny_math_model(args.cache_dir, args.seed, TinyMathRecipe(**fields),
                                    progress=not args.quiet, rebuild=args.rebuild))


if __name__ == "__main__":
    main()
