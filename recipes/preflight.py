"""Checks a recipe runs before it loads any weights: the model path, its config and tokenizer (both
a few kilobytes), the skip policy against the real depth, prompt lengths against the context, and
combinations the engines cannot run, alone or sharded over several processes (docs/scaling.md).
Each failure is one error that names the bad value."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

import archs  # noqa: F401  (registers the architecture families with the Auto classes)
from nested_reft.engines.balcony import check_balcony_args
from nested_reft.evaluation import render_chat
from nested_reft.skipping import LayerSkipPolicy


def looks_local(model_path: str) -> bool:
    """A path rather than a Hub id: starts like one, or its first component is a local folder."""
    return model_path.startswith((".", "/", "~", "outputs/")) or Path(model_path.split("/")[0]).is_dir()


def check_model_path(model_path: str, hint: str = "") -> None:
    if looks_local(model_path) and not Path(model_path).expanduser().exists():
        raise FileNotFoundError(f"model {model_path!r} does not exist{hint}")


def check_skip_policy(num_layers: int, args) -> None:
    """The policy the trainer will build, built once here against the checkpoint's depth."""
    k_range = (args.skip_k_min, args.skip_k_max) if args.skip_k_min is not None else None
    try:
        LayerSkipPolicy(num_layers, skip_ratio=args.skip_ratio, keep_first=args.keep_first, keep_last=args.keep_last,
                        mode=args.skip_mode, layers=args.skip_layers, k_range=k_range)
    except ValueError as e:
        if args.skip_mode == "fixed":
            settings = f"skip_layers={args.skip_layers}"
        elif k_range is not None:
            settings = f"skip_k_min={args.skip_k_min}, skip_k_max={args.skip_k_max}"
        else:
            settings = f"skip_ratio={args.skip_ratio}"
        settings += f" (keep_first={args.keep_first}, keep_last={args.keep_last})"
        raise ValueError(f"{settings} does not fit this {num_layers}-layer model: {e}") from None


def check_prompt_lengths(tokenizer, prompts: list, context: int | None, max_completion_length: int | None) -> None:
    """Every prompt (as the chat template renders it) plus the completion budget fits the context."""
    if not prompts:
        raise ValueError("the training set has no prompts")
    conversational = isinstance(prompts[0], list)
    if conversational and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer of this model ({type(tokenizer).__name__}) has no chat template, and the prompts are "
                         "chat messages: use an instruct/chat checkpoint or set tokenizer.chat_template")
    if not context:
        return
    longest, where = 0, 0
    for i, prompt in enumerate(prompts):
        text = render_chat(prompt, tokenizer) if conversational else prompt  # a pre-filled turn is continued
        ids = tokenizer(text, add_special_tokens=not conversational)["input_ids"]
        if len(ids) > longest:
            longest, where = len(ids), i
    budget = max_completion_length or 0
    if longest + budget > context:
        raise ValueError(f"prompt {where} is {longest} tokens; with max_completion_length={budget} that is "
                         f"{longest + budget} > the model's context of {context} (max_position_embeddings): shorten "
                         "or filter the prompts, or lower max_completion_length")


def deepspeed_zero_stage(deepspeed) -> int:
    """The ZeRO stage of TrainingArguments.deepspeed (a dict or a JSON file), 0 when unset."""
    if not deepspeed:
        return 0
    config = deepspeed if isinstance(deepspeed, dict) else json.loads(Path(deepspeed).read_text())
    return int(config.get("zero_optimization", {}).get("stage", 0) or 0)


