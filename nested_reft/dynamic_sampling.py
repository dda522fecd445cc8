"""Dynamic sampling (DAPO's `filter_groups`): keep only the groups whose rewards differ.

A GRPO group whose completions all earned the same reward has advantages of zero: it costs its
rollouts and its forward/backward passes and moves nothing (except through the KL term). DAPO
(Yu et al., 2025) drops such groups and samples more prompts until the batch is full. Here a
round's groups are scored and corrected as usual, one generate call at a time, and these helpers
pick the informative groups, draw the prompts of the next call and join the calls' outputs.
"""

from __future__ import annotations

import math
import random

import torch

# Outputs keyed like TRL's `_generate_and_score_completions`: left-padded prompt tensors, and
# (B, T) completion tensors padded on the right.
LEFT_PADDED = ("prompt_ids", "prompt_mask")


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(G,) bool: the groups of `group_size` consecutive rows whose finite rewards are not all equal
    (as TRL tells a zero-std group: `isclose`). A group with fewer than two finite rewards has none."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.detach().float().view(-1, group_size)
    finite = torch.isfinite(grouped)
    high = torch.where(finite, grouped, torch.full_like(grouped, -math.inf)).amax(dim=1)
    low = torch.where(finite, grouped, torch.full_like(grouped, math.inf)).amin(dim=1)
    enough = finite.sum(dim=1) >= 2
    return enough & ~torch.isclose(high, torch.where(enough, low, high))


def refill_size(missing: int, kept: int, generated: int, round_prompts: int) -> int:
    """Prompts to draw for the next call: enough to fill `missing` groups at the informative rate
    seen so far in this round (at least 1 / round_prompts), never more than a round's prompts."""
    rate = max(kept / max(generated, 1), 1 / round_prompts)
    return max(1, min(round_prompts, math.ceil(missing / rate)))


def refill_prompts(dataset_size: int, n: int, seed: int, round_index: int) -> list[int]:
    """Indices of `n` distinct training rows for a refill, a function of (seed, round) only, so a run
    resumed from a checkpoint draws the same ones."""
    rng = random.Random(f"{seed}:filter_groups:{round_index}")
    return rng.sample(range(dataset_size), min(n, dataset_size))


def select_groups(output: dict, groups: torch.Tensor, group_size: int) -> dict:
    """The rows of `output` that belong to `groups` (indices), in that order."""
    rows = (groups.view(-1, 1) * group_size + torch.arange(group_size, device=groups.device)).view(-1)
    n = next(v.size(0) for v in output.values() if torch.is_tensor(v) and v.dim() >= 1)
    out = {}
    for key, value in output.items():
        if torch.is_tensor(value) and value.dim() >= 1 and value.size(0) == n:
            out[key] = value[rows.to(value.device)]
        elif isinstance(value, list) and len(value) == n:
            out[key] = [value[i] for i in rows.tolist()]
        else:
            out[key] = value
    return out


def concat_outputs(parts: list[dict], pad_token_id: int) -> dict:
    """Join round outputs row-wise: prompt tensors padded on the left, (B, T) completion tensors on
    the right (ids with `pad_token_id`, everything else with 0: masked out), and
    `num_items_in_batch` recounted over the joined loss mask, as TRL counts it."""
    out = {}
    for key, first in parts[0].items():
        values = [p[key] for p in parts]
        if key == "num_items_in_batch":
            continue
        if torch.is_tensor(first) and first.dim() == 2:
            width = max(v.size(1) for v in values)
            fill = pad_token_id if key in ("prompt_ids", "completion_ids") else 0
            left = key in LEFT_PADDED
            padded = [torch.nn.functional.pad(v, (width - v.size(1), 0) if left else (0, width - v.size(1)), value=fill)
                      for v in values]
            out[key] = torch.cat(padded)
        elif torch.is_tensor(first) and first.dim() == 1:
            out[key] = torch.cat(values)
        elif isinstance(first, list):
            out[key] = [x for v in values for x in v]
        else:
            out[key] = first
    if "num_items_in_batch" in parts[0]:
        mask = out["completion_mask"] if "tool_mask" not in out else out["completion_mask"] * out["tool_mask"]
        out["num_items_in_batch"] = mask.sum()
    return out
