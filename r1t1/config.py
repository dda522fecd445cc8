"""`R1T1Config`: the Nested-ReFT config (TRL's GRPOConfig underneath) plus R1-T1's fields."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers.trainer_utils import SchedulerType

from nested_reft.config import NestedReFTConfig
from rewards.translation import FORMAT_GATES, METRICS

from .templates import SELECTION_MODES, TEMPLATE_NAMES

KL_MODES = ("loss", "reward")


@dataclass
class R1T1Config(NestedReFTConfig):
    """GRPO for translation reasoners (SPEC §2), on the Nested-ReFT trainer.

    `beta` (TRL's field) is the KL coefficient in both modes. kl_mode='loss' is TRL's k3 term in
    the loss (the authors' released code); kl_mode='reward' subtracts β · Σ_t (log π_θ − log π_ref)
    per sequence from the reward before group advantages (the paper's KL-constrained reward).
    Defaults are the authors' released settings (SPEC §2): β 0.001 with k3 in the loss,
    temperature 0.8, 8 rollouts per prompt, lr 4e-7 (7B-class) held constant, AdamW weight decay
    0.01, responses up to 8000 tokens,
    2 epochs, full-model rollouts, their format gate (docs/r1t1.md lists each setting: theirs,
    ours, and the option that switches). Set skip_ratio > 0 to sample rollouts from layer-skipped copies
    of the policy (Nested-ReFT, an option here).
    """

    beta: float = field(default=0.001, metadata={"help": "KL coefficient (the authors': 0.001), in the loss (k3) or in the reward (kl_mode)."})
    temperature: float = field(default=0.8, metadata={"help": "Sampling temperature of the rollouts (the authors': 0.8)."})
    num_generations: int | None = field(default=8, metadata={"help": "Rollouts per prompt (the authors': 8)."})
    learning_rate: float = field(default=4e-7, metadata={"help": "The authors' learning rate for 7B-class models."})
    # verl (the authors' trainer) keeps the lr constant with no warm-up and steps AdamW with weight
    # decay 0.01; transformers' defaults (linear decay to 0, no decay) would halve the mean lr.
    lr_scheduler_type: SchedulerType | str = field(default="constant", metadata={"help": "The learning-rate schedule (the authors': constant, no warm-up; transformers' default 'linear' decays to 0)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (the authors': 0.01, verl's default; biases and norms are exempt here)."})
    max_completion_length: int | None = field(default=8000, metadata={"help": "Longest response in tokens (the authors': 8000)."})
    num_train_epochs: float = field(default=2.0, metadata={"help": "Epochs over the prompts (the authors': 2)."})
    skip_ratio: float = field(default=0.0, metadata={"help": "Layer-skipped rollouts are an option for R1-T1 (Nested-ReFT); 0 samples with the full model, as the authors do."})

    kl_mode: str = field(default="loss", metadata={"help": f"Where the KL to the reference model goes: one of {KL_MODES}. 'loss': beta * k3 per token in the loss (TRL). 'reward': beta * sum_t(log pi_theta - log pi_ref) subtracted from each sequence's reward before advantages.", "choices": list(KL_MODES)})
    template_mode: str = field(default="fixed", metadata={"help": f"How each example's CoT template is chosen: one of {SELECTION_MODES} ('by_rule' needs a rule passed in code).", "choices": list(SELECTION_MODES)})
    template: str = field(default="hierarchical", metadata={"help": f"The template of template_mode='fixed': one of {TEMPLATE_NAMES}."})
    templates: list[str] | None = field(default=None, metadata={"help": "The templates template_mode='random' draws from (default: all six)."})
    reward_metric: str = field(default="chrf", metadata={"help": f"Quality Q of the format-gated reward: one of {METRICS}. 'comet' needs comet_model.", "choices": list(METRICS)})
    comet_model: str | None = field(default=None, metadata={"help": "Local COMET checkpoint (a .ckpt file or a model folder) for reward_metric='comet'."})
    comet_batch_size: int = field(default=32, metadata={"help": "Sentences per COMET forward (reward_metric='comet')."})
    comet_gpus: int | None = field(default=None, metadata={"help": "GPUs COMET scores on (default: 1 when there is a GPU, else 0)."})
    format_gate: str = field(default="authors", metadata={"help": f"Format check of the reward: one of {FORMAT_GATES}. 'authors' (the released code): each of the four tags once, in order, text around them allowed, an empty answer still earns the 0.2. 'strict' [ours]: only whitespace outside the blocks, both non-empty.", "choices": list(FORMAT_GATES)})
    bleu_tokenize: str | None = field(default=None, metadata={"help": "sacrebleu tokenizer of reward_metric='bleu' (default: the target language's own: zh, ja-mecab, ko-mecab, else 13a; e.g. 'flores200')."})

    def __post_init__(self):
        self.validate_r1t1()
        super().__post_init__()

    def validate_r1t1(self) -> None:
        if self.kl_mode not in KL_MODES:
            raise ValueError(f"kl_mode must be one of {KL_MODES}, got {self.kl_mode!r}")
        if self.template_mode not in SELECTION_MODES:
            raise ValueError(f"template_mode must be one of {SELECTION_MODES}, got {self.template_mode!r}")
        for name in [self.template] + list(self.templates or []):
            if name not in TEMPLATE_NAMES:
                raise ValueError(f"unknown template {name!r}; templates are {', '.join(TEMPLATE_NAMES)}")
        if self.format_gate not in FORMAT_GATES:
            raise ValueError(f"format_gate must be one of {FORMAT_GATES}, got {self.format_gate!r}")
        if self.comet_batch_size < 1 or (self.comet_gpus is not None and self.comet_gpus < 0):
            raise ValueError(f"need comet_batch_size >= 1 and comet_gpus >= 0, got {self.comet_batch_size!r}, {self.comet_gpus!r}")
        if self.reward_metric not in METRICS:
            raise ValueError(f"reward_metric must be one of {METRICS}, got {self.reward_metric!r}")
        if self.reward_metric == "comet" and not self.comet_model:
            raise ValueError("reward_metric='comet' needs comet_model, the path of a local COMET checkpoint")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta!r}")
        if self.kl_mode == "reward" and self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError("kl_mode='reward' subtracts the KL from the summed reward: it needs "
                             f"multi_objective_aggregation='sum_then_normalize', got {self.multi_objective_aggregation!r}")
