"""A generation round's remaining training batches in a checkpoint, stored without pickle.

A checkpoint taken inside a round keeps the round's batches so a resumed run trains on them as an
uninterrupted one does. They are saved as one safetensors file (the tensors) and one JSON file
(everything else: counts, None), because `torch.load(weights_only=False)` would run code from a
crafted checkpoint on resume.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

TENSORS_FILE = "nested_reft_round.safetensors"
META_FILE = "nested_reft_round.json"
LEGACY_PICKLE_FILE = "nested_reft_round.pt"  # what older checkpoints hold; never loaded


class UnsupportedBatchValue(TypeError):
    """A batch value that is neither a tensor nor plain JSON data."""


def _json_value(key: str, value):
    try:
        json.dumps(value)
    except TypeError:
        raise UnsupportedBatchValue(f"batch field {key!r} holds a {type(value).__name__}, which a checkpoint "
                                    "stores only as a tensor or JSON data") from None
    return value


def save_round_buffer(folder: str, step: int, batches: list[dict]) -> None:
    """Write the batches to `folder` (tmp files, then renamed: never half a buffer)."""
    tensors, meta = {}, {"step": int(step), "batches": []}
    for i, batch in enumerate(batches):
        fields = {}
        for key, value in batch.items():
            if torch.is_tensor(value):
                tensors[f"{i}/{key}"] = value.detach().to("cpu").contiguous().clone()
                fields[key] = {"tensor": f"{i}/{key}"}
            else:
                fields[key] = {"value": _json_value(key, value)}
        meta["batches"].append(fields)
    paths = [os.path.join(folder, name) for name in (TENSORS_FILE, META_FILE)]
    save_file(tensors, paths[0] + ".tmp")
    with open(paths[1] + ".tmp", "w") as f:
        json.dump(meta, f)
    for path in paths:
        os.replace(path + ".tmp", path)


def has_round_buffer(folder: str) -> bool:
    return os.path.exists(os.path.join(folder, META_FILE))


def load_round_buffer(folder: str, device) -> tuple[int, list[dict]]:
    """(micro-step, batches) from `folder`; tensors on `device`. Loads no code."""
    with open(os.path.join(folder, META_FILE)) as f:
        meta = json.load(f)
    tensors = load_file(os.path.join(folder, TENSORS_FILE))
    batches = []
    for fields in meta["batches"]:
        batches.append({key: tensors[spec["tensor"]].to(device) if "tensor" in spec else spec["value"]
                        for key, spec in fields.items()})
    return int(meta["step"]), batches
