"""Build the rollout engine a `NestedReFTConfig` asks for (vLLM is imported only when asked for)."""

from __future__ import annotations

import logging

from torch import nn

from .base import RolloutEngine
from .hf import HFEngine

logger = logging.getLogger(__name__)

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def model_source(policy: nn.Module) -> str:
    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy  # PEFT
    path = getattr(base, "name_or_path", None) or getattr(base.config, "_name_or_path", None)
    if not path:
        raise ValueError("engine='vllm' starts vLLM from the policy's checkpoint; this policy has no "
                         "name_or_path (load it with from_pretrained, or save it and pass the folder)")
    return path


def build_engine(args, policy: nn.Module, tokenizer, eos_token_ids) -> RolloutEngine:
    """The engine reports μ from its sampler unless `behavior_logprobs='rescore'`, where the
    trainer scores the samples with its own forward under the skip set."""
    score = getattr(args, "behavior_logprobs", "sampler") == "sampler"
    if getattr(args, "behavior", "skip") == "pot":  # validated: engine is 'hf'
        from .pot import PoTHFEngine

        if hasattr(policy, "peft_config"):
            raise ValueError("behavior='pot' quantizes a full copy of the policy; with PEFT (use_peft) it is not "
                             "supported yet: use behavior='skip'")
        return PoTHFEngine(policy, tokenizer, bits=args.pot_bits, group_size=args.pot_group_size,
                           eos_token_ids=eos_token_ids, batch_size=args.rollout_batch_size, auto_sync=False,
                           compact_every=getattr(args, "rollout_compact_every", 0))
    if getattr(args, "behavior", "skip") == "balcony":  # validated: engine is 'hf', nothing skipped
        from .balcony import BalconyHFEngine

        return BalconyHFEngine(policy, tokenizer, exit=args.balcony_exit, exits_path=args.balcony_exits_path,
                               warmup_steps=args.balcony_warmup_steps, redistill_steps=args.balcony_redistill_steps,
                               lr=args.balcony_lr, kl_reduction=args.balcony_kl_reduction,
                               distill_batch_size=args.balcony_distill_batch_size, eos_token_ids=eos_token_ids,
                               batch_size=args.rollout_batch_size, compact_every=getattr(args, "rollout_compact_every", 0),
                               cache_implementation=getattr(args, "cache_implementation", None))
    if args.engine == "hf":
        return HFEngine(policy, tokenizer, eos_token_ids=eos_token_ids, batch_size=args.rollout_batch_size,
                        score_logprobs=score, cache_implementation=getattr(args, "cache_implementation", None),
                        compact_every=getattr(args, "rollout_compact_every", 0))
    if args.engine == "vllm":
        from .vllm_compiled import CompiledVLLMEngine
        from .vllm_engine import VLLMEngine

        dtype = args.vllm_dtype
        if dtype == "auto":
            dtype = str(next(policy.parameters()).dtype).removeprefix("torch.")
        engine_class = CompiledVLLMEngine if getattr(args, "vllm_compile", False) else VLLMEngine
        return engine_class(
            model_source(policy), eos_token_ids=eos_token_ids, dtype=dtype,
            gpu_memory_utilization=args.vllm_gpu_memory_utilization,
            tensor_parallel_size=args.vllm_tensor_parallel_size, max_model_len=args.vllm_max_model_length,
            seed=args.seed, enable_sleep_mode=args.vllm_enable_sleep_mode, score_logprobs=score,
            multiprocessing=not args.vllm_in_process, cpu_kvcache_gib=args.vllm_cpu_kvcache_gib,
        )
    if args.engine == "vllm_server":
        from .vllm_server import VLLMServerEngine

        # every rank builds one; the first rank of each server's block pushes weights and skip sets
        url = args.vllm_server_base_url or f"http://{args.vllm_server_host}:{args.vllm_server_port}"
        return VLLMServerEngine(url, weight_transfer=args.vllm_weight_transfer, weights_dir=args.vllm_server_weights_dir,
                                timeout=args.vllm_request_timeout, retries=args.vllm_server_retries,
                                wait_for_server=args.vllm_server_timeout, eos_token_ids=eos_token_ids,
                                score_logprobs=score, rank=args.process_index, world_size=args.world_size,
                                group_port=args.vllm_group_port)
    raise ValueError(f"engine must be one of hf, vllm, vllm_server, got {args.engine!r}")
