"""TRL's SFTTrainer as the recipes use it: a backbone's auxiliary loss (DTRNet's router loss) is
trained, and half-precision parameters get fp32 master weights."""

from __future__ import annotations

from trl import SFTTrainer as TRLSFTTrainer

from .aux_loss import BackboneAuxLossMixin
from .master_weights import MasterWeightsMixin


class SFTTrainer(BackboneAuxLossMixin, MasterWeightsMixin, TRLSFTTrainer):
    """`trl.SFTTrainer` plus `BackboneAuxLossMixin` and `MasterWeightsMixin`."""

    def _auxiliary_loss_normalizer(self, model, num_items_in_batch) -> float:
        # as TRL's SFT scales its MoE loss: with num_items_in_batch, accumulation is left to the loss
        return float(self.current_gradient_accumulation_steps) if num_items_in_batch is not None else 1.0
