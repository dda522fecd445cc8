"""Skip-aware vLLM causal LMs: Llama, Qwen2, Qwen3 and Mistral with a run-time set of skipped layers,
in two forms.

**Compact** (`Compact*ForCausalLM`, compiled): the model has only the L − k kept decoder layers
(`num_hidden_layers` = L − k in its config) and is compiled like any stock model: its forward has no
skip test at all. Slot j holds the j-th kept layer; `load_weights` renames `model.layers.<i>.` to
`model.layers.<slot of i>.` and drops the tensors of layers that are not kept, so the checkpoint,
the trainer's weight syncs and a change of the skip set all go through vLLM's own weight loading
(in place: `reload_weights` copies into the tensors the compiled graph holds). A new skip set of
the same size is new weights in some slots, nothing else. In server mode (`nested_reft_host_copy` in
the config) the model also keeps every tensor it is given, of every layer, on the host: the
server's workers then move a layer into a slot from their own copy (the trainer sends only the
list of kept layers), and the copy stays current through every weight path, vLLM's NCCL / IPC
weight-transfer engines included, because they all end in this class's `load_weights`.

**Run-time skip** (`Skip*ForCausalLM`, eager):

Each class subclasses vLLM's own model and changes one thing: every decoder layer's `forward`
first asks whether its index is in `self.nested_reft_skip`; a skipped layer returns its inputs
unchanged. vLLM's decoder layers carry the residual stream as the pair `(hidden_states,
residual)` whose sum is the stream (the next layer's fused add-RMSNorm forms it), so returning the
pair unchanged is the identity on the residual stream, the same as removing the layer. Weights,
parameter names and checkpoint loading are those of the parent class: the user's checkpoint loads
unchanged. A skipped layer's KV-cache slots are neither written nor read.

The skip set is a Python attribute read at every forward, so the model must run eagerly
(`enforce_eager=True`): a compiled or CUDA-graph-captured forward would freeze one skip set.
Imported only inside vLLM processes (the plugin registers these classes lazily, by name).
"""

from __future__ import annotations

import re

from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM


class _SkipAware:
    """Mixin (first base, before vLLM's class): wraps each decoder layer's forward with a skip test
    (no parameter is touched)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._install_skip()

    def _install_skip(self) -> None:
        self.nested_reft_skip: frozenset[int] = frozenset()
        stack = self.model
        for idx in range(stack.start_layer, stack.end_layer):  # this pipeline stage's layers
            layer = stack.layers[idx]
            layer.forward = self._skippable(idx, layer.forward)

    def _skippable(self, idx: int, forward):
        def run(positions, hidden_states, residual, *args, **kwargs):
            if idx in self.nested_reft_skip:
                return hidden_states, residual
            return forward(positions, hidden_states, residual, *args, **kwargs)

        return run

    @property
    def num_decoder_layers(self) -> int:
        return len(self.model.layers)

    def set_skip(self, layers) -> None:
        n = self.num_decoder_layers
        skip = frozenset(int(i) for i in layers)
        bad = sorted(i for i in skip if not 0 <= i < n)
        if bad:
            raise ValueError(f"layer indices {bad} are out of range for a model with {n} layers")
        if len(skip) >= n:
            raise ValueError(f"cannot skip all {n} layers")
        self.nested_reft_skip = skip


class SkipLlamaForCausalLM(_SkipAware, LlamaForCausalLM):
    pass


class SkipQwen2ForCausalLM(_SkipAware, Qwen2ForCausalLM):
    pass


class SkipQwen3ForCausalLM(_SkipAware, Qwen3ForCausalLM):
    pass


class SkipMistralForCausalLM(_SkipAware, MistralForCausalLM):
    pass


# ---------------------------------------------------------------------- compact (compiled) models

LAYER_NAME = re.compile(r"^(model\.layers\.)(\d+)(\..+)$")


class _Compact:
    """Mixin: the model holds `len(nested_reft_kept)` decoder layers; slot j is layer kept[j] of the
    checkpoint's `nested_reft_num_layers`. Both come from the config (hf_overrides at start)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._install_slots(vllm_config.model_config.hf_config)
        self._host_dtype = vllm_config.model_config.dtype

    def _install_slots(self, config) -> None:
        self.nested_reft_full_layers = int(config.nested_reft_num_layers)
        self.nested_reft_kept: tuple[int, ...] = ()
        self.set_kept(config.nested_reft_kept)
        # checkpoint name -> tensor, every layer (server mode; the colocated engine keeps its own copy)
        self.nested_reft_host: dict | None = {} if getattr(config, "nested_reft_host_copy", False) else None

    @property
    def num_decoder_layers(self) -> int:
        return self.nested_reft_full_layers

    @property
    def nested_reft_skip(self) -> frozenset[int]:
        return frozenset(range(self.nested_reft_full_layers)) - set(self.nested_reft_kept)

    def set_kept(self, kept) -> list[int]:
        """Assign layers to slots (sorted); returns the layers that moved into a slot (their weights
        must be loaded next). The caller loads them before the next forward."""
        kept = tuple(sorted(int(i) for i in kept))
        slots, n = len(self.model.layers), self.nested_reft_full_layers
        if len(kept) != slots or len(set(kept)) != slots or not all(0 <= i < n for i in kept):
            raise ValueError(f"this compact engine holds {slots} of {n} layers; got kept layers {list(kept)}")
        old = self.nested_reft_kept
        self.nested_reft_kept = kept
        return [layer for j, layer in enumerate(kept) if j >= len(old) or old[j] != layer]

    def load_weights(self, weights):
        slot_of = {layer: slot for slot, layer in enumerate(self.nested_reft_kept)}

        def to_slots():
            for name, tensor in weights:
                if self.nested_reft_host is not None:
                    self._keep_on_host(name, tensor)
                match = LAYER_NAME.match(name)
                if match is None:
                    yield name, tensor
                elif int(match.group(2)) in slot_of:  # a skipped layer's tensors have no slot
                    yield f"{match.group(1)}{slot_of[int(match.group(2))]}{match.group(3)}", tensor

        return super().load_weights(to_slots())

    def _keep_on_host(self, name: str, tensor) -> None:
        """Copy (NCCL hands out views of a reused buffer) in the model's dtype: what this model would
        hold after loading it, at the model's size rather than the trainer's float32."""
        if self.nested_reft_host.get(name) is tensor:  # a layer moving into a slot from this copy
            return
        dtype = self._host_dtype if tensor.is_floating_point() else tensor.dtype
        self.nested_reft_host[name] = tensor.detach().to(device="cpu", dtype=dtype, copy=True)


class CompactLlamaForCausalLM(_Compact, LlamaForCausalLM):
    pass


class CompactQwen2ForCausalLM(_Compact, Qwen2ForCausalLM):
    pass


class CompactQwen3ForCausalLM(_Compact, Qwen3ForCausalLM):
    pass


class CompactMistralForCausalLM(_Compact, MistralForCausalLM):
    pass
