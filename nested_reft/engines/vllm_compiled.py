"""`CompiledVLLMEngine`: layer-skipped rollouts through a compiled vLLM model that holds only the
kept layers.

A compiled (or CUDA-graph-captured) forward freezes whatever Python decides while it is traced, so
a run-time skip test cannot live inside it (vLLM drops the compile guards and never recompiles).
Here the skip set is not in the forward at all: the engine serves a *compact* model with
`L − k` decoder layers (`vllm_models.Compact*`), compiled like any stock model, and a round's
skip set S (|S| = k) is chosen by loading the kept layers' weights into its `L − k` slots, in
order, through vLLM's in-place weight loading (the path every weight sync takes). A new skip set
moves only the layers whose slot changed; after an optimizer step an instance receives only the
changed tensors it holds (the kept layers, embeddings, final norm, head), with the moved layers,
in one transfer when the round starts.

One vLLM instance per distinct k, started when a skip set of that size is first asked for
(k = 0, the full model, serves evaluation and the full-model tokens/s probe). An instance that
was idle while the policy changed receives all its tensors when it is next used. The engine keeps
the current checkpoint-format weights of *all* layers on the CPU (one copy of the checkpoint in
host memory: 3 GB for a 1.5B model in bf16), because a layer that moves into a slot must come
from somewhere and the trainer sends only what its optimizer changed.

Slots must be interchangeable: a checkpoint whose layers differ (`layer_types` with more than one
kind, sliding-window layers by index) is rejected with the layer that differs; the eager engine
(`VLLMEngine`, `vllm_compile=False`) serves those.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence

import torch

from .base import RolloutEngine, Rollouts, SamplingSpec
from .vllm_plugin import check_vllm_version, compact_architecture

logger = logging.getLogger(__name__)

_LAYER_PREFIX = "model.layers."


def layer_of(name: str) -> int | None:
    """The decoder layer a checkpoint tensor belongs to (None: embeddings, final norm, head)."""
    if not name.startswith(_LAYER_PREFIX):
        return None
    index = name[len(_LAYER_PREFIX):].split(".", 1)[0]
    return int(index) if index.isdigit() else None


def compact_overrides(config, kept: Sequence[int]) -> dict:
    """The config changes that make vLLM build the compact model holding `kept`; one clear error
    when the checkpoint's layers are not interchangeable slot by slot."""
    arch = (list(getattr(config, "architectures", None) or []) or [type(config).__name__])[0]
    types = list(getattr(config, "layer_types", None) or [])
    if len(set(types)) > 1:
        first = next(i for i, t in enumerate(types) if t != types[0])
        raise ValueError(f"{arch}: layer {first} is {types[first]!r} but layer 0 is {types[0]!r}; the compiled "
                         "engine needs interchangeable layers (any layer may sit in any slot). Use the eager "
                         "engine (vllm_compile=False) for this model.")
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        raise ValueError(f"{arch}: use_sliding_window=True makes layers from max_window_layers="
                         f"{getattr(config, 'max_window_layers', None)} on differ from the others; the compiled engine "
                         "needs interchangeable layers. Use the eager engine (vllm_compile=False) for this model.")
    overrides = {"num_hidden_layers": len(kept), "nested_reft_num_layers": int(config.num_hidden_layers),
                 "nested_reft_kept": [int(i) for i in kept]}
    if types:
        overrides["layer_types"] = [types[0]] * len(kept)
    if getattr(config, "max_window_layers", None) is not None:
        overrides["max_window_layers"] = len(kept)
    return overrides


