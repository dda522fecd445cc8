"""Asynchronous rollouts (`async_rollouts: true`): a producer thread samples the next generation
rounds while the trainer trains on this one (docs/async.md).

Round n+d (d = max_staleness // optimizer steps per round) is submitted when round n starts, with
a snapshot of the weights at that step and its own skip set, so it is sampled while rounds n..n+d-1
train and reaches the trainer exactly d rounds stale. μ is what the engine reports: the stale
policy with the round's layers skipped; π_old is the current policy when the round is used; every
correction method then applies unchanged (the exact enumeration of `benchmarks/staleness_bias.py`
shows `seq_is` unbiased under staleness and skipping together).

The producer is one worker thread that makes every engine call, in submission order: a round's
weights, its skip set and its sampling, and (synchronously, waiting behind the queued rounds)
evaluation and the full-model probe. The prompts of the coming rounds are read ahead from the
trainer's own data iterator (`get_batch_samples`), so the rounds train on the prompts, in the
order, that a synchronous run trains on; at an epoch's end there is nothing to read ahead and the
next epoch's first round is sampled on the spot.

Checkpoints keep the rounds in flight: they are finished, then saved with their versions (safetensors
+ JSON, no pickle), and a resumed run trains on them as the uninterrupted run does.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import copy
import json
import logging
import os
import time
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save_file

from .engines.base import Rollouts, SamplingSpec
from .engines.weights import changed_weights

logger = logging.getLogger(__name__)

PIPELINE_TENSORS = "nested_reft_async.safetensors"
PIPELINE_META = "nested_reft_async.json"


@dataclass
class WeightSnapshot:
    """The policy at one optimizer step: what the engine loads (`tensors`, checkpoint names) and
    the trainable parameters under the policy's own names (`params`, for the staleness split)."""

    version: int
    tensors: list[tuple[str, torch.Tensor]]
    params: dict[str, torch.Tensor]


@dataclass
class RoundJob:
    round: int
    prompt_ids: list[list[int]]
    sampling: SamplingSpec
    skip: tuple[int, ...]
    version: int  # the optimizer step whose weights sample it
    future: concurrent.futures.Future
    snapshot: WeightSnapshot | None = None  # None for a round restored from a checkpoint
    load_seconds: list[float] = field(default_factory=list)
    stale_logprobs: list[list[float]] | None = None  # log π_stale (unskipped) of the samples, from the producer


def snapshot_policy(policy: torch.nn.Module, version: int, with_params: bool) -> WeightSnapshot:
    """Copies of what an optimizer step can change, taken on the trainer's thread (the producer
    reads them while the trainer goes on updating the live tensors)."""
    with changed_weights(policy) as named:
        tensors = [(name, t.clone()) for name, t in named]
    params = {}
    if with_params:
        cloned = dict(tensors)
        for name, p in policy.named_parameters():
            if p.requires_grad:  # a plain model's are among the tensors already
                params[name] = cloned[name] if name in cloned else p.detach().clone()
    return WeightSnapshot(version, tensors, params)


@contextlib.contextmanager
def swapped_parameters(model: torch.nn.Module, values: dict[str, torch.Tensor]):
    """`model` with the named parameters' data replaced by `values` for the block."""
    params = dict(model.named_parameters())
    saved = {}
    try:
        for name, value in values.items():
            saved[name] = params[name].data
            params[name].data = value
        yield model
    finally:
        for name, data in saved.items():
            params[name].data = data


class RolloutProducer:
    """One worker thread that makes every call to `engine`, in submission order."""

    def __init__(self, engine, threads: int | None = None):
        self.engine = engine
        self.loaded_version: int | None = None  # the weights the engine holds (producer thread only)
        threads = threads or torch.get_num_threads()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="nested-reft-producer", initializer=torch.set_num_threads, initargs=(threads,))

    def call(self, fn, *args, **kwargs):
        """Run `fn` on the producer thread after everything queued, and wait for it."""
        return self._executor.submit(fn, *args, **kwargs).result()

    def load(self, snapshot: WeightSnapshot) -> float:
        """Producer thread: bring the engine to `snapshot` (nothing when it holds it already)."""
        if snapshot.version == self.loaded_version:
            return 0.0
        start = time.perf_counter()
        self.engine.load_weights(snapshot.tensors)
        self.loaded_version = snapshot.version
        return time.perf_counter() - start

    def submit(self, job_args: dict, snapshot: WeightSnapshot, score_full: bool = False) -> RoundJob:
        """Queue a round. `score_full`: also score the samples under the unskipped stale policy on this
        thread (engines with `full_model_logprobs`), for the log-ratio split."""
        job = RoundJob(future=concurrent.futures.Future(), version=snapshot.version, snapshot=snapshot, **job_args)

        def run() -> Rollouts:
            job.load_seconds.append(self.load(snapshot))
            self.engine.set_skip(job.skip)
            if hasattr(self.engine, "last_load_seconds"):  # the compiled engine moves layers into its slots
                job.load_seconds.append(self.engine.last_load_seconds)
            rollouts = self.engine.generate(job.prompt_ids, job.sampling)
            if score_full and job.skip and hasattr(self.engine, "full_model_logprobs"):
                job.stale_logprobs = self.engine.full_model_logprobs(job.prompt_ids, rollouts.completion_ids,
                                                                     job.sampling.temperature)
            return rollouts

        job.future = self._executor.submit(run)
        return job

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def completed(rollouts: Rollouts) -> concurrent.futures.Future:
    future = concurrent.futures.Future()
    future.set_result(rollouts)
    return future


