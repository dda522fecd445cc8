"""In-process Hugging Face rollout engine that shares the policy's weights (nothing to sync).

μ comes from the sampler itself: the last logits processor records the log-softmax of the
processed scores that `generate()` samples from, and the next step gathers the token that was
drawn. The processors are ours, built from `SamplingSpec` alone; the checkpoint's own
`generation_config` (Qwen2.5-Instruct ships `repetition_penalty` 1.05, others `top_k` 20, ...)
is swapped for a neutral one during sampling, so it cannot change the sampler behind μ's back.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable

import torch
from torch import nn
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ..skipping import num_decoder_layers, skip_layers
from .base import RolloutEngine, Rollouts, SamplingSpec

logger = logging.getLogger(__name__)

LOGPROB_SOURCES = ("sampler", "rescore")

# generation_config fields that change the distribution sampled from (or which tokens may be
# drawn); a checkpoint setting any of them is reported once, then neutralised.
SAMPLER_FIELDS = {
    "temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": None, "typical_p": 1.0, "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0, "top_h": None, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_repetition_penalty": 1.0, "bad_words_ids": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "sequence_bias": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "exponential_decay_length_penalty": None, "guidance_scale": None,
    "renormalize_logits": False, "remove_invalid_values": False, "watermarking_config": None,
    "min_length": 0, "min_new_tokens": None,
}


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


def sampling_processors(sampling: SamplingSpec) -> list[LogitsProcessor]:
    """The processors of `sampling`, in vLLM's order (penalty, temperature, min-p, top-k, top-p)."""
    procs: list[LogitsProcessor] = []
    if sampling.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
    if sampling.temperature != 1.0:
        procs.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.min_p > 0:
        procs.append(MinPLogitsWarper(sampling.min_p))
    if sampling.top_k > 0:
        procs.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1.0:
        procs.append(TopPLogitsWarper(sampling.top_p))
    return procs


class SampledLogprobRecorder(LogitsProcessor):
    """Last processor of the list: keeps log softmax of the scores `generate()` samples from and,
    one step later, gathers the token that was drawn (it is then the last input id). One (B, V)
    float32 buffer, whatever the length; `finish(sequences)` gathers the final token."""

    def __init__(self):
        self.steps: list[torch.Tensor] = []
        self._last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._gather(input_ids[:, -1])
        self._last = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def _gather(self, tokens: torch.Tensor) -> None:
        if self._last is not None:
            self.steps.append(self._last.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))
            self._last = None

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """(B, new tokens) log-probs of the sampled tokens."""
        self._gather(sequences[:, -1])
        return torch.stack(self.steps, dim=1) if self.steps else sequences.new_zeros((sequences.size(0), 0), dtype=torch.float32)


