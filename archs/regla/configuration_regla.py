"""ReGLA configuration (SPEC.md §9, arXiv 2502.01578).

A ReGLA model is a Llama-shaped stack of pre-norm decoder layers, `h += Mixer(norm h); h += MLP(norm h)`,
whose mixer is refined gated linear attention (ReGLA) or, in the layers named by `softmax_layers`,
Llama's softmax attention (the hybrid).
"""

from __future__ import annotations

from typing import ClassVar

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

GATE_AXES = ("key", "value")
NORM_TYPES = ("rmsnorm", "layernorm")
GLA_BACKENDS = ("torch", "triton", "fla")


@strict
class ReglaConfig(PreTrainedConfig):
    r"""
    feature_dim (`int`, *optional*):
        Dk, the per-head dimension of q and k (the feature maps' dimension, `m` in the variance scale);
        defaults to `head_dim`. Values have `head_dim` per head.
    gate_axis (`str`, defaults to `"key"`):
        The forget gate multiplies the state along the key (feature) axis, as GLA's `gk`, or along the
        value axis (`"value"`, as GLA's `gv`).
    refining_gate (`bool`, defaults to `True`):
        F = (1 − r) g² + r (1 − (1 − g)²) with g = σ(W_g x + b_g), r = σ(W_r x + b_r). False: r ≡ 0, F = g².
    gate_rank (`int`, *optional*, defaults to 16):
        W_g and W_r are rank-`gate_rank` products (hidden → rank → gate features, bias on the second);
        `None` makes them full-rank.
    output_gate (`bool`, defaults to `True`):
        Multiply the normalised output by SiLU(W_og x) before W_o.
    norm_type (`str`, defaults to `"rmsnorm"`):
        The per-head output normalisation: `"rmsnorm"` or `"layernorm"` (eps `rms_norm_eps`).
    chunk_size (`int`, defaults to 16):
        Tokens per chunk of the chunked GLA form (prefill and training; decode is one recurrent step).
    gla_backend (`str`, defaults to `"torch"`):
        The chunked form: `"torch"` (plain torch), `"triton"` (our kernel, CUDA or TRITON_INTERPRET=1)
        or `"fla"` (flash-linear-attention's chunk_gla, CUDA). Both fast paths need `gate_axis="key"`.
    softmax_layers (`list[int]` or `"half"`, *optional*):
        Layers whose mixer is Llama softmax attention (RoPE, GQA). `"half"` means the odd layers
        1, 3, 5, ... (half the layers, interleaved). Empty: a pure ReGLA model.
    rope_theta (keyword, defaults to 10000): stored in `rope_parameters["rope_theta"]`; softmax layers only.
    """

    model_type = "regla"
    keys_to_ignore_at_inference = ["past_key_values"]
    default_theta: ClassVar[float] = 10_000.0

    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 8192
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    feature_dim: int | None = None
    gate_axis: str = "key"
    refining_gate: bool = True
    gate_rank: int | None = 16
    output_gate: bool = True
    norm_type: str = "rmsnorm"
    chunk_size: int = 16
    gla_backend: str = "torch"
    softmax_layers: list[int] | str | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self._check()
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.feature_dim is None:
            self.feature_dim = self.head_dim
        if self.softmax_layers is None:
            self.softmax_layers = []
        elif self.softmax_layers == "half":
            self.softmax_layers = list(range(1, self.num_hidden_layers, 2))
        else:
            self.softmax_layers = sorted(self.softmax_layers)
        super().__post_init__(**kwargs)

    def _check(self) -> None:
        def positive(name, allow_none=False):
            value = getattr(self, name)
            if allow_none and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ReglaConfig.{name} must be an integer >= 1, got {value!r}")

        for name in ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
                     "intermediate_size", "chunk_size"):
            positive(name)
        for name in ("feature_dim", "gate_rank", "head_dim"):
            positive(name, allow_none=True)
        if self.gate_axis not in GATE_AXES:
            raise ValueError(f"ReglaConfig.gate_axis must be one of {GATE_AXES}, got {self.gate_axis!r}")
        if self.norm_type not in NORM_TYPES:
            raise ValueError(f"ReglaConfig.norm_type must be one of {NORM_TYPES}, got {self.norm_type!r}")
        if self.gla_backend not in GLA_BACKENDS:
            raise ValueError(f"ReglaConfig.gla_backend must be one of {GLA_BACKENDS}, got {self.gla_backend!r}")
        if self.gla_backend != "torch" and self.gate_axis != "key":
            raise ValueError(f"gla_backend={self.gla_backend!r} computes a key-axis gate only; "
                             f"gate_axis={self.gate_axis!r} needs gla_backend='torch'")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                             f"({self.num_attention_heads}); set head_dim explicitly")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) is not divisible by "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        layers = self.softmax_layers
        if layers is not None and layers != "half":
            if isinstance(layers, str) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
                raise ValueError(f"ReglaConfig.softmax_layers must be a list of layer indices or 'half', got {layers!r}")
            bad = [i for i in layers if not 0 <= i < self.num_hidden_layers]
            if bad or len(set(layers)) != len(layers):
                raise ValueError(f"ReglaConfig.softmax_layers {layers!r} must be distinct indices in "
                                 f"[0, {self.num_hidden_layers})")
        if self.softmax_layers:
            head_dim = self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads
            if head_dim % 2:
                raise ValueError(f"RoPE in the softmax layers needs an even head_dim, got {head_dim}")

    # Read by transformers' LlamaMLP: no biases.
    @property
    def mlp_bias(self) -> bool:
        return False

    def is_softmax_layer(self, layer_idx: int) -> bool:
        return layer_idx in self.softmax_layers


__all__ = ["ReglaConfig"]
