"""Rollout engines behind one interface: `hf` (in-process, shared weights), `vllm`
(`vllm_engine.VLLMEngine`, colocated) and `vllm_server` (`vllm_server.VLLMServerEngine`, remote).
The vLLM modules are imported only when used."""

from .base import RolloutEngine, RolloutEngineUnavailable, Rollouts, SamplingSpec
from .hf import HFEngine, completion_logprobs

__all__ = ["HFEngine", "RolloutEngine", "RolloutEngineUnavailable", "Rollouts", "SamplingSpec", "completion_logprobs"]
