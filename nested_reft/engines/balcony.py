"""Balcony behavior model: rollouts sampled through exit k of the policy (SPEC.md §3, "in this toolkit").

A second family of cheap sampler next to layer skipping: the policy's own layers 0..k−1 (current
weights, shared), then the exit's decoder layer, norm and the policy's LM head, k + 1 layers in all.
`BalconyHFEngine` is an `HFEngine` that samples inside `use_exit` and returns the exit's own
log-probs (the sampler's processed scores), so the trainer's correction weights apply unchanged.

The exit is this engine's own module, outside the policy: the trainer's optimizer, checkpoints and
PEFT never see it. Its source: trained exits from `exits_path` (recipes/train_balcony.py), or a
copy of the policy's last layer; then optionally `warmup_steps` of self-distillation before the
first round, on completions the full policy samples for that round's prompts. During RL it is frozen
(`redistill_steps=0`, the default) or re-distilled for `redistill_steps` steps on the latest round
after every policy update (`load_weights`, which the trainer calls once per optimizer step because
`shares_policy_weights` is False). Re-distillation runs before the next round samples, so μ is always
the exit that sampled.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from archs.balcony import (
    KL_REDUCTIONS,
    BalconyConfig,
    build_exits,
    default_exits,
    exit_kl,
    exit_logits,
    read_exits,
    use_exit,
)

from .base import Rollouts, SamplingSpec
from .hf import HFEngine

logger = logging.getLogger(__name__)


def distillation_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int, device):
    """(ids, attention_mask, kl_mask): prompts left-padded, completions right-padded; `kl_mask` marks
    the positions whose next token is a completion token (the distributions the exit samples from)."""
    p_width = max(len(p) for p in prompts)
    width = p_width + max(1, max(len(c) for c in completions))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    kl_mask = torch.zeros_like(ids)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        start = p_width - len(p)
        ids[i, start:p_width + len(c)] = torch.tensor(p + c, dtype=torch.long)
        mask[i, start:p_width + len(c)] = 1
        kl_mask[i, p_width - 1:p_width - 1 + len(c)] = 1
    return ids.to(device), mask.to(device), kl_mask.to(device)


class BalconyHFEngine(HFEngine):
    """`HFEngine` sampling through Balcony exit `exit` of the policy; μ is the exit's own sampler.

    `exits_path`: exits saved by `save_exits` (they must hold exit `exit`); None: a new exit built
    as a copy of the policy's last layer. `exit=None`: the shallowest exit of `exits_path`, or the
    shallowest default exit for the policy's depth (≈47% of it). Layer skipping is not combined with
    an exit (`set_skip` accepts only the empty set)."""

    shares_policy_weights = False  # its own module: `load_weights` is the hook that re-distils it

    def __init__(self, policy: nn.Module, tokenizer, *, exit: int | None = None, exits_path: str | None = None,
                 warmup_steps: int = 0, redistill_steps: int = 0, lr: float = 5e-4, kl_reduction: str = "token_mean",
                 distill_batch_size: int = 32, eos_token_ids: Iterable[int] | None = None, batch_size: int = 64,
                 compact_every: int = 0, cache_implementation: str | None = None):
        if hasattr(policy, "peft_config"):
            raise ValueError("behavior='balcony' runs the policy's own layers under an exit; with PEFT (use_peft) it is "
                             "not supported yet: use behavior='skip'")
        if kl_reduction not in KL_REDUCTIONS:
            raise ValueError(f"kl_reduction must be one of {KL_REDUCTIONS}, got {kl_reduction!r}")
        if warmup_steps < 0 or redistill_steps < 0 or distill_batch_size < 1 or not lr > 0:
            raise ValueError(f"need warmup_steps >= 0, redistill_steps >= 0, distill_batch_size >= 1 and lr > 0, got "
                             f"{warmup_steps!r}, {redistill_steps!r}, {distill_batch_size!r}, {lr!r}")
        super().__init__(policy, tokenizer, eos_token_ids=eos_token_ids, batch_size=batch_size, score_logprobs=True,
                         compact_every=compact_every, cache_implementation=cache_implementation)
        if exits_path is not None:
            self.exits = read_exits(policy, exits_path)
            k = self.exits.depths[0] if exit is None else exit
        else:
            k = default_exits(self.num_layers)[0] if exit is None else exit
            if not 1 <= k < self.num_layers:
                raise ValueError(f"balcony_exit={k} does not fit a {self.num_layers}-layer policy (1 <= k <= "
                                 f"{self.num_layers - 1})")
            self.exits = build_exits(policy, [k])
        if k not in self.exits:
            raise ValueError(f"balcony_exit={k} is not one of the exits at {exits_path!r}: {self.exits.depths}")
        self.exit = k
        self.exits.requires_grad_(False)
        self.exits[k].requires_grad_(True)  # only the exit that samples is distilled
        self.optimizer = torch.optim.AdamW(self.exits[k].parameters(), lr=lr, weight_decay=0.0)
        self.lr, self.kl_reduction, self.distill_batch_size = lr, kl_reduction, distill_batch_size
        self.warmup_steps, self.redistill_steps = warmup_steps, redistill_steps
        self._warmup_pending = warmup_steps > 0
        self._latest: tuple[list[list[int]], list[list[int]]] | None = None
        self.distill_history: list[dict] = []  # one row per distillation: phase, steps, KL first and last step

    def set_skip(self, layers) -> None:
        if tuple(layers):
            raise ValueError(f"BalconyHFEngine samples through exit {self.exit}; it does not also skip layers "
                             f"(got {list(layers)}): use skip_ratio=0 with behavior='balcony'")
        super().set_skip(layers)

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingSpec, *, ignore_eos: bool = False) -> Rollouts:
        if self._warmup_pending:
            self._warmup_pending = False
            full = super().generate(prompt_token_ids, sampling)  # the full policy's own completions
            self.distill(prompt_token_ids, full.completion_ids, self.warmup_steps, phase="warmup")
        with use_exit(self.model, self.exit, self.exits):
            rollouts = super().generate(prompt_token_ids, sampling, ignore_eos=ignore_eos)
        if not ignore_eos:
            self._latest = (list(prompt_token_ids), rollouts.completion_ids)
        return rollouts

    def load_weights(self, named_tensors) -> None:
        """The policy changed (its layers are shared, so nothing to copy): re-distil the exit on the
        latest round's samples for `redistill_steps` steps (0: the exit stays frozen)."""
        if self.redistill_steps and self._latest is not None:
            self.distill(*self._latest, self.redistill_steps, phase="redistill")

    def distill(self, prompts: list[list[int]], completions: list[list[int]], steps: int, phase: str = "distill") -> dict:
        """`steps` AdamW steps of KL(p_policy ‖ p_exit) on (prompt, completion) pairs, in mini-batches of
        `distill_batch_size` taken in turn; the warm-up decays the rate by a cosine (the released schedule),
        re-distillation keeps it constant. Returns the KL of the first and last step."""
        pairs = [(p, c) for p, c in zip(prompts, completions) if c]
        if not steps or not pairs:
            return {}
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        kls = []
        try:
            with torch.enable_grad():
                for step in range(steps):
                    if phase == "warmup":
                        for group in self.optimizer.param_groups:
                            group["lr"] = self.lr * 0.5 * (1 + math.cos(math.pi * step / steps))
                    start = (step * self.distill_batch_size) % len(pairs)
                    chunk = (pairs + pairs)[start:start + min(self.distill_batch_size, len(pairs))]
                    ids, mask, kl_mask = distillation_batch([p for p, _ in chunk], [c for _, c in chunk],
                                                            self.pad_id, device)
                    full, by_exit = exit_logits(self.model, ids, mask, self.exits, depths=[self.exit])
                    loss = exit_kl(full, by_exit[self.exit], kl_mask, self.kl_reduction)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(self.exits[self.exit].parameters(), 1.0)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    kls.append(float(loss.detach()))
        finally:
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr
            self.model.train(was_training)
        row = {"phase": phase, "steps": steps, "kl_first": kls[0], "kl_last": kls[-1]}
        self.distill_history.append(row)
        logger.info("balcony exit %d: %s, %d steps on %d completions, KL %.4f -> %.4f", self.exit, phase, steps,
                    len(pairs), kls[0], kls[-1])
        return row


