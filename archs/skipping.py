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


# Attributes that hold a decoder-layer index: a layer's own cache slot, and (ECHO) the layer whose K/V
# a sharer reads. Both are renumbered when layers are skipped.
LAYER_INDEX_ATTRS = ("layer_idx", "kv_source_idx")


def skippable_layers(model: nn.Module) -> tuple[int, ...]:
    """The decoder layers that may be skipped. All of them unless the family's decoder stack narrows
    it with a `skippable_layers()` method (ECHO: a layer whose K/V another layer reads may not be)."""
    stack = decoder_stack(model)
    narrowed = getattr(stack, "skippable_layers", None)
    return tuple(range(len(stack.layers))) if narrowed is None else tuple(sorted(narrowed()))


@contextlib.contextmanager
def skip_layers(model: nn.Module, layers: Sequence[int]) -> Iterator[nn.Module]:
    """Run `model` with `layers` skipped (identity on the residual stream) inside the block.

    The kept layers are run as a shorter stack with their layer indices (`LAYER_INDEX_ATTRS`)
    renumbered, exactly as a model rebuilt without the skipped layers would run; the KV cache that `generate()` creates
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
    fixed = sorted(skip - set(skippable_layers(model)))
    if fixed:
        raise ValueError(f"layers {fixed} of this {type(stack).__name__} may not be skipped "
                         f"(skippable: {list(skippable_layers(model))})")
    kept = [i for i in range(n) if i not in skip]
    new_index = {old: new for new, old in enumerate(kept)}
    config = stack.config
    saved_config = {k: getattr(config, k) for k in ("num_hidden_layers", "layer_types") if hasattr(config, k)}
    renumbered: list[tuple[nn.Module, str, int]] = []
    try:
        for old_idx in kept:
            for module in original[old_idx].modules():
                for attr in LAYER_INDEX_ATTRS:
                    value = getattr(module, attr, None)
                    if isinstance(value, int) and not isinstance(value, bool):
                        if value not in new_index:
                            raise ValueError(f"layer {old_idx} reads layer {value} ({attr}), which is skipped")
                        renumbered.append((module, attr, value))
                        setattr(module, attr, new_index[value])
        stack.layers = nn.ModuleList([original[i] for i in kept])
        config.num_hidden_layers = len(kept)
        if "layer_types" in saved_config and saved_config["layer_types"] is not None:
            config.layer_types = [saved_config["layer_types"][i] for i in kept]
        yield model
    finally:
        stack.layers = original
        for key, value in saved_config.items():
            setattr(config, key, value)
        for module, attr, old_value in renumbered:
            setattr(module, attr, old_value)
