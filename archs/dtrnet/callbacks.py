"""Logging the routed fraction per layer during training."""

from __future__ import annotations

from transformers import TrainerCallback

from archs.skipping import decoder_stack


class RoutedFractionCallback(TrainerCallback):
    """At each log, adds `routing/fraction_layer_<i>` (mean routed fraction of routed layer i over the
    training-mode forwards since the last log) and `routing/fraction_mean` to the logged values.

    Trainer records `state.log_history` before calling callbacks, so the values are written there too;
    callbacks that come earlier in the list (the report_to integrations, when the callback is passed in
    `callbacks=`) do not see them: use `RoutedFractionCallback.attach(trainer)` to run it first."""

    @classmethod
    def attach(cls, trainer) -> RoutedFractionCallback:
        callback = cls()
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if model is None or logs is None:
            return
        stack = decoder_stack(model.module if hasattr(model, "module") else model)  # DDP wraps in .module
        means = stack.pop_routing_log() if hasattr(stack, "pop_routing_log") else {}
        if not means:
            return
        values = {f"routing/fraction_layer_{i}": f for i, f in means.items()}
        values["routing/fraction_mean"] = sum(means.values()) / len(means)
        logs.update(values)
        if state.log_history:
            state.log_history[-1].update(values)
