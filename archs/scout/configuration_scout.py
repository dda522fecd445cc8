"""SCOUT configuration (SPEC.md §4, arXiv 2509.00935).

A SCOUT model is a stack of double blocks; `num_hidden_layers` counts double blocks. Each block is
`h += Mixer(norm₁ h); h += MLP(norm₂ h); h += ScoutAttn(norm₃ h); h += MLP₂(norm₄ h)`, the mixer being
causal sliding-window attention (`mixer="swa"`) or Mamba-1 (`mixer="mamba"`), and ScoutAttn letting
each token attend to itself and to the checkpoint tokens before it (content position ≡ S−1 mod S).
"""

from __future__ import annotations

from typing import ClassVar

from huggingface_hub.dataclasses import strict
from transformers import MambaConfig, PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

MIXERS = ("swa", "mamba")


@strict
class ScoutConfig(PreTrainedConfig):
    r"""
    segment_size (`int`, defaults to 10):
        S: token j is a checkpoint iff its content position ≡ S−1 (mod S). S = 1 is plain causal attention.
    mixer (`str`, defaults to `"swa"`):
        The first token mixer of each double block: `"swa"` (causal sliding-window attention) or `"mamba"`.
    sliding_window (`int`, defaults to 1024):
        w: for `mixer="swa"`, key j is visible to query i iff i − w < j ≤ i (w keys including the query).
    state_size, expand, conv_kernel, use_conv_bias, time_step_rank, time_step_scale, time_step_min,
    time_step_max, time_step_init_scheme, time_step_floor:
        Mamba-1 fields with `MambaConfig`'s names and defaults, except `time_step_rank` (128, the released
        configs' value; `"auto"` is `ceil(hidden_size / 16)`, for tiny models).
    rope_theta (keyword, defaults to 1e6): stored in `rope_parameters["rope_theta"]`.
    """

    model_type = "scout"
    keys_to_ignore_at_inference = ["past_key_values"]
    default_theta: ClassVar[float] = 1_000_000.0

    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 2048
    num_hidden_layers: int = 6
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
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    segment_size: int = 10
    mixer: str = "swa"
    sliding_window: int = 1024

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
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self._check()
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)

    def _check(self) -> None:
        def positive(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ScoutConfig.{name} must be an integer >= 1, got {value!r}")

        for name in ("segment_size", "sliding_window", "hidden_size", "num_attention_heads",
                     "num_key_value_heads", "num_hidden_layers", "intermediate_size", "state_size", "expand",
                     "conv_kernel"):
            positive(name)
        if self.mixer not in MIXERS:
            raise ValueError(f"ScoutConfig.mixer must be one of {MIXERS}, got {self.mixer!r}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                             f"({self.num_attention_heads}); set head_dim explicitly")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) is not divisible by "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        head_dim = self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        if self.time_step_rank != "auto" and (isinstance(self.time_step_rank, bool)
                                              or not isinstance(self.time_step_rank, int) or self.time_step_rank < 1):
            raise ValueError(f"ScoutConfig.time_step_rank must be 'auto' or an integer >= 1, got {self.time_step_rank!r}")
        if self.time_step_init_scheme not in ("random", "constant"):
            raise ValueError(f"ScoutConfig.time_step_init_scheme must be 'random' or 'constant', "
                             f"got {self.time_step_init_scheme!r}")
        if not 0 < self.time_step_min <= self.time_step_max:
            raise ValueError(f"need 0 < time_step_min <= time_step_max, got {self.time_step_min}, {self.time_step_max}")

    # Read by transformers' LlamaMLP: SCOUT has no biases.
    @property
    def mlp_bias(self) -> bool:
        return False

    def mamba_config(self) -> MambaConfig:
        """The `MambaConfig` a `MambaMixer` of this model is built from (same field names and values)."""
        return MambaConfig(
            hidden_size=self.hidden_size, state_size=self.state_size, expand=self.expand,
            conv_kernel=self.conv_kernel, use_bias=False, use_conv_bias=self.use_conv_bias,
            hidden_act=self.hidden_act, time_step_rank=self.time_step_rank, time_step_scale=self.time_step_scale,
            time_step_min=self.time_step_min, time_step_max=self.time_step_max,
            time_step_init_scheme=self.time_step_init_scheme, time_step_floor=self.time_step_floor,
            num_hidden_layers=self.num_hidden_layers, vocab_size=self.vocab_size,
            initializer_range=self.initializer_range, pad_token_id=None, bos_token_id=None, eos_token_id=None,
        )


__all__ = ["ScoutConfig"]