def checkpoint_tensors(model_path: str, revision: str | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint (local folder or Hub id), on the CPU."""
    from safetensors import safe_open

    folder = model_path
    if not os.path.isdir(folder):
        from huggingface_hub import snapshot_download

        folder = snapshot_download(model_path, revision=revision, allow_patterns=["*.safetensors", "*.json"])
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"{model_path!r} has no .safetensors files; the compiled vLLM engine reads the checkpoint's "
                         "layers from them (save the model with save_pretrained(safe_serialization=True))")
    tensors = {}
    for name in files:
        with safe_open(os.path.join(folder, name), framework="pt", device="cpu") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


class CompiledVLLMEngine(RolloutEngine):
    """Compiled vLLM instances of the compact model, one per skip-set size k, started on demand.

    `engine_kwargs` go to each instance (`VLLMEngine`: dtype, gpu_memory_utilization,
    max_model_len, cpu_kvcache_gib, multiprocessing, ...); each instance takes that share of the
    GPU, so the trainer's `vllm_gpu_memory_utilization` is split between the sizes it uses.
    `enforce_eager=True` runs the same compact model uncompiled (benchmarks)."""

    def __init__(self, model_path: str, *, revision: str | None = None, enforce_eager: bool = False,
                 eos_token_ids: Iterable[int] | None = None, score_logprobs: bool = True, **engine_kwargs):
        check_vllm_version()
        from transformers import AutoConfig

        self.config = AutoConfig.from_pretrained(model_path, revision=revision)
        self.architecture = compact_architecture(self.config.architectures)
        self.num_layers = int(self.config.num_hidden_layers)
        compact_overrides(self.config, range(self.num_layers))  # reject non-interchangeable layers now
        self.model_path, self.revision, self.enforce_eager = model_path, revision, enforce_eager
        self.eos_ids = list(eos_token_ids) if eos_token_ids is not None else None
        self.score_logprobs = score_logprobs
        self.engine_kwargs = engine_kwargs
        self.weights = checkpoint_tensors(model_path, revision)
        self.weights_version = 0  # bumped by every load_weights; 0 is the checkpoint on disk
        self.changed_at: dict[str, int] = {}  # tensor name -> the version that last changed it
        self.instances: dict = {}  # k -> VLLMEngine
        self.kept: dict[int, tuple[int, ...]] = {}  # k -> the layers in its slots, in order
        self.versions: dict[int, int] = {}  # k -> weights_version it holds
        self.skip: tuple[int, ...] = ()
        self.sleeping = False
        self.last_sync_seconds = 0.0  # the last load_weights: into the host copy
        self.last_load_seconds = 0.0  # the last set_skip's transfer into its instance (moved layers, changed tensors)
        self.loaded_tensors = 0  # tensors transferred into instances, in all
        self.start_seconds: dict[int, float] = {}

    @property
    def sleep_enabled(self) -> bool:
        return bool(self.engine_kwargs.get("enable_sleep_mode", False))

    # ------------------------------------------------------------------ instances

    def _instance(self, skip: tuple[int, ...]):
        """The instance for k = len(skip), started with `skip`'s kept layers if there is none yet."""
        k = len(skip)
        if k not in self.instances:
            from .vllm_engine import VLLMEngine

            kept = tuple(i for i in range(self.num_layers) if i not in skip)
            start = time.perf_counter()
            self.instances[k] = VLLMEngine(
                self.model_path, revision=self.revision, architecture=self.architecture,
                hf_overrides=compact_overrides(self.config, kept), enforce_eager=self.enforce_eager,
                eos_token_ids=self.eos_ids, **self.engine_kwargs)
            self.kept[k], self.versions[k] = kept, 0
            self.start_seconds[k] = time.perf_counter() - start
            logger.info("compiled vLLM instance for k=%d (%d of %d layers) up in %.1f s%s", k, len(kept),
                        self.num_layers, self.start_seconds[k], " (eager)" if self.enforce_eager else "")
        return self.instances[k]

    # ------------------------------------------------------------------ skip set and weights

    def set_skip(self, layers: Sequence[int]) -> None:
        skip = tuple(sorted(set(int(i) for i in layers)))
        bad = [i for i in skip if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"layer indices {bad} are out of range for a model with {self.num_layers} layers")
        if len(skip) >= self.num_layers:
            raise ValueError(f"cannot skip all {self.num_layers} layers")
        self._instance(skip)
        self.skip = skip
        self.last_load_seconds = 0.0
        self._bring_up_to_date()

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Record the policy's new tensors (Hugging Face names) in the host copy. Each instance
        receives the ones it holds when it is next used (`set_skip`, `generate`), together with the
        layers that moved into its slots: one transfer per round."""
        start = time.perf_counter()
        self.weights_version += 1
        for name, tensor in named_tensors:
            current = self.weights.get(name)
            if current is not None and current.shape == tensor.shape and current.dtype == tensor.dtype:
                current.copy_(tensor.detach())
            else:  # new, or in another dtype than the checkpoint's (a bf16 file, float32 training): keep the trainer's
                self.weights[name] = tensor.detach().to("cpu", copy=True)
            self.changed_at[name] = self.weights_version
        self.last_sync_seconds = time.perf_counter() - start

    def _bring_up_to_date(self) -> None:
        """Load into the active instance the layers that moved into its slots and every tensor it
        holds that changed since it last received weights."""
        k = len(self.skip)
        instance = self.instances[k]
        if instance.sleeping:
            instance.wake_up()
        kept = tuple(i for i in range(self.num_layers) if i not in self.skip)
        since = self.versions[k]
        if kept == self.kept[k] and since == self.weights_version:
            return  # up to date: nothing moved, nothing changed since its last load
        moved = {layer for j, layer in enumerate(kept) if self.kept[k][j] != layer}
        send = [(n, t) for n, t in self.weights.items()
                if layer_of(n) in moved or ((layer_of(n) is None or layer_of(n) in kept) and self.changed_at.get(n, 0) > since)]
        if send:
            start = time.perf_counter()
            instance.send_weights("nested_reft_set_kept", send, list(kept))
            self.last_load_seconds = time.perf_counter() - start
            self.loaded_tensors += len(send)
        self.kept[k], self.versions[k] = kept, self.weights_version

    # ------------------------------------------------------------------ sampling

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingSpec, *, ignore_eos: bool = False) -> Rollouts:
        self._instance(self.skip)
        self._bring_up_to_date()
        instance = self.instances[len(self.skip)]
        instance.score_logprobs = self.score_logprobs
        rollouts = instance.generate(prompt_token_ids, sampling, ignore_eos=ignore_eos)
        return Rollouts(rollouts.completion_ids, rollouts.logprobs, self.skip, rollouts.generate_seconds,
                        rollouts.logprob_seconds)

    # ------------------------------------------------------------------ memory

    def sleep(self, level: int = 1) -> None:
        """Every instance sleeps (GPU only); `wake_up` and `set_skip` wake only the one in use."""
        for instance in self.instances.values():
            if not instance.sleeping:
                instance.sleep(level=level)
        self.sleeping = True

    def wake_up(self) -> None:
        instance = self.instances.get(len(self.skip))
        if instance is not None:
            instance.wake_up()
        self.sleeping = False

    def close(self) -> None:
        for instance in self.instances.values():
            instance.close()
        self.instances.clear()
