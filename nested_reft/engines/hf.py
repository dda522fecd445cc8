"""In-process Hugging Face rollout engine that shares the policy's weights (nothing to sync)."""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
from torch import nn

from ..skipping import num_decoder_layers, skip_layers
from .base import RolloutEngine, Rollouts, SamplingSpec


def _left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def completion_logprobs(model: nn.Module, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                        temperature: float, pad_id: int, batch_size: int = 32) -> list[list[float]]:
    """log softmax(logits / temperature) of each completion token, teacher-forced, in batches."""
    out: list[list[float]] = []
    device = next(model.parameters()).device
    for start in range(0, len(prompt_ids), batch_size):
        prompts, comps = prompt_ids[start:start + batch_size], completion_ids[start:start + batch_size]
        p_ids, p_mask = _left_pad(prompts, pad_id, device)
        width = max(1, max(len(c) for c in comps))
        c_ids = torch.full((len(comps), width), pad_id, dtype=torch.long, device=device)
        c_mask = torch.zeros_like(c_ids)
        for i, c in enumerate(comps):
            c_ids[i, : len(c)] = torch.tensor(c, device=device)
            c_mask[i, : len(c)] = 1
        ids = torch.cat([p_ids, c_ids], 1)
        mask = torch.cat([p_mask, c_mask], 1)
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=width + 1).logits[:, :-1]
        logps = torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, c_ids.unsqueeze(-1)).squeeze(-1)
        out += [logps[i, : len(c)].tolist() for i, c in enumerate(comps)]
    return out


class HFEngine(RolloutEngine):
    """Samples with `model.generate()` inside `skip_layers`; the model object is the policy itself.

    Behavior log-probs are computed by a teacher-forced pass of the same skipped model over the
    sampled tokens, at the sampling temperature and before top-k / top-p truncation.
    """

    shares_policy_weights = True

    def __init__(self, model: nn.Module, tokenizer, *, eos_token_ids: Iterable[int] | None = None,
                 batch_size: int = 64, score_logprobs: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = list(eos_token_ids) if eos_token_ids is not None else [tokenizer.eos_token_id]
        self.batch_size = batch_size
        # The trainer turns this off and scores samples with its own forward (the one it uses
        # for π_old), so that with nothing skipped the two agree exactly.
        self.score_logprobs = score_logprobs
        self.num_layers = num_decoder_layers(model)

    def set_skip(self, layers) -> None:
        bad = [i for i in layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"layer indices {bad} are out of range for a model with {self.num_layers} layers")
        super().set_skip(layers)

    def _generate_batch(self, prompts: list[list[int]], sampling: SamplingSpec, ignore_eos: bool = False) -> list[list[int]]:
        device = next(self.model.parameters()).device
        ids, mask = _left_pad(prompts, self.pad_id, device)
        out = self.model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, temperature=sampling.temperature,
            top_k=sampling.top_k, top_p=sampling.top_p, max_new_tokens=sampling.max_new_tokens,
            min_new_tokens=sampling.max_new_tokens if ignore_eos else None,
            eos_token_id=self.eos_ids, pad_token_id=self.pad_id,
        )
        completions = []
        for row in out[:, ids.shape[1]:].tolist():
            for t, tok in enumerate(row):
                if tok in self.eos_ids:  # keep the EOS token (it is part of what was sampled)
                    row = row[: t + 1]
                    break
            completions.append(row)
        return completions

    @torch.no_grad()
    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingSpec, *, ignore_eos: bool = False) -> Rollouts:
        """`ignore_eos`: sample exactly max_new_tokens per prompt (EOS suppressed; for throughput)."""
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        was_training = self.model.training
        self.model.eval()
        try:
            with skip_layers(self.model, self.skip):
                start = time.perf_counter()
                completions: list[list[int]] = []
                for i in range(0, len(prompt_token_ids), self.batch_size):
                    completions += self._generate_batch(prompt_token_ids[i:i + self.batch_size], sampling, ignore_eos)
                gen_s = time.perf_counter() - start
                start = time.perf_counter()
                logprobs = None
                if self.score_logprobs:
                    logprobs = completion_logprobs(self.model, prompt_token_ids, completions,
                                                   sampling.temperature, self.pad_id, self.batch_size)
                lp_s = time.perf_counter() - start
        finally:
            self.model.train(was_training)
        return Rollouts(completions, logprobs, self.skip, gen_s, lp_s)

    def load_weights(self, named_tensors) -> None:
        """Nothing to do: the engine samples from the policy's own parameters."""
