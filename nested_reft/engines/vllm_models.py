"""Skip-aware vLLM causal LMs: Llama, Qwen2, Qwen3 and Mistral with a run-time set of skipped layers.

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

from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM


class _SkipAware:
    """Mixin: wraps each decoder layer's forward with a skip test (no parameter is touched)."""

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
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._install_skip()


class SkipQwen2ForCausalLM(_SkipAware, Qwen2ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._install_skip()


class SkipQwen3ForCausalLM(_SkipAware, Qwen3ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._install_skip()


class SkipMistralForCausalLM(_SkipAware, MistralForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._install_skip()
