"""Resona (SPEC.md §8, arXiv 2503.22913): a linear recurrent model (ReGLA, or SCOUT's Mamba-1 mixer) whose
chosen layers read chunks retrieved from the model's own input context, in a branch parallel to the
recurrent mixer (the same normed layer input x):

    M_t = Mixer(x)_t                                    the recurrent mixer (ReGLA's, unchanged)
    r_t = W_s M_t  (or W_s x_t)                         the selection query, per head
    s_{t,c} = r_t · summary_c / √D,   summary_c = mean of chunk c's read keys k_j = W_k x_j
    P_t = top-k over {c : (c+1)·C ≤ p_t} of s_{t,c}     chunks completed before t (content positions)
    R_t = W_o · softmax_{j ∈ P_t} (q_t · k_j / √D + s_{t,c(j)}) v_j,   q_t = W_q x_t, v_j = W_v x_j
    g_t = tanh(α) ⊙ σ(W_g x_t + b_g)
    y_t = (1 − g_t) ⊙ M_t + g_t ⊙ R_t   (parallel_gate)   or   M_t + g_t ⊙ R_t   (residual_gate)

then `h += y; h += MLP(norm h)`, as ReGLA's layer. α = 0 (the default initial value) gives exactly the
plain recurrent model. The read keeps every real token's K/V of a retrieval layer, so the memory of
an augmented model grows with the number of tokens N (2·H·D per token and retrieval layer, plus H·D
per chunk): it is no longer an O(1)-state model. Top-k is discontinuous: where two chunk scores tie to
within float error, the decode path and the full forward may pick different chunks.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm
from transformers.models.mamba.modeling_mamba import MambaMixer

from reft_kernels.gla import accumulator_dtype

from ..regla.modeling_regla import (
    ReglaAttention,
    ReglaForCausalLM,
    ReglaModel,
    ReglaPreTrainedModel,
)
from ..scout.modeling_scout import ScoutMambaMixer
from .cache_resona import ResonaCache
from .configuration_resona import ResonaConfig
from .retrieval import (
    content_positions,
    content_slots,
    gathered_read,
    read_entries,
    select_chunks,
    update_summaries,
)


class ResonaRetrieval(nn.Module):
    """The retrieval branch of one layer: chunk the context, pick the top-k chunks, read them, gate the
    read into the mixer's output."""

    def __init__(self, config: ResonaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.chunk_size = config.retrieval_chunk_size
        self.top_k = config.retrieval_top_k
        self.summary = config.retrieval_summary
        self.query_source = config.retrieval_query
        self.score_bias = config.retrieval_score_bias
        self.own_chunk = config.retrieval_own_chunk
        self.mixing = config.retrieval_mixing
        self.scale = self.head_dim**-0.5
        hidden, width = config.hidden_size, config.num_attention_heads * config.head_dim
        self.q_proj = nn.Linear(hidden, width, bias=False)
        self.k_proj = nn.Linear(hidden, width, bias=False)
        self.v_proj = nn.Linear(hidden, width, bias=False)
        self.score_proj = nn.Linear(hidden, width, bias=False)
        self.o_proj = nn.Linear(width, hidden, bias=False)
        self.gate_proj = nn.Linear(hidden, hidden, bias=True)
        self.gate_scale = nn.Parameter(torch.full((hidden,), float(config.retrieval_gate_init)))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    def attend(self, x, mixer_out, valid, cache: ResonaCache | None = None, return_selection: bool = False):
        """The per-head read (B, H, T, D) in float32 (float64 for float64 models), before W_o; stores this
        chunk's K/V and the chunks it completes in `cache`. `return_selection`: also the picked chunks'
        indices and whether each pick is a real chunk, (B, H, T, k) each (for analysis)."""
        b, t, _ = x.shape
        acc = accumulator_dtype(x.dtype)
        if cache is not None:
            seen_before, columns = cache.seen_tokens, cache.columns
            old_keys, old_values, old_summaries = cache.chunk_store(self.layer_idx)
        else:
            seen_before, columns = torch.zeros(b, dtype=torch.long, device=x.device), 0
            old_keys = old_values = old_summaries = None
        positions = content_positions(valid, seen_before)
        seen_after = seen_before + valid.sum(dim=1)
        width = columns + t
        keys = content_slots(old_keys, self._heads(self.k_proj(x)), valid, seen_before, width)
        values = content_slots(old_values, self._heads(self.v_proj(x)), valid, seen_before, width)
        summaries = update_summaries(keys.to(acc), old_summaries, seen_before, seen_after, self.chunk_size, t,
                                     self.summary)
        if cache is not None:
            cache.store_chunks(self.layer_idx, keys, values, summaries)
        r = self._heads(self.score_proj(mixer_out if self.query_source == "mixer_output" else x)).to(acc)
        index, real, score = select_chunks(r, summaries, positions, valid, self.chunk_size, self.top_k, self.scale)
        slots, visible, bias = read_entries(index, real, score, positions, valid, self.chunk_size, self.own_chunk,
                                            self.score_bias)
        q = self._heads(self.q_proj(x)).to(acc)
        read = gathered_read(q, keys, values, slots, visible, bias, self.scale)
        return (read, (index, real)) if return_selection else read

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """g_t = tanh(α) ⊙ σ(W_g x_t + b_g), (B, T, hidden)."""
        return torch.tanh(self.gate_scale) * torch.sigmoid(self.gate_proj(x))

    def forward(self, x, mixer_out, valid, cache: ResonaCache | None = None) -> torch.Tensor:
        read = self.attend(x, mixer_out, valid, cache)
        b, _, t, _ = read.shape
        read = self.o_proj(read.transpose(1, 2).reshape(b, t, -1).to(x.dtype))
        g = self.gate(x)
        if self.mixing == "parallel_gate":
            return (1 - g) * mixer_out + g * read
        return mixer_out + g * read


class ResonaDecoderLayer(GradientCheckpointingLayer):
    """ReGLA's layer (same module names, so a ReGLA state_dict loads) with the retrieval branch beside the
    mixer in the retrieval layers; the mixer is ReGLA's, Llama's softmax attention (hybrid layers), or
    SCOUT's Mamba-1 mixer (named `mixer`, SCOUT's name, so its weights load 1:1)."""

    def __init__(self, config: ResonaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_softmax = config.is_softmax_layer(layer_idx)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if self.is_softmax:
            self.self_attn = LlamaAttention(config, layer_idx)
        elif config.mixer == "regla":
            self.self_attn = ReglaAttention(config, layer_idx)
        else:
            self.mixer = ScoutMambaMixer(config, layer_idx)
        self.retrieval = ResonaRetrieval(config, layer_idx) if config.is_retrieval_layer(layer_idx) else None
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, hidden_states, valid, position_embeddings=None, attention_mask=None, past_key_values=None,
                **kwargs):
        x = self.input_layernorm(hidden_states)
        if self.is_softmax:
            mixed, _ = self.self_attn(x, position_embeddings=position_embeddings, attention_mask=attention_mask,
                                      past_key_values=past_key_values)
        elif hasattr(self, "mixer"):
            mixed = self.mixer(x, valid, past_key_values)
        else:
            mixed = self.self_attn(x, valid, past_key_values)
        if self.retrieval is not None:
            mixed = self.retrieval(x, mixed, valid, past_key_values)
        h = hidden_states + mixed
        return h + self.mlp(self.post_attention_layernorm(h))


class ResonaPreTrainedModel(ReglaPreTrainedModel):
    config: ResonaConfig
    config_class = ResonaConfig
    _no_split_modules = ["ResonaDecoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ResonaRetrieval):
            init.constant_(module.gate_scale, float(self.config.retrieval_gate_init))
        if isinstance(module, MambaMixer):  # as ScoutPreTrainedModel: S4D-real A, D = 1, its dt init
            module.init_mamba_weights()
            init.kaiming_uniform_(module.conv1d.weight, a=math.sqrt(5))
            if module.conv1d.bias is not None:
                init.zeros_(module.conv1d.bias)
            init.kaiming_uniform_(module.out_proj.weight, a=math.sqrt(5))


class ResonaModel(ResonaPreTrainedModel, ReglaModel):
    """ReGLA's model (its forward: validity, seen counts, positions, the cache's begin/end) over Resona
    layers and a `ResonaCache`."""

    decoder_layer_class = ResonaDecoderLayer
    cache_class = ResonaCache


class ResonaForCausalLM(ResonaPreTrainedModel, ReglaForCausalLM):
    """ReGLA's causal LM (forward, generate() with the family's own cache) over a `ResonaModel`."""

    base_model_class = ResonaModel


__all__ = ["ResonaForCausalLM", "ResonaModel", "ResonaPreTrainedModel", "ResonaRetrieval"]