class GeneratorDraw(LogitsProcessor):
    """Samples from softmax(scores) with its own `torch.Generator` and leaves only the drawn token
    (0 there, -inf elsewhere), so greedy decoding emits it. generate() itself draws from the
    process-wide RNG, which another thread (the trainer, beside an asynchronous producer) also
    draws from: with this processor last, the samples depend on the seed alone."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        tokens = torch.multinomial(torch.softmax(scores.float(), dim=-1), 1, generator=self.generator)
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens, 0.0)


def _generation_owner(model: nn.Module) -> nn.Module:
    """The transformers model whose `generation_config` generate() reads (PEFT wraps it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def checkpoint_sampler_settings(model: nn.Module) -> dict:
    """Sampler-changing fields the checkpoint's generation_config sets to non-neutral values."""
    config = getattr(_generation_owner(model), "generation_config", None)
    if config is None:
        return {}
    found = {}
    for name, neutral in SAMPLER_FIELDS.items():
        value = getattr(config, name, None)
        if value is not None and value != neutral and not (name == "top_k" and value in (0, 50)):
            found[name] = value
    return found


@contextlib.contextmanager
def neutral_generation_config(model: nn.Module):
    """Swap the checkpoint's generation_config for one holding only its special-token ids:
    generate() fills every unset field from `model.generation_config` (transformers#42762)."""
    owner = _generation_owner(model)
    saved = getattr(owner, "generation_config", None)
    ids = {k: getattr(saved, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")}
    owner.generation_config = GenerationConfig(**{k: v for k, v in ids.items() if v is not None})
    try:
        yield
    finally:
        owner.generation_config = saved


class HFEngine(RolloutEngine):
    """Samples with `model.generate()` inside `skip_layers`; the model object is the policy itself.

    `logprobs_source`: `sampler` (default) returns μ from the scores generate() sampled from, in
    float32, with no extra forward; `rescore` runs a teacher-forced forward of the skipped model
    over the samples (only where the sampler is plain temperature sampling). `score_logprobs=False`
    returns no log-probs at all. `cache_implementation` is passed to generate() (speed and memory
    only; it does not change the distribution).

    `compact_every` > 0 generates in phases of that many tokens and drops the rows that finished
    before the next phase, continuing the others from their KV cache: `generate()` otherwise
    decodes every row of a batch until its longest one ends, so one long completion holds up the
    whole round. Each phase samples from the same processed distribution (μ is recorded per phase),
    so only the random stream differs from one call.

    `private_rng=True` draws the samples with the engine's own generator (`GeneratorDraw`) instead of
    the process-wide RNG: the samples then depend on `sampling.seed` only, whatever other threads
    draw meanwhile (the asynchronous producer runs beside the trainer). Same distribution, same μ;
    a different random stream from the default.
    """

    shares_policy_weights = True

    def __init__(self, model: nn.Module, tokenizer, *, eos_token_ids: Iterable[int] | None = None,
                 batch_size: int = 64, score_logprobs: bool = True, logprobs_source: str = "sampler",
                 cache_implementation: str | None = None, compact_every: int = 0, private_rng: bool = False):
        if compact_every < 0:
            raise ValueError(f"compact_every must be >= 0 (0: one generate() call per batch), got {compact_every!r}")
        if logprobs_source not in LOGPROB_SOURCES:
            raise ValueError(f"logprobs_source must be one of {LOGPROB_SOURCES}, got {logprobs_source!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = list(eos_token_ids) if eos_token_ids is not None else [tokenizer.eos_token_id]
        self.batch_size = batch_size
        self.score_logprobs = score_logprobs
        self.logprobs_source = logprobs_source
        self.cache_implementation = cache_implementation
        self.compact_every = compact_every
        self.private_rng = private_rng
        self._generator: torch.Generator | None = None  # the round's own generator (private_rng)
        self.num_layers = num_decoder_layers(model)
        ignored = checkpoint_sampler_settings(model)
        if ignored:
            logger.info("the checkpoint's generation_config sets %s; rollouts ignore it and sample with the "
                        "trainer's settings only (set them in the config to use them)", ignored)

    def set_skip(self, layers) -> None:
        bad = [i for i in layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"layer indices {bad} are out of range for a model with {self.num_layers} layers")
        super().set_skip(layers)

    def _generate_batch(self, prompts: list[list[int]], sampling: SamplingSpec,
                        ignore_eos: bool = False) -> tuple[list[list[int]], list[list[float]]]:
        device = next(self.model.parameters()).device
        ids, mask = _left_pad(prompts, self.pad_id, device)
        completions: list[list[int]] = [[] for _ in prompts]
        lps: list[list[float]] = [[] for _ in prompts]
        rows = list(range(len(prompts)))  # the prompts still being generated, in the batch's order
        remaining, cache = sampling.max_new_tokens, None
        phased = bool(self.compact_every) and not ignore_eos and self.cache_implementation is None
        while True:
            phase = min(remaining, self.compact_every) if phased else remaining
            out, new, logps = self._generate_phase(ids, mask, cache, phase, sampling, ignore_eos)
            unfinished = []
            for i, (row, lp) in enumerate(zip(new.tolist(), logps)):
                for t, tok in enumerate(row):
                    if tok in self.eos_ids:  # keep the EOS token (it is part of what was sampled)
                        row = row[: t + 1]
                        break
                else:
                    unfinished.append(i)
                completions[rows[i]] += row
                lps[rows[i]] += lp[: len(row)]
            remaining -= phase
            if remaining <= 0 or not unfinished:
                return completions, lps
            # Continue only the unfinished rows, from their cache: finished rows stop costing decode steps.
            cache = out.past_key_values
            if not hasattr(cache, "batch_select_indices"):
                raise TypeError(f"rollout_compact_every needs a cache that can drop rows (batch_select_indices); "
                                f"{type(cache).__name__} cannot: set rollout_compact_every=0")
            keep = torch.tensor(unfinished, device=device)
            cache.batch_select_indices(keep)
            mask = torch.cat([mask, torch.ones_like(new)], dim=1)[keep]
            ids, rows = out.sequences[keep], [rows[i] for i in unfinished]

    def _generate_phase(self, ids, mask, cache, max_new_tokens: int, sampling: SamplingSpec, ignore_eos: bool):
        """One generate() call: up to `max_new_tokens` more tokens for every row of `ids`, continuing
        from `cache` (which holds every token of `ids` but the last) when given."""
        # μ is recorded only when it is reported: the throughput meter and `rescore` skip the per-step log-softmax
        recorder = SampledLogprobRecorder() if self.score_logprobs and self.logprobs_source == "sampler" else None
        # generate() itself adds no warper (temperature 1, top-k 0, top-p 1): ours run, last.
        # With a private generator ours also draws, and greedy decoding emits the drawn token.
        draw = [GeneratorDraw(self._generator)] if self._generator is not None else []
        config = GenerationConfig(
            do_sample=not draw, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens if ignore_eos else None, eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id, cache_implementation=self.cache_implementation if cache is None else None,
            disable_compile=True, return_dict_in_generate=True,
        )
        with neutral_generation_config(self.model):
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, generation_config=config, past_key_values=cache,
                logits_processor=LogitsProcessorList([*sampling_processors(sampling), *([recorder] if recorder else []), *draw]),
            )
        new = out.sequences[:, ids.shape[1]:]
        logps = recorder.finish(out.sequences).tolist() if recorder else [[] for _ in range(ids.size(0))]
        return out, new, logps

    @torch.no_grad()
    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingSpec, *, ignore_eos: bool = False) -> Rollouts:
        """`ignore_eos`: sample exactly max_new_tokens per prompt (EOS suppressed; for throughput).
        The global RNG is left as it was: `sampling.seed` seeds a forked generator (or, with
        `private_rng`, the engine's own)."""
        if self.score_logprobs and self.logprobs_source == "rescore" and not sampling.only_temperature:
            raise ValueError(f"logprobs_source='rescore' scores softmax(logits / T) only; this sampler also applies "
                             f"top_k={sampling.top_k}, top_p={sampling.top_p}, min_p={sampling.min_p}, "
                             f"repetition_penalty={sampling.repetition_penalty}: use logprobs_source='sampler'")
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        # forking would restore the global RNG on exit, undoing another thread's draws meanwhile
        rng_scope = contextlib.nullcontext() if self.private_rng else torch.random.fork_rng(
            devices=[device] if device.type == "cuda" else [])
        try:
            with skip_layers(self.model, self.skip), rng_scope:
                if self.private_rng:
                    self._generator = torch.Generator(device)
                    if sampling.seed is not None:
                        self._generator.manual_seed(sampling.seed)
                    else:
                        self._generator.seed()
                elif sampling.seed is not None:
                    torch.manual_seed(sampling.seed)
                start = time.perf_counter()
                completions: list[list[int]] = []
                sampled_lps: list[list[float]] = []
                for i in range(0, len(prompt_token_ids), self.batch_size):
                    c, lp = self._generate_batch(prompt_token_ids[i:i + self.batch_size], sampling, ignore_eos)
                    completions += c
                    sampled_lps += lp
                gen_s = time.perf_counter() - start
                logprobs, lp_s = None, 0.0
                if self.score_logprobs and self.logprobs_source == "sampler":
                    logprobs = sampled_lps
                elif self.score_logprobs:
                    start = time.perf_counter()
                    logprobs = completion_logprobs(self.model, prompt_token_ids, completions,
                                                   sampling.temperature, self.pad_id, self.batch_size)
                    lp_s = time.perf_counter() - start
        finally:
            self.model.train(was_training)
            self._generator = None
        return Rollouts(completions, logprobs, self.skip, gen_s, lp_s)

    def load_weights(self, named_tensors) -> None:
        """Nothing to do: the engine samples from the policy's own parameters."""
