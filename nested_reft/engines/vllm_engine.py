"""`VLLMEngine`: layer-skipped rollouts through vLLM, colocated with the trainer.

The checkpoint is served by our skip-aware subclass of its vLLM architecture (see
`vllm_models.py`, registered by the `vllm.general_plugins` entry point); a worker extension sets
the skip set and loads new weights in place on every worker through `collective_rpc`.

Behavior log-probs come from vLLM's sampler with `logprobs_mode="processed_logprobs"`: the
log-softmax of the logits after the repetition penalty, temperature, min-p and top-k / top-p
(renormalised over the kept tokens), i.e. of the distribution that sampled, as the HF engine
reports it (docs/nested_reft.md, "behavior log-probs").
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable, Sequence

import torch

from .base import RolloutEngine, Rollouts, SamplingSpec, request_seeds
from .vllm_plugin import check_vllm_version, skip_architecture

logger = logging.getLogger(__name__)

WORKER_EXTENSION = "nested_reft.engines.vllm_worker.NestedReFTWorkerExtension"


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    """Set environment variables while vLLM starts (it reads them then), restore them after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def checkpoint_architectures(model_path: str, revision: str | None = None) -> list[str]:
    from transformers import AutoConfig

    return list(AutoConfig.from_pretrained(model_path, revision=revision).architectures or [])


def vllm_sampling_params(sampling: SamplingSpec, n_prompts: int, *, eos_ids, logprobs: bool, ignore_eos: bool = False):
    """One SamplingParams per prompt: request i is seeded with seed + i (distinct across rounds and
    ranks when the seed comes from `round_seed`), so a batch replays."""
    from vllm import SamplingParams

    common = dict(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                  min_p=sampling.min_p, repetition_penalty=sampling.repetition_penalty,
                  max_tokens=sampling.max_new_tokens, logprobs=0 if logprobs else None,
                  stop_token_ids=list(eos_ids) if eos_ids else None, ignore_eos=ignore_eos, detokenize=False)
    if sampling.seed is None:
        return [SamplingParams(**common) for _ in range(n_prompts)]
    return [SamplingParams(seed=seed, **common) for seed in request_seeds(sampling.seed, n_prompts)]


def rollouts_from_outputs(outputs, logprobs: bool, skip, seconds: float) -> Rollouts:
    ids = [list(o.outputs[0].token_ids) for o in outputs]
    lps = None
    if logprobs:
        lps = [[step[tok].logprob for tok, step in zip(seq, o.outputs[0].logprobs)] for seq, o in zip(ids, outputs)]
    return Rollouts(ids, lps, tuple(skip), seconds, 0.0)


