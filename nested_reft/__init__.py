"""Nested-ReFT: GRPO whose rollouts come from layer-skipped copies of the policy.

Submodules: `skipping` (LayerSkipPolicy, skip_layers), `corrections` (correction weights and
diagnostics), `engines` (rollout engines), `config` / `trainer` (NestedReFTConfig,
NestedReFTTrainer), `data` (math datasets), `evaluation` (held-out accuracy).
"""