def save_pipeline(folder: str, jobs: dict[int, RoundJob]) -> int:
    """Wait for the rounds in flight and write them to `folder`; returns how many were lost (their
    sampling failed: a resumed run samples them again)."""
    tensors, meta, lost = {}, {"rounds": []}, 0
    for r in sorted(jobs):
        job = jobs[r]
        try:
            rollouts = job.future.result()
        except Exception:  # noqa: BLE001 - the failure is the trainer's to report; the round is resampled
            lost += 1
            continue
        lengths = [len(c) for c in rollouts.completion_ids]
        tensors[f"{r}/completions"] = torch.tensor([t for c in rollouts.completion_ids for t in c], dtype=torch.long)
        if rollouts.logprobs is not None:
            tensors[f"{r}/logprobs"] = torch.tensor([x for lp in rollouts.logprobs for x in lp], dtype=torch.float64)
        s = job.sampling
        meta["rounds"].append({
            "round": r, "version": job.version, "skip": list(job.skip), "prompt_ids": job.prompt_ids,
            "lengths": lengths, "generate_seconds": rollouts.generate_seconds,
            "logprob_seconds": rollouts.logprob_seconds,
            "sampling": {k: getattr(s, k) for k in SamplingSpec.__dataclass_fields__},
        })
    paths = [os.path.join(folder, name) for name in (PIPELINE_TENSORS, PIPELINE_META)]
    save_file(tensors, paths[0] + ".tmp")
    with open(paths[1] + ".tmp", "w") as f:
        json.dump(meta, f)
    for path in paths:  # written whole, then renamed: never half a pipeline
        os.replace(path + ".tmp", path)
    return lost


def load_pipeline(folder: str) -> dict[int, RoundJob]:
    """The rounds `save_pipeline` wrote, as finished jobs (no snapshot: their weights are gone)."""
    meta_path = os.path.join(folder, PIPELINE_META)
    if not os.path.exists(meta_path):
        return {}
    with open(meta_path) as f:
        meta = json.load(f)
    tensors = load_file(os.path.join(folder, PIPELINE_TENSORS))
    jobs = {}
    for entry in meta["rounds"]:
        r, lengths = entry["round"], entry["lengths"]
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        flat = tensors[f"{r}/completions"].tolist()
        completions = [flat[a:a + n] for a, n in zip(starts, lengths)]
        logprobs = None
        if f"{r}/logprobs" in tensors:
            flat_lp = tensors[f"{r}/logprobs"].tolist()
            logprobs = [flat_lp[a:a + n] for a, n in zip(starts, lengths)]
        skip = tuple(entry["skip"])
        rollouts = Rollouts(completions, logprobs, skip, entry["generate_seconds"], entry["logprob_seconds"])
        jobs[r] = RoundJob(round=r, prompt_ids=entry["prompt_ids"], sampling=SamplingSpec(**entry["sampling"]),
                           skip=skip, version=entry["version"], future=completed(rollouts))
    return jobs


class ReadAhead:
    """The trainer's data iterator, read `rounds` generation rounds ahead of the optimizer step
    transformers asks batches for (`Trainer.get_batch_samples`). `upcoming[micro_step]` is the
    generation batch TRL will hand over at that micro-step (a round's first one)."""

    def __init__(self):
        self._iterator = None
        self._items: collections.deque = collections.deque()
        self.upcoming: dict[int, list] = {}

    def take(self, iterator, num_batches: int, first_step: int, ahead: int, round_length: int) -> list:
        """`num_batches` items for micro-steps first_step.., then `ahead` more read and indexed."""
        if iterator is not self._iterator:  # a new epoch: what was read of the last one is used up
            self._iterator, self._items = iterator, collections.deque()
        batches = []
        while len(batches) < num_batches:
            if self._items:
                batches.append(self._items.popleft())
                continue
            try:
                batches.append(next(iterator))
            except StopIteration:
                break
        while len(self._items) < ahead:
            try:
                self._items.append(next(iterator))
            except StopIteration:
                break
        start = first_step + len(batches)
        self.upcoming = {start + i: item for i, item in enumerate(self._items) if (start + i) % round_length == 0}
        return batches


