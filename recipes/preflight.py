"""Checks a recipe runs before it loads any weights: the model path, its config and tokenizer (both
a few kilobytes), the skip policy against the real depth, prompt lengths against the context, and
combinations the engines cannot run. Each failure is one error that names the bad value."""

from __future__ import annotations

import json
from pathlib import Path

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
        raise ValueError(f"skip settings do not fit this {num_layers}-layer model: {e}") from None


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


def check_engine_and_sharding(args, use_peft: bool) -> None:
    """The in-process HF engine samples from the policy's parameters as they sit on this rank:
    under FSDP or ZeRO-3 those are shards, so it would sample from garbage."""
    from recipes.model_loading import sharding_from_env

    _, env_stage = sharding_from_env()
    stage = max(env_stage, deepspeed_zero_stage(getattr(args, "deepspeed", None)))
    if getattr(args, "fsdp", None):
        stage = max(stage, 3)
    if args.engine == "hf" and stage >= 3:
        raise ValueError(f"engine='hf' samples from this rank's parameters, which FSDP / ZeRO-3 shard (stage {stage}): "
                         "use engine='vllm' or 'vllm_server', or ZeRO-2 / DDP (recipes/accelerate/)")
    if use_peft and getattr(args, "behavior", "skip") == "pot":
        raise ValueError("behavior='pot' quantizes a full copy of the policy; with use_peft the adapters would not "
                         "be in it: use behavior='skip' with PEFT, or train without PEFT")
    if use_peft and getattr(args, "behavior", "skip") == "balcony":
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
