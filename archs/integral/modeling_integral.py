"""Integral attention (arXiv 2508.18387, SPEC §6) in a Llama-shaped model.

In the integral layers φ = softmax((1/S) Σ_s Q^s K^sᵀ · scale) with Q^s, K^s the s-th column slice of
each head's q and k. Since those slices partition the head, Σ_s Q^s K^sᵀ = Q Kᵀ: this is vanilla
attention at scale `scale / S` (with rope_mode "per_signal": vanilla attention whose RoPE applies the
(d_h/S)-dimensional frequencies to each signal, i.e. each frequency repeated S times). The fused path
is therefore transformers' own attention call with `self.scaling` changed; the "signals" path computes
the S products one by one. Everything else (MLP, norms, DynamicCache) is transformers' Llama.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from .configuration_integral import IntegralConfig
from .reference import integral_attention_signals


def per_signal_rotary(cos: torch.Tensor, sin: torch.Tensor, num_signals: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (B, T, d_h) of the full-head RoPE -> those of a (d_h/S)-dimensional RoPE, (B, T, d_h/S).
    The full head's frequencies are θ^(-2i/d_h); a signal's are θ^(-2i/(d_h/S)) = the full head's at
    i·S, so they are gathered, not recomputed (also keeps any rope scaling factor)."""
    half = cos.shape[-1] // 2
    idx = torch.arange(0, half, num_signals, device=cos.device)
    return torch.cat([cos[..., idx]] * 2, dim=-1), torch.cat([sin[..., idx]] * 2, dim=-1)


class IntegralAttention(LlamaAttention):
    def __init__(self, config: IntegralConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.num_signals = config.num_signals
        self.signal_dim = self.head_dim // config.num_signals
        self.rope_mode = config.rope_mode
        self.signal_scaling = (self.signal_dim if config.signal_scale == "signal_dim" else self.head_dim) ** -0.5
        # (1/S) Σ_s Q^s K^sᵀ · scale = Q Kᵀ · scale / S: the fused call needs exactly this scale
        self.scaling = self.signal_scaling / self.num_signals

    def rotate(self, q, k, cos, sin):
        if self.rope_mode == "full_head":
            return apply_rotary_pos_emb(q, k, cos, sin)
        cos, sin = per_signal_rotary(cos, sin, self.num_signals)
        signals = (*q.shape[:-1], self.num_signals, self.signal_dim)
        q, k = q.reshape(signals), k.reshape(*k.shape[:-1], self.num_signals, self.signal_dim)
        q, k = apply_rotary_pos_emb(q, k, cos[:, :, None], sin[:, :, None])  # rotate_half within each signal
        return q.flatten(-2), k.flatten(-2)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query_states, key_states = self.rotate(query_states, key_states, cos, sin)
        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
        if self.config.integral_path == "signals":
            attn_output = integral_attention_signals(query_states, key_states, value_states, self.num_signals,
                                                     self.signal_scaling, attention_mask)
            attn_weights = None
        else:
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                        eager_attention_forward)
            attn_output, attn_weights = attention_interface(
                self, query_states, key_states, value_states, attention_mask,
                dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **kwargs)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class IntegralDecoderLayer(LlamaDecoderLayer):
    """A Llama decoder layer, with integral attention where `config.integral_layers` says. One skippable unit."""

    def __init__(self, config: IntegralConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        if layer_idx in config.integral_layers:
            self.self_attn = IntegralAttention(config=config, layer_idx=layer_idx)


class IntegralPreTrainedModel(LlamaPreTrainedModel):
    config_class = IntegralConfig
    _no_split_modules = ["IntegralDecoderLayer"]


class IntegralModel(IntegralPreTrainedModel, LlamaModel):
    def __init__(self, config: IntegralConfig):
        IntegralPreTrainedModel.__init__(self, config)  # not LlamaModel.__init__: it would build plain layers
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([IntegralDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class IntegralForCausalLM(IntegralPreTrainedModel, LlamaForCausalLM):
    def __init__(self, config: IntegralConfig):
        IntegralPreTrainedModel.__init__(self, config)
        self.model = IntegralModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


__all__ = ["IntegralAttention", "IntegralForCausalLM", "IntegralModel", "IntegralPreTrainedModel"]
