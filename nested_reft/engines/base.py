"""The rollout-engine interface: the behavior model that samples completions for GRPO."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

# Seeds of one run: request i of turn `turn` of generation round `round` on rank `rank` gets
# offset + ((round * MAX_TURNS + turn) * MAX_RANKS + rank) * MAX_REQUESTS + i (mod 2^63). The
# mixed-radix index is unique per (round, turn, rank, request) and adding an offset mod 2^63 is
# a bijection, so no two requests of a run share a seed (vLLM's seeded sampling would otherwise
# return duplicate completions when a GRPO group spans ranks).
MAX_REQUESTS = 1 << 20
MAX_RANKS = 1 << 12
MAX_TURNS = 1 << 6
SEED_MODULUS = 1 << 63


def round_seed(run_seed: int, round_index: int, rank: int = 0, turn: int = 0) -> int:
    """Base seed of one generate() call; the engine seeds request i with `base + i`."""
    if not 0 <= rank < MAX_RANKS:
        raise ValueError(f"rank must be in [0, {MAX_RANKS}), got {rank!r}")
    if not 0 <= turn < MAX_TURNS:
        raise ValueError(f"a generation round supports at most {MAX_TURNS} turns, got turn {turn!r}")
    if round_index < 0:
        raise ValueError(f"round_index must be >= 0, got {round_index!r}")
    offset = (int(run_seed) * 0x9E3779B97F4A7C15) % SEED_MODULUS  # spreads run seeds apart
    index = ((round_index * MAX_TURNS + turn) * MAX_RANKS + rank) * MAX_REQUESTS
    return (offset + index) % SEED_MODULUS


def request_seeds(base: int, n: int) -> list[int]:
    """Seeds of the n requests of one generate() call."""
    if n > MAX_REQUESTS:
        raise ValueError(f"one generate() call takes at most {MAX_REQUESTS} prompts with distinct seeds, got {n}")
    return [(base + i) % SEED_MODULUS for i in range(n)]


class RolloutEngineUnavailable(ConnectionError):
    """The engine's server cannot be reached (after its retries); `url` names it.

    `every_rank`: every trainer rank raised this at the same call (a coordinated skip-set change or
    weight sync, or a single-process run), so all of them can save a checkpoint together; the
    trainer does, and stops with this message."""

    def __init__(self, message: str, url: str, every_rank: bool = False):
        super().__init__(message)
        self.url, self.every_rank = url, every_rank

    def __reduce__(self):  # picklable with its extra fields
        return type(self), (str(self), self.url, self.every_rank)


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample. Engines apply exactly these processors, in vLLM's order: repetition
    penalty on the logits, then temperature, min-p, top-k, top-p; and report as `logprobs` the
    log-probabilities of that processed distribution (truncated and renormalised when top-k /
    top-p / min-p is on): the distribution that actually sampled. A checkpoint's own
    `generation_config` never adds a processor (see docs/nested_reft.md)."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off
    seed: int | None = None  # request i is seeded with seed + i (see `round_seed`)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be >= 0, or -1 / 0 for off, got {self.top_k!r}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p!r}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 is off), got {self.repetition_penalty!r}")
        if self.top_k == -1:  # vLLM's spelling of "off"; one spelling inside the engines
            object.__setattr__(self, "top_k", 0)

    @property
    def truncates(self) -> bool:
        """True when the sampled distribution is a truncated, renormalised one."""
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0

    @property
    def only_temperature(self) -> bool:
        """True when the sampler is softmax(logits / temperature) and nothing else."""
        return not self.truncates and self.repetition_penalty == 1.0


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
    # True: the engine frees its GPU memory between rounds (`sleep`) and the trainer wakes it
    # before each round's weight sync (vLLM's sleep mode, as TRL uses it).
    sleep_enabled: bool = False

    def sleep(self, level: int = 1) -> None:
        """Release GPU memory until `wake_up` (only engines with `sleep_enabled`)."""
        raise NotImplementedError(f"{type(self).__name__} has no sleep mode")

    def wake_up(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no sleep mode")

    def set_skip(self, layers: Sequence[int]) -> None:
        """Layers to skip in the following `generate` calls (identity on the residual stream)."""
        self.skip = tuple(sorted(set(layers)))

    @abstractmethod
    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingSpec, *,
                 ignore_eos: bool = False) -> Rollouts:
        """One completion per prompt (repeat a prompt for a group). `ignore_eos`: sample exactly
        `max_new_tokens` per prompt (fixed-length workloads for throughput measurements)."""

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
