"""Walking a cache object's tensors: what its memory is (benchmarks) and whether it owns it (tests)."""

from __future__ import annotations

import torch


def cache_tensors(cache) -> list[torch.Tensor]:
    """Every tensor reachable from a cache object through lists, tuples, dicts and attributes
    (modules and classes excluded: a cache may point back at its model)."""
    tensors, stack = [], [cache]
    while stack:
        obj = stack.pop()
        if torch.is_tensor(obj):
            tensors.append(obj)
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
            stack.extend(vars(obj).values())
    return tensors


def cache_bytes(cache) -> int:
    """Bytes of the storage behind a cache's tensors, each storage counted once."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in cache_tensors(cache) if t.numel()}
    return sum(storages.values())
