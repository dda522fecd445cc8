"""DTRNet configuration (SPEC §5): a Llama configuration plus the routing options."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

ROUTED_ATTENTION_PATHS = ("masked", "packed")


def default_dense_layers(num_layers: int) -> list[int]:
    """The released list `[2, 4, ..., L-2]` (named `dtrnet_layers` there) names the DENSE layers, so layers
    0, 1, every odd layer and the last one are routed. For odd L the list stops at the last even index < L-1."""
    return list(range(2, num_layers - 1, 2))


@strict
class DTRNetConfig(LlamaConfig):
    r"""
    Llama fields, plus:

    dense_layers (`list[int]`, *optional*): layers with plain attention for every token; all the others are
        routed. Default `[2, 4, ..., L-2]`, the released list.
    aux_loss_coef (`float`, default 8e-4): λ of the router loss `λ · Σ_l f_l · mean(p_attn,l) / Σ_l f_l`, added
        to the LM loss in training when labels are given.
    random_route_fraction (`float`, default 0.0): in training, if no real token of the batch is routed in a
        layer, route this fraction of them at random (the released code does it with 0.15). Off by default:
        it draws from the torch RNG, so a training forward would no longer equal the sampler's.
    routed_attention (`str`, default "masked"): "masked" attends over all tokens of a chunk with the routed
        mask (eager or SDPA, whichever `attn_implementation` is); "packed" gathers the routed tokens of each
        row and scores only those (plain torch, one SDPA call per row). `flash_attention_2` always packs.
    """

    model_type = "dtrnet"

    dense_layers: list[int] | None = None
    aux_loss_coef: float = 8e-4
    random_route_fraction: float = 0.0
    routed_attention: str = "masked"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.dense_layers is None:
            self.dense_layers = default_dense_layers(self.num_hidden_layers)
        self.dense_layers = sorted(self.dense_layers)
        bad = [i for i in self.dense_layers if not 0 <= i < self.num_hidden_layers]
        if bad or len(set(self.dense_layers)) != len(self.dense_layers):
            raise ValueError(f"dense_layers={self.dense_layers} must be distinct layer indices in "
                             f"[0, {self.num_hidden_layers}) (num_hidden_layers={self.num_hidden_layers})")
        if self.aux_loss_coef < 0:
            raise ValueError(f"aux_loss_coef={self.aux_loss_coef} must be >= 0")
        if not 0.0 <= self.random_route_fraction <= 1.0:
            raise ValueError(f"random_route_fraction={self.random_route_fraction} must be in [0, 1]")
        if self.routed_attention not in ROUTED_ATTENTION_PATHS:
            raise ValueError(f"routed_attention={self.routed_attention!r} must be one of {ROUTED_ATTENTION_PATHS}")
        if self.attention_dropout:
            raise ValueError(f"attention_dropout={self.attention_dropout} must be 0: a bypass token is attention "
                             f"with one key, and dropout would drop it")
        if self.hidden_size % 2:
            raise ValueError(f"hidden_size={self.hidden_size} must be even (the router's hidden width is d/2)")
