"""The rollout-engine interface: the behavior model that samples completions for GRPO."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample. `logprobs` are always of the tempered, untruncated distribution:
    log softmax(logits / temperature), before top-k / top-p (see docs/nested_reft.md)."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")


@dataclass
class Rollouts:
    """Completions of one generation round. `logprobs[i][t]` is log μ(completion_ids[i][t]);
    None when the engine was asked not to score its samples (the trainer then does)."""

    completion_ids: list[list[int]]
    logprobs: list[list[float]] | None
    skip: tuple[int, ...] = ()
    generate_seconds: float = 0.0  # sampling only
    logprob_seconds: float = 0.0  # scoring the samples under the behavior model, if separate

    @property
    def num_tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.generate_seconds if self.generate_seconds > 0 else 0.0


class RolloutEngine(ABC):
    """Samples completions from the behavior model: the policy with a set of layers skipped."""

    skip: tuple[int, ...] = ()
    # False: the engine holds its own copy of the weights, which the trainer syncs after each
    # optimizer step through `load_weights`.
    shares_policy_weights: bool = False

    def set_skip(self, layers: Sequence[int]) -> None:
        """Layers to skip in the following `generate` calls (identity on the residual stream)."""
        self.skip = tuple(sorted(set(layers)))

    @abstractmethod
    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingSpec) -> Rollouts:
        """One completion per prompt (repeat a prompt for a group)."""

    @abstractmethod
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Bring the engine's copy of the policy up to date (a no-op where weights are shared)."""

    def close(self) -> None:
        """Release the engine's resources (nothing to release by default)."""
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
