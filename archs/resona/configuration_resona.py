"""Resona configuration (SPEC.md §8, arXiv 2503.22913): a ReGLA model (SPEC §9) whose chosen layers add
a parallel cross-attention read of chunks retrieved from the model's own input context.

Everything ReGLA has (`ReglaConfig`'s fields, the hybrid `softmax_layers` included) plus the retrieval
options below, and the SCOUT Mamba-1 mixer as an alternative recurrent mixer (`mixer="mamba"`).
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict

from ..regla.configuration_regla import ReglaConfig
from ..scout.configuration_scout import ScoutConfig

MIXERS = ("regla", "mamba")
SUMMARIES = ("mean", "max")
QUERY_SOURCES = ("mixer_output", "input")
MIXINGS = ("parallel_gate", "residual_gate")


@strict
class ResonaConfig(ReglaConfig):
    r"""
    ReGLA's fields (`configuration_regla.py`), plus:

    mixer (`str`, defaults to `"regla"`):
        The recurrent token mixer of the non-softmax layers: `"regla"` (ReGLA's gated linear attention)
        or `"mamba"` (SCOUT's Mamba-1 mixer, transformers' `MambaMixer` parameters, its fields below).
    retrieval_layers (`list[int]` or `str`, *optional*):
        Layers that add the retrieval read; `None`: the last recurrent layer; `"all"`: every recurrent layer.
        Softmax layers (`softmax_layers`) cannot retrieve: they already attend to everything.
    retrieval_chunk_size (`int`, defaults to 64):
        C: a row's real tokens form chunks of C consecutive content positions (pads never count).
    retrieval_top_k (`int`, *optional*, defaults to 4):
        Chunks read per token and head; `None`: every completed chunk.
    retrieval_summary (`str`, defaults to `"mean"`):
        A chunk's summary: the mean (`"mean"`) or the elementwise max (`"max"`) of its tokens' read keys.
    retrieval_query (`str`, defaults to `"mixer_output"`):
        What scores the summaries at token t: the recurrent mixer's output at t (`"mixer_output"`, which
        carries the state) or the layer input at t (`"input"`), through `score_proj`.
    retrieval_score_bias (`bool`, defaults to `True`):
        Add a selected chunk's score to the read logits of its tokens: the path by which the selection
        learns (top-k itself has no gradient). False: the read is plain softmax attention over the chunks.
    retrieval_own_chunk (`bool`, defaults to `False`):
        Also read the token's own (incomplete) chunk under a causal mask (bias 0), besides the top-k
        chunks completed before it.
    retrieval_mixing (`str`, defaults to `"parallel_gate"`):
        With M the mixer's output, R the read and g the gate: `"parallel_gate"` y = (1 − g) ⊙ M + g ⊙ R;
        `"residual_gate"` y = M + g ⊙ R.
    retrieval_gate_init (`float`, defaults to 0.0):
        α's initial value in g_t = tanh(α) ⊙ σ(W_g x_t + b_g) (α per channel). 0: the model starts as
        exactly the plain recurrent model.
    state_size, expand, conv_kernel, use_conv_bias, time_step_rank, time_step_scale, time_step_min,
    time_step_max, time_step_init_scheme, time_step_floor:
        Mamba-1 fields (`mixer="mamba"` only), with SCOUT's names and defaults (`ScoutConfig`).
    """

    model_type = "resona"

    mixer: str = "regla"
    retrieval_layers: list[int] | str | None = None
    retrieval_chunk_size: int = 64
    retrieval_top_k: int | None = 4
    retrieval_summary: str = "mean"
    retrieval_query: str = "mixer_output"
    retrieval_score_bias: bool = True
    retrieval_own_chunk: bool = False
    retrieval_mixing: str = "parallel_gate"
    retrieval_gate_init: float = 0.0

    state_size: int = 16
    expand: int = 2
    conv_kernel: int = 4
    use_conv_bias: bool = True
    time_step_rank: int | str = 128
    time_step_scale: float = 1.0
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_init_scheme: str = "random"
    time_step_floor: float = 1e-4

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)  # ReGLA's checks; softmax_layers resolved to a list
        self._check_retrieval()
        recurrent = [i for i in range(self.num_hidden_layers) if i not in self.softmax_layers]
        layers = self.retrieval_layers
        if layers is None:
            self.retrieval_layers = recurrent[-1:]
        elif layers == "all":
            self.retrieval_layers = recurrent
        else:
            self.retrieval_layers = sorted(layers)
        on_softmax = [i for i in self.retrieval_layers if i in self.softmax_layers]
        if on_softmax:
            raise ValueError(f"ResonaConfig.retrieval_layers {on_softmax} are softmax layers (softmax_layers="
                             f"{self.softmax_layers}); Resona augments recurrent layers")

    def _check_retrieval(self) -> None:
        def positive(name, allow_none=False):
            value = getattr(self, name)
            if allow_none and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ResonaConfig.{name} must be an integer >= 1, got {value!r}")

        positive("retrieval_chunk_size")
        positive("retrieval_top_k", allow_none=True)
        for name, allowed in (("mixer", MIXERS), ("retrieval_summary", SUMMARIES), ("retrieval_query", QUERY_SOURCES),
                              ("retrieval_mixing", MIXINGS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"ResonaConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        layers = self.retrieval_layers
        if layers is not None and layers != "all":
            if isinstance(layers, str) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
                raise ValueError(f"ResonaConfig.retrieval_layers must be a list of layer indices, 'all' or None, "
                                 f"got {layers!r}")
            bad = [i for i in layers if not 0 <= i < self.num_hidden_layers]
            if bad or len(set(layers)) != len(layers):
                raise ValueError(f"ResonaConfig.retrieval_layers {layers!r} must be distinct indices in "
                                 f"[0, {self.num_hidden_layers})")
        if self.mixer == "mamba":
            for name in ("state_size", "expand", "conv_kernel"):
                positive(name)
            if self.time_step_rank != "auto":
                positive("time_step_rank")

    def is_retrieval_layer(self, layer_idx: int) -> bool:
        return layer_idx in self.retrieval_layers

    # The MambaConfig SCOUT's mixer is built from: the same fields, so the same function.
    mamba_config = ScoutConfig.mamba_config


__all__ = ["ResonaConfig"]