def log_ratio_parts(old: torch.Tensor, stale: torch.Tensor, behavior: torch.Tensor,
                    mask: torch.Tensor) -> dict[str, float]:
    """log π_old − log μ = (log π_old − log π_stale) + (log π_stale − log μ): staleness, then
    skipping. Per part, over the valid tokens: KL ≈ mean(−d) (the two add up to the round's
    `correction/kl_behavior`) and the ESS (Σw)² / (N Σw²) of w = exp(d)."""
    valid = mask.bool() & torch.isfinite(old) & torch.isfinite(stale) & torch.isfinite(behavior)
    out = {}
    for name, d in (("staleness", old - stale), ("skipping", stale - behavior)):
        dv = d[valid].double()
        if dv.numel() == 0:
            continue
        w = torch.exp(dv.clamp(max=80.0))
        out[f"async/kl_{name}"] = float((-dv).mean())
        out[f"async/ess_{name}"] = float(w.sum() ** 2 / (dv.numel() * (w * w).sum()))
    return out


class AsyncRolloutsMixin:
    """The trainer side of `async_rollouts` (used by `NestedReFTTrainer`; single process)."""

    def _init_async(self, tools) -> None:
        a = self.args
        self._producer: RolloutProducer | None = None
        self._jobs: dict[int, RoundJob] = {}
        self._async_job: RoundJob | None = None  # the round being trained on
        self._read_ahead = ReadAhead()
        self._snapshot: WeightSnapshot | None = None
        self.async_dropped_rounds = 0
        if not a.async_rollouts:
            return
        if self.accelerator.num_processes > 1:
            raise ValueError(f"async_rollouts=True runs in one training process; this run has "
                             f"{self.accelerator.num_processes}")
        if tools or getattr(self, "environment_factories", None):
            raise ValueError("async_rollouts=True samples one turn per round ahead of time; tool calls and "
                             "environments need the current round's answers: use async_rollouts=False")
        if self.engine.shares_policy_weights:
            raise ValueError(f"async_rollouts=True needs an engine with its own copy of the weights; "
                             f"{type(self.engine).__name__} samples from the policy's own parameters")

    @property
    def _rounds_ahead(self) -> int:
        return self.args.max_staleness // self.args.steps_per_round()

    def _engine_call(self, fn, *args, **kwargs):
        """Call into the engine: on the producer's thread, behind its queued rounds, when there is one."""
        if self._producer is None:
            return fn(*args, **kwargs)
        return self._producer.call(fn, *args, **kwargs)

    def _start_producer(self) -> RolloutProducer:
        if self._producer is None:
            self._producer = RolloutProducer(self.engine)
        return self._producer

    def _close_producer(self) -> None:
        if self._producer is not None:
            self._producer.close()
            self._producer = None
            # rounds still queued or running are lost with it; a later train() samples them again
            self._jobs = {r: j for r, j in self._jobs.items() if j.future.done() and not j.future.cancelled()
                          and j.future.exception() is None}

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Transformers' batches for one optimizer step; with async rollouts, the data iterator is
        read ahead so the prompts of the coming rounds can be sampled now."""
        if not self.args.async_rollouts:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        length = self.args.steps_per_generation * self.num_iterations
        batches = self._read_ahead.take(epoch_iterator, num_batches, self._step, self._rounds_ahead * length, length)
        return batches, self._get_num_items_in_batch(batches, device)

    def _weights_now(self) -> WeightSnapshot:
        """The policy at this optimizer step, copied once per step."""
        step = self.state.global_step
        if self._snapshot is None or self._snapshot.version != step:
            policy = self.accelerator.unwrap_model(self.model)
            self._snapshot = snapshot_policy(policy, step, with_params=self.args.staleness_split)
        return self._snapshot

    def _submit_round(self, round_index: int, prompt_ids: list[list[int]]) -> RoundJob:
        job = self._start_producer().submit(
            {"round": round_index, "prompt_ids": prompt_ids, "sampling": self._sampling(0, round_index=round_index),
             "skip": self.skip_policy.draw()}, self._weights_now(), score_full=self.args.staleness_split)
        self._jobs[round_index] = job
        return job

    def _submit_ahead(self) -> None:
        """Submit the rounds up to `_rounds_ahead` after this one whose prompts are known."""
        length = self.args.steps_per_generation * self.num_iterations
        last = self.state.max_steps * self.args.gradient_accumulation_steps  # micro-steps of the run
        for j in range(1, self._rounds_ahead + 1):
            step, index = self._step + j * length, self._round + j
            if step >= last:
                return
            if index in self._jobs:
                continue
            batch = self._read_ahead.upcoming.get(step)
            if batch is None:  # past the end of the epoch's data: sampled on the spot when it comes
                return
            self._submit_round(index, self._tokenize_prompts([x["prompt"] for x in batch])[0])

    def _open_async_round(self, prompts: list) -> None:
        """Take this round's rollouts from the producer (dropping them if too stale) and submit
        the rounds ahead; then TRL's `_generate` runs as usual and `_generate_single_turn` hands
        them over."""
        metrics, step = self._metrics["train"], self.state.global_step
        job = self._jobs.pop(self._round, None)
        if job is not None and step - job.version > self.args.max_staleness:
            self.async_dropped_rounds += 1
            metrics["async/dropped_rounds"].append(float(self.async_dropped_rounds))
            logger.warning("round %d was sampled with the weights of step %d, %d steps before step %d: more than "
                           "max_staleness=%d, so it is dropped and sampled again (%d rounds dropped so far)",
                           self._round, job.version, step - job.version, step, self.args.max_staleness,
                           self.async_dropped_rounds)
            job = None
        if job is None:
            job = self._submit_round(self._round, self._tokenize_prompts(copy.deepcopy(prompts))[0])
            del self._jobs[self._round]
        self._submit_ahead()
        start = time.perf_counter()
        rollouts = job.future.result()
        metrics["async/wait_seconds"].append(time.perf_counter() - start)
        metrics["async/staleness"].append(float(step - job.version))
        metrics["async/dropped_rounds"].append(float(self.async_dropped_rounds))
        metrics["rollout/weight_load_seconds"].append(float(sum(job.load_seconds)))
        self._async_job = job
        self._round_skip = job.skip
        self._round_open, self._turn = True, 0
        self._round_stats = {"tokens": rollouts.num_tokens, "generate_seconds": rollouts.generate_seconds,
                             "logprob_seconds": rollouts.logprob_seconds}

    def _async_rollouts_for(self, prompt_ids: list[list[int]]) -> tuple[list[list[int]], list[list[float]] | None]:
        job = self._async_job
        if self._turn != 0:
            raise RuntimeError("async_rollouts samples one turn per round")
        if [list(p) for p in prompt_ids] != [list(p) for p in job.prompt_ids]:
            raise RuntimeError(f"round {job.round}: the producer sampled other prompts than the ones the trainer "
                               "trains on (the read-ahead data iterator and the trainer's disagree)")
        self._turn += 1
        rollouts = job.future.result()
        return rollouts.completion_ids, rollouts.logprobs

    def _log_staleness_split(self, output: dict, old: torch.Tensor, behavior: torch.Tensor, mask: torch.Tensor) -> None:
        job, self._async_job = self._async_job, None
        if job is None:
            return
        staleness = self.state.global_step - job.version
        if staleness == 0:
            stale = old
        elif not job.skip:
            stale = behavior
        elif job.stale_logprobs is not None:  # scored by the producer, beside the trainer
            stale = torch.zeros_like(old)
            for row, values in enumerate(job.stale_logprobs):
                stale[row, :len(values)] = torch.tensor(values, dtype=stale.dtype)
        elif job.snapshot is not None and self.args.staleness_split:  # one more forward, on the trainer's thread
            with swapped_parameters(self.accelerator.unwrap_model(self.model), job.snapshot.params):
                stale = self._policy_logps(output)
        else:  # restored from a checkpoint (its weights are not kept), or the split is off
            return
        for key, value in log_ratio_parts(old, stale, behavior, mask).items():
            self._metrics["train"][key].append(value)

    def _save_async_state(self, folder: str) -> None:
        if self.args.async_rollouts:
            lost = save_pipeline(folder, self._jobs)
            if lost:
                logger.warning("%d rounds in flight failed and were not saved: a resumed run samples them again", lost)

    def _load_async_state(self, checkpoint: str) -> None:
        if self.args.async_rollouts:
            self._jobs = load_pipeline(checkpoint)
