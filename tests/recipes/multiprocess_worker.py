"""One process of the math recipe under `accelerate launch`, recording what test_multiprocess.py
checks across processes. Run as

    accelerate launch --config_file CONFIG tests/recipes/multiprocess_worker.py EVIDENCE_DIR [recipe args]

and it writes EVIDENCE_DIR/rank<r>.pt: the flat weights at the start and after every optimizer step
(gathered under ZeRO-3), the skip set and sampling seed of every training round and how many
parameter values the policy held as it sampled, the rank's own rows of the correction inputs
before they are gathered, the ESS the skip controller was given, and how the run was distributed. The recipe itself runs unchanged, except for the accuracy
reward: a random model never earns it, so every group would tie, every advantage would be 0 and
the weights would never move; the reward here scores the sample's own text instead.
"""

import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

import recipes.math_reft as recipe
from nested_reft.trainer import NestedReFTTrainer
from recipes.distributed import whole_model


def distinct_char_reward(completions, **kwargs) -> list[float]:
    """Fraction of distinct characters in the completion: differs between samples of a group."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [len(set(t)) / max(1, len(t)) for t in texts]


class WeightRecorder(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer

    def _record(self):
        with whole_model(self.trainer.model) as model:  # gathered under ZeRO-3 (every rank enters)
            flat = torch.cat([p.detach().float().reshape(-1).cpu() for p in model.parameters()])
        self.trainer.evidence["weights"].append(flat.clone())

    def on_train_begin(self, args, state, control, **kwargs):
        self._record()

    def on_step_end(self, args, state, control, **kwargs):
        self._record()


TRAINERS = []


class RecordingTrainer(NestedReFTTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.evidence = {"weights": [], "rounds": [], "seeds": [], "local_rows": [], "controller_ess": [],
                         "sampled_numel": []}
        self.add_callback(WeightRecorder(self))
        if self.skip_controller is not None:
            update = self.skip_controller.update

            def recorded_update(ess):
                self.evidence["controller_ess"].append(float(ess))
                return update(ess)

            self.skip_controller.update = recorded_update
        TRAINERS.append(self)

    def _begin_round(self, mode):
        super()._begin_round(mode)
        if mode == "train":
            self.evidence["rounds"].append((self._round, tuple(self._round_skip)))

    def _generate_single_turn(self, prompt_ids, *args, **kwargs):
        if self.model.training:
            self.evidence["seeds"].append((self._round, self._turn, self._sampling(self._turn).seed))
            # what the policy's parameters hold as the engine samples (0 for a ZeRO-3 shard not gathered)
            self.evidence["sampled_numel"].append(sum(p.numel() for p in self.model.parameters()))
        return super()._generate_single_turn(prompt_ids, *args, **kwargs)

    def _gather_rows(self, t):
        self.evidence["local_rows"].append(t.detach().cpu().clone())  # old, behavior, mask, weights
        return super()._gather_rows(t)


def main():
    evidence_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    recipe.accuracy_reward = distinct_char_reward
    recipe.NestedReFTTrainer = RecordingTrainer
    summary = recipe.main(argv)
    (trainer,) = TRAINERS
    state = trainer.accelerator.state
    plugin = getattr(state, "deepspeed_plugin", None)
    evidence = {**trainer.evidence, "summary": summary, "rank": trainer.accelerator.process_index,
                "world_size": trainer.accelerator.num_processes, "distributed_type": str(state.distributed_type),
                "zero_stage": plugin.zero_stage if plugin is not None else None,
                "wrapped": type(trainer.model_wrapped).__name__, "engine": type(trainer.engine).__name__}
    evidence_dir.mkdir(parents=True, exist_ok=True)
    torch.save(evidence, evidence_dir / f"rank{evidence['rank']}.pt")


if __name__ == "__main__":
    main()