def launch_sharding(args) -> tuple[int, str | None, int]:
    """(processes, 'deepspeed' | 'fsdp' | None, ZeRO stage) of this run, from what `accelerate launch`
    sets in the environment (its config's stage, or a DeepSpeed JSON it names) and from the
    TrainingArguments (`--deepspeed`, `--fsdp`)."""
    from recipes.model_loading import sharding_from_env

    processes, _ = sharding_from_env()
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" or getattr(args, "fsdp", None):
        return processes, "fsdp", 0
    launched = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    if launched or getattr(args, "deepspeed", None):
        stage = max(int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0") or 0) if launched else 0,
                    deepspeed_zero_stage(os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") if launched else None),
                    deepspeed_zero_stage(getattr(args, "deepspeed", None)))
        return processes, "deepspeed", stage
    return processes, None, 0


def check_engine_and_sharding(args, use_peft: bool) -> None:
    """Combinations of engine, behavior model and sharding that would sample from, or send, the
    wrong weights. DDP and ZeRO-1/2 keep the whole policy on every rank. ZeRO-3 shards it; the
    trainer gathers it for each generation round of the in-process engine and for each weight
    sync, and the recipes gather it for their evaluations. FSDP shards it too and is not gathered."""
    processes, sharding, stage = launch_sharding(args)
    engine, behavior = args.engine, getattr(args, "behavior", "skip")
    if sharding == "fsdp":
        raise ValueError(f"FSDP keeps only shards of the policy between forwards, and engine={engine!r} would sample "
                         "from them (hf) or send them as weights (vllm, vllm_server): use DeepSpeed ZeRO-3, which the "
                         "trainer gathers (recipes/accelerate/deepspeed_zero3.yaml), or DDP / ZeRO-2")
    if stage >= 3 and behavior in ("pot", "balcony"):
        raise ValueError(f"behavior={behavior!r} builds its sampler from the policy's parameters, which ZeRO-3 shards "
                         "and it does not gather: use ZeRO-2 or DDP (recipes/accelerate/), or behavior='skip'")
    if stage >= 3 and engine == "hf" and not getattr(args, "ds3_gather_for_generation", True):
        raise ValueError("ds3_gather_for_generation=False with ZeRO-3 and engine='hf' would sample layer by layer from "
                         "shards, and ranks ending their rounds at different lengths would wait on each other "
                         "forever: keep ds3_gather_for_generation true (the default)")
    joined = getattr(args, "world_size", processes)
    if processes > 1 and joined != processes:
        raise ValueError(f"the launcher started {processes} processes, but they joined no process group ({joined} "
                         "each), so each would train alone on the same output_dir: on a machine without a GPU pass "
                         "--use_cpu true (DDP: recipes/accelerate/multi_cpu.yaml; DeepSpeed too)")
    if engine == "vllm" and processes > 1 and torch.cuda.is_available() and not getattr(args, "use_cpu", False):
        raise ValueError(f"engine='vllm' with {processes} trainer processes: each process starts its own in-process "
                         "vLLM, and vLLM's single-process executor puts every one of them on cuda:0. Use "
                         "engine='vllm_server' (docs/scaling.md), engine='hf', or one trainer process")
    if use_peft and behavior == "pot":
        raise ValueError("behavior='pot' quantizes a full copy of the policy; with use_peft the adapters would not "
                         "be in it: use behavior='skip' with PEFT, or train without PEFT")
    if use_peft and behavior == "balcony":
        raise ValueError("behavior='balcony' with use_peft is not supported (the exit is built on the plain base): use "
                         "behavior='skip' with PEFT, or train without PEFT")


def preflight(model_path: str, args, prompts: list, use_peft: bool = False, revision: str | None = None,
              hint: str = ""):
    """Run every check; returns the tokenizer (the recipes load it again with the model)."""
    check_model_path(model_path, hint)
    check_engine_and_sharding(args, use_peft)
    config = AutoConfig.from_pretrained(model_path, revision=revision)
    check_skip_policy(config.num_hidden_layers, args)
    check_balcony_args(config.num_hidden_layers, args)
    tokenizer = AutoTokenizer.from_pretrained(model_path, revision=revision)
    check_prompt_lengths(tokenizer, prompts, getattr(config, "max_position_embeddings", None),
                         args.max_completion_length)
    return tokenizer
