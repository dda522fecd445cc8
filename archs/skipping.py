"""Running a decoder-only model with some of its layers skipped, in place.

A skipped decoder layer is the identity on the residual stream. `skip_layers` runs any Hugging
Face decoder-only model whose layers live in `model.model.layers` (Llama, Qwen2, Qwen3, Mistral
and their relatives) as the same model with those layers removed: no weight is copied, and the
model is restored exactly on exit. Used by Nested-ReFT's behavior models and by LayerDrop
training of the embedded tiny model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from torch import nn


def decoder_stack(model: nn.Module) -> nn.Module:
    """The module that owns the decoder `layers` ModuleList (e.g. `Qwen2Model`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    inner = getattr(base, "model", None)
    if inner is not None and isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return inner
    raise TypeError(
        f"layer skipping needs a decoder-only model with its layers in `model.model.layers` "
        f"(Llama, Qwen2, Qwen3, Mistral, ...); got {type(base).__name__}"
    )


def num_decoder_layers(model: nn.Module) -> int:
    return len(decoder_stack(model).layers)


@contextlib.contextmanager
def skip_layers(model: nn.Module, layers: Sequence[int]) -> Iterator[nn.Module]:
    """Run `model` with `layers` skipped (identity on the residual stream) inside the block.

    The kept layers are run as a shorter stack with their cache indices renumbered, exactly as a
    model rebuilt without the skipped layers would run; the KV cache that `generate()` creates
    then has one entry per kept layer. A cache must not be carried across different skip sets.
    Everything is restored on exit, also on exceptions.
    """
    stack = decoder_stack(model)
    original = stack.layers
    n = len(original)
    skip = set(layers)
    bad = [i for i in skip if not isinstance(i, int) or not 0 <= i < n]
    if bad:
        raise ValueError(f"layer indices {sorted(bad)} are out of range for a model with {n} layers")
    if len(skip) >= n:
        raise ValueError(f"cannot skip all {n} layers")
    if not skip:
        yield model
        return
    kept = [i for i in range(n) if i not in skip]
    config = stack.config
    saved_config = {k: getattr(config, k) for k in ("num_hidden_layers", "layer_types") if hasattr(config, k)}
    renumbered: list[tuple[nn.Module, int]] = []
    try:
        for new_idx, old_idx in enumerate(kept):
            for module in original[old_idx].modules():
                if getattr(module, "layer_idx", None) == old_idx:
                    renumbered.append((module, old_idx))
                    module.layer_idx = new_idx
        stack.layers = nn.ModuleList([original[i] for i in kept])
        config.num_hidden_layers = len(kept)
        if "layer_types" in saved_config and saved_config["layer_types"] is not None:
            config.layer_types = [saved_config["layer_types"][i] for i in kept]
        yield model
    finally:
        stack.layers = original
        for key, value in saved_config.items():
            setattr(config, key, value)
        for module, old_idx in renumbered:
            module.layer_idx = old_idx