class VLLMEngine(RolloutEngine):
    """A vLLM `LLM` serving the skip-aware twin of `model_path`.

    `dtype` float32 reproduces the trainer's numbers (tests); `enforce_eager` stays on for the
    run-time-skip class (it reads the skip set at every forward); the compiled engine
    (`CompiledVLLMEngine`) starts this class with its compact model and `enforce_eager=False`.
    `enable_sleep_mode` needs a GPU platform that supports it:
    asking for it elsewhere is an error, not a silent no-op. On CPU, `cpu_kvcache_gib` sets
    `VLLM_CPU_KVCACHE_SPACE`; `multiprocessing` sets `VLLM_ENABLE_V1_MULTIPROCESSING` (None:
    vLLM's default, a separate engine process).
    """

    def __init__(self, model_path: str, *, eos_token_ids: Iterable[int] | None = None, dtype: str = "auto",
                 gpu_memory_utilization: float = 0.3, tensor_parallel_size: int = 1,
                 max_model_len: int | None = None, max_num_seqs: int | None = None, seed: int = 0,
                 enable_sleep_mode: bool = False, enable_prefix_caching: bool = False,
                 score_logprobs: bool = True, multiprocessing: bool | None = None,
                 cpu_kvcache_gib: int | None = None, revision: str | None = None,
                 architecture: str | None = None, hf_overrides: dict | None = None, enforce_eager: bool = True,
                 **llm_kwargs):
        check_vllm_version()
        # before vLLM starts; the compiled engine (vllm_compiled.py) passes its compact class and config
        arch = architecture or skip_architecture(checkpoint_architectures(model_path, revision))
        self.hf_overrides = {"architectures": [arch], **(hf_overrides or {})}
        self.enforce_eager = enforce_eager
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size!r}")
        env = {}
        if multiprocessing is not None:
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocessing else "0"
        if cpu_kvcache_gib is not None:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(int(cpu_kvcache_gib))
        in_process = env.get("VLLM_ENABLE_V1_MULTIPROCESSING", os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1")) == "0"
        if in_process and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            # vLLM's CPU worker would pin the OpenMP threads of the process it runs in: in-process,
            # that is the trainer's process. Leave thread placement to the OS (and the user).
            env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        with _environ(env):
            self._start(model_path, arch, revision, dtype, gpu_memory_utilization, tensor_parallel_size,
                        max_model_len, max_num_seqs, seed, enable_sleep_mode, enable_prefix_caching, llm_kwargs)
        self.eos_ids = list(eos_token_ids) if eos_token_ids is not None else None
        self.score_logprobs = score_logprobs
        info = self.llm.collective_rpc("nested_reft_info")[0]
        self.num_layers = info["num_layers"]
        self.compact = info["compact"]  # holds only the kept layers (`info["slots"]` of them)
        self.slots = info["slots"]
        self.last_sync_seconds = 0.0
        logger.info("vLLM engine up in %.1f s: %s (%d layers), %s", self.start_seconds, info["model_class"],
                    self.num_layers, "in-process" if self.in_process else "engine process")

    def _start(self, model_path, arch, revision, dtype, gpu_memory_utilization, tensor_parallel_size,
               max_model_len, max_num_seqs, seed, enable_sleep_mode, enable_prefix_caching, llm_kwargs):
        from vllm import LLM
        from vllm import envs as vllm_envs
        from vllm.platforms import current_platform

        if hasattr(vllm_envs, "disable_envs_cache"):  # an earlier engine froze vLLM's view of the environment
            vllm_envs.disable_envs_cache()
        if enable_sleep_mode and not current_platform.is_sleep_mode_available():
            raise ValueError(f"enable_sleep_mode=True: vLLM has no sleep mode on this platform "
                             f"({current_platform.device_type}); set it to False")
        self.in_process = not vllm_envs.VLLM_ENABLE_V1_MULTIPROCESSING
        self.enable_prefix_caching = enable_prefix_caching
        self.sleep_enabled = enable_sleep_mode
        self.sleeping = False
        self.architecture = arch
        if current_platform.is_cpu() and "enable_chunked_prefill" not in llm_kwargs:
            # A round's prompts can exceed one scheduler step; vLLM then rewinds a seeded request's
            # generator, which a CPU torch.Generator cannot do ("does not use offset").
            llm_kwargs = {**llm_kwargs, "enable_chunked_prefill": False}
        start = time.perf_counter()
        self.llm = LLM(
            model=model_path, revision=revision, dtype=dtype, enforce_eager=self.enforce_eager,
            hf_overrides=self.hf_overrides, worker_extension_cls=WORKER_EXTENSION,
            gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len, seed=seed, logprobs_mode="processed_logprobs",
            enable_prefix_caching=enable_prefix_caching, enable_sleep_mode=enable_sleep_mode,
            **({"max_num_seqs": max_num_seqs} if max_num_seqs else {}), **llm_kwargs,
        )
        self.start_seconds = time.perf_counter() - start

    # ------------------------------------------------------------------ skip set and weights

    def set_skip(self, layers: Sequence[int]) -> None:
        skip = tuple(sorted(set(int(i) for i in layers)))
        bad = [i for i in skip if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"layer indices {bad} are out of range for a model with {self.num_layers} layers")
        if skip == self.skip:
            return
        if self.compact:
            raise TypeError("this instance serves a compact model: change its layers with set_kept")
        self.llm.collective_rpc("nested_reft_set_skip", args=(list(skip),))
        if self.enable_prefix_caching:  # cached prefixes were computed with another skip set
            self.llm.reset_prefix_cache()
        self.skip = skip

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy trainer tensors (Hugging Face names) into every worker's model, in place; timed."""
        start = time.perf_counter()
        self.send_weights("nested_reft_load_weights", named_tensors)
        self.last_sync_seconds = time.perf_counter() - start

    def send_weights(self, method: str, named_tensors, *args):
        """Call the worker method `method(*args, weights)` with checkpoint-named tensors: passed as
        they are in-process, through a safetensors file in shared memory otherwise."""
        named = [(n, t.detach().to("cpu" if not self.in_process else t.device).contiguous()) for n, t in named_tensors]
        if self.in_process:
            out = self.llm.collective_rpc(method, args=(*args, named))
        else:  # RPC arguments are serialised: hand the workers a safetensors file in shared memory
            from safetensors.torch import save_file

            from .vllm_worker import weights_file, worker_weights_dir

            with weights_file(worker_weights_dir()) as path:  # the folder the workers read; removed on SIGTERM too
                save_file(dict(named), path)
                out = self.llm.collective_rpc(method, args=(*args, path))
        if self.enable_prefix_caching:
            self.llm.reset_prefix_cache()
        return out

    # ------------------------------------------------------------------ sampling

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingSpec, *, ignore_eos: bool = False) -> Rollouts:
        if self.sleeping:
            raise RuntimeError("the vLLM engine is asleep: call wake_up() before generate()")
        from vllm.inputs import TokensPrompt

        params = vllm_sampling_params(sampling, len(prompt_token_ids), eos_ids=self.eos_ids,
                                      logprobs=self.score_logprobs, ignore_eos=ignore_eos)
        prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_token_ids]
        start = time.perf_counter()
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return rollouts_from_outputs(outputs, self.score_logprobs, self.skip, time.perf_counter() - start)

    # ------------------------------------------------------------------ memory

    def sleep(self, level: int = 1) -> None:
        """Free the GPU memory between rollouts (GPU only). Level 1 (what the trainer uses) offloads the
        weights to CPU memory and drops the KV cache; level 2 drops the weights too, which is only safe
        when every tensor is re-sent after waking (the trainer sends only what changed)."""
        if not self.sleep_enabled:
            raise RuntimeError("this engine was built with enable_sleep_mode=False")
        self.llm.sleep(level=level)
        self.sleeping = True

    def wake_up(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if shutdown is not None:
                shutdown()
            self.llm = None
