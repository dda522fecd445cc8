"""Run records: metrics as JSONL while training, and a PNG of the curves that matter."""

from __future__ import annotations

import json
import math
from pathlib import Path

from transformers import TrainerCallback


class JsonlMetricsCallback(TrainerCallback):
    """Appends every logged dict (with its step) to `<output_dir>/metrics.jsonl`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            row = {"step": state.global_step, **{k: _json_number(v) for k, v in logs.items() if _is_real(v)}}
            with self.path.open("a") as f:
                f.write(json.dumps(row, allow_nan=False) + "\n")


class HeldOutEvalCallback(TrainerCallback):
    """Every `every` optimizer steps, runs `evaluate()` (returning an accuracy in [0, 1]) and logs it
    as `heldout/accuracy`, so the held-out curve lands in metrics.jsonl beside the training metrics."""

    def __init__(self, evaluate, every: int):
        if every < 1:
            raise ValueError(f"eval_every must be >= 1 to evaluate during training, got {every!r}")
        self.evaluate, self.every = evaluate, every

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 and state.global_step < state.max_steps:
            control.should_log = True
            self._pending = self.evaluate()

    def on_log(self, args, state, control, logs=None, **kwargs):
        pending = getattr(self, "_pending", None)
        if pending is not None and logs is not None:
            logs["heldout/accuracy"] = pending
            self._pending = None


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return _is_real(v) and not (isinstance(v, float) and math.isnan(v))


# JSON has no NaN or infinity: a non-finite metric is written as one of these strings (it must leave a
# trace: an all-NaN reward is a broken run), and read back as the float.
NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _json_number(v):
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
    return v


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: NONFINITE.get(v, v) if isinstance(v, str) else v for k, v in row.items()} for row in rows]


PANELS = (
    ("accuracy", ("rewards/accuracy_reward/mean", "heldout/accuracy"), "accuracy"),
    ("length", ("completions/mean_length",), "mean completion length (tokens)"),
    ("ess", ("correction/ess",), "effective sample size"),
    ("tokens/s", ("rollout/behavior_tokens_per_s", "rollout/probe_behavior_tokens_per_s",
                  "rollout/full_tokens_per_s"), "rollout tokens/s"),
)


LABELS = {"rewards/accuracy_reward/mean": "train (sampled)", "heldout/accuracy": "held-out greedy",
          "completions/mean_length": "sampled completions",
          "rollout/behavior_tokens_per_s": "behavior (rounds)",
          "rollout/probe_behavior_tokens_per_s": "behavior (probe)", "rollout/full_tokens_per_s": "full (probe)"}


def plot_training(rows: list[dict], out_png: str | Path, title: str = "", evals: dict | None = None,
                  panels=PANELS, eval_panel: str = "accuracy", eval_label: str = "held-out greedy") -> Path:
    """Curves over steps, one panel per (name, metric keys, y label); by default accuracy (sampled
    in training, held-out greedy), completion length, ESS and behavior vs full-model tokens/s. `evals` ({label: (step, value)}) are drawn
    as stars on the panel named `eval_panel`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (name, keys, ylabel) in zip(axes[0], panels):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                label = LABELS.get(key, key.split("/")[-1].replace("_tokens_per_s", ""))
                ax.plot(*zip(*pts), marker=".", label=label)
        if name == eval_panel and evals:
            for label, (step, value) in evals.items():
                ax.scatter([step], [value], marker="*", s=120, zorder=3, label=f"{eval_label} ({label})")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
