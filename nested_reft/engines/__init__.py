"""Rollout engines behind one interface: `hf` (in-process, shared weights)."""

from .base import RolloutEngine, Rollouts, SamplingSpec
from .hf import HFEngine, completion_logprobs

__all__ = ["HFEngine", "RolloutEngine", "Rollouts", "SamplingSpec", "completion_logprobs"]
