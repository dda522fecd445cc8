"""vLLM plugin (entry point `vllm.general_plugins`): registers the skip-aware architectures.

vLLM loads general plugins in every process it starts (engine core, workers), which is what a
spawned worker needs; registering in the parent process alone is not enough. Registration is by
"module:Class" string, so nothing heavy is imported until vLLM builds the model.

A checkpoint is served skip-aware by `hf_overrides={"architectures": [skip_architecture(arch)]}`.
"""

from __future__ import annotations

# The checkpoint's architecture (config.json "architectures") -> our skip-aware class.
SKIP_ARCHITECTURES = {
    "LlamaForCausalLM": "SkipLlamaForCausalLM",
    "Qwen2ForCausalLM": "SkipQwen2ForCausalLM",
    "Qwen3ForCausalLM": "SkipQwen3ForCausalLM",
    "MistralForCausalLM": "SkipMistralForCausalLM",
}
MODULE = "nested_reft.engines.vllm_models"


def skip_architecture(architectures) -> str:
    """The skip-aware class for a checkpoint's `architectures` list; a clear error otherwise."""
    names = [architectures] if isinstance(architectures, str) else list(architectures or [])
    for name in names:
        if name in SKIP_ARCHITECTURES:
            return SKIP_ARCHITECTURES[name]
        if name in SKIP_ARCHITECTURES.values():
            return name
    raise ValueError(
        f"no skip-aware vLLM model for architectures {names!r}; supported: {sorted(SKIP_ARCHITECTURES)}"
    )


def register() -> None:
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for ours in SKIP_ARCHITECTURES.values():
        if ours not in supported:
            ModelRegistry.register_model(ours, f"{MODULE}:{ours}")