def check_balcony_args(num_layers: int, args) -> None:
    """Before any weights load (recipes/preflight.py): the exit fits the checkpoint's depth, and saved
    exits exist, hold that exit and were built on a base of this depth."""
    if getattr(args, "behavior", "skip") != "balcony":
        return
    k = args.balcony_exit
    if args.balcony_exits_path is not None:
        path = Path(args.balcony_exits_path).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"balcony_exits_path {args.balcony_exits_path!r} has no Balcony exits (config.json "
                                    "and balcony_exits.safetensors, written by recipes/train_balcony.py)")
        config = BalconyConfig.from_pretrained(path)
        if config.base_num_hidden_layers != num_layers:
            raise ValueError(f"the exits at {args.balcony_exits_path!r} were trained on a {config.base_num_hidden_layers}-"
                             f"layer base; this model has {num_layers} layers")
        if k is not None and k not in config.exits:
            raise ValueError(f"balcony_exit={k} is not one of the exits at {args.balcony_exits_path!r}: {config.exits}")
    elif k is not None and not 1 <= k < num_layers:
        raise ValueError(f"balcony_exit={k} does not fit this {num_layers}-layer model: exit k runs layers 0..k-1 and "
                         f"its own layer, so 1 <= k <= {num_layers - 1}")


__all__ = ["BalconyHFEngine", "check_balcony_args", "distillation_batch"]
