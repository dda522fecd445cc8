"""ReGLA (SPEC.md §9, arXiv 2502.01578): refined gated linear attention, optionally hybrid with Llama
softmax attention in chosen layers.

    S_t = F̃_t ⊙ S_{t−1} + φ(k_t) v_tᵀ,   o_t = W_o · Norm(S_tᵀ φ(q_t) · c)   (· SiLU(W_og x) with the output gate)

φ_q = exp(q − max_features q); φ_k = exp(k − m_t), m_t the running max of k over features and this row's
real tokens; log F̃_t = log F_t + m_{t−1} − m_t (the max folded into the gate, exact since Norm is
scale-invariant); c = 1/(e·√(m(e²−1))); F the refining gate. Pads: gate 1, v = 0, φ_k = 0, not in
the max, so a pad leaves the state and the max exactly as they were.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from reft_kernels.gla import (
    accumulator_dtype,
    chunked_gla,
    decode_gla,
    fla_chunked_gla,
    triton_chunked_gla,
)

from .cache_regla import ReglaCache
from .configuration_regla import ReglaConfig
from .feature_maps import query_features, refined_log_gate, shifted_keys, variance_scale


def gate_projection(hidden: int, out: int, rank: int | None) -> nn.Module:
    """W x + b, full-rank or as a rank-`rank` product (bias on the second factor)."""
    if rank is None:
        return nn.Linear(hidden, out, bias=True)
    return nn.Sequential(nn.Linear(hidden, rank, bias=False), nn.Linear(rank, out, bias=True))


def gate_bias(projection: nn.Module) -> nn.Parameter:
    """The bias b of a `gate_projection`."""
    return (projection[-1] if isinstance(projection, nn.Sequential) else projection).bias


class ReglaAttention(nn.Module):
    """The ReGLA token mixer. Prefill and training run the chunked form, a one-token step with a cache
    runs the recurrent decode update; both get their gate and keys from `gla_inputs`."""

    def __init__(self, config: ReglaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.feature_dim = config.feature_dim
        self.head_dim = config.head_dim
        self.gate_axis = config.gate_axis
        self.chunk_size = config.chunk_size
        self.backend = config.gla_backend
        self.scale = variance_scale(config.feature_dim)
        hidden, heads = config.hidden_size, config.num_attention_heads
        self.q_proj = nn.Linear(hidden, heads * self.feature_dim, bias=False)
        self.k_proj = nn.Linear(hidden, heads * self.feature_dim, bias=False)
        self.v_proj = nn.Linear(hidden, heads * self.head_dim, bias=False)
        self.gate_dim = self.feature_dim if config.gate_axis == "key" else self.head_dim
        self.forget_proj = gate_projection(hidden, heads * self.gate_dim, config.gate_rank)
        self.refine_proj = gate_projection(hidden, heads * self.gate_dim, config.gate_rank) if config.refining_gate else None
        self.out_gate_proj = nn.Linear(hidden, heads * self.head_dim, bias=False) if config.output_gate else None
        if config.norm_type == "rmsnorm":
            self.norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        else:
            self.norm = nn.LayerNorm(self.head_dim, eps=config.rms_norm_eps)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=False)

    def _heads(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, dim).transpose(1, 2)

    def log_forget_gate(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """log F (B, H, T, gate_dim), ≤ 0 and finite."""
        acc = accumulator_dtype(hidden_states.dtype)
        a = self._heads(self.forget_proj(hidden_states), self.gate_dim).to(acc)
        b = None if self.refine_proj is None else self._heads(self.refine_proj(hidden_states), self.gate_dim).to(acc)
        return refined_log_gate(a, b)

    def gla_inputs(self, hidden_states, valid, running_max):
        """φ_q, φ_k, v, gk, gv (one of them None) in float32/64, and the running max after the chunk."""
        acc = accumulator_dtype(hidden_states.dtype)
        q = self._heads(self.q_proj(hidden_states), self.feature_dim).to(acc)
        k = self._heads(self.k_proj(hidden_states), self.feature_dim).to(acc)
        v = self._heads(self.v_proj(hidden_states), self.head_dim).to(acc)
        real = valid[:, None, :, None]
        phi_k, shift, new_max = shifted_keys(k, valid, running_max)
        v = torch.where(real, v, torch.zeros_like(v))
        log_gate = torch.where(real, self.log_forget_gate(hidden_states) + shift[..., None], 0.0)
        gk, gv = (log_gate, None) if self.gate_axis == "key" else (None, log_gate)
        return query_features(q), phi_k, v, gk, gv, new_max

    def _chunked(self, q, k, v, gk, gv, state):
        if self.backend == "torch":
            return chunked_gla(q, k, v, gk, gv, scale=self.scale, initial_state=state, chunk_size=self.chunk_size)
        run = triton_chunked_gla if self.backend == "triton" else fla_chunked_gla
        return run(q, k, v, gk, scale=self.scale, initial_state=state)

    def forward(self, hidden_states, valid, cache: ReglaCache | None = None):
        state, running_max = cache.gla_state(self.layer_idx) if cache is not None else (None, None)
        q, k, v, gk, gv, new_max = self.gla_inputs(hidden_states, valid, running_max)
        if cache is not None and hidden_states.size(1) == 1:  # the sampler's recurrent step
            step = [None if x is None else x[:, :, 0] for x in (q, k, v, gk, gv)]
            o, state = decode_gla(*step, scale=self.scale, state=state)
            o = o[:, :, None]
        else:
            o, state = self._chunked(q, k, v, gk, gv, state)
        if cache is not None:
            cache.store_gla_state(self.layer_idx, state, new_max)
        return self.output(o, hidden_states)

    def output(self, o: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """W_o · (Norm(o) per head, · SiLU(W_og x)); o (B, H, T, Dv)."""
        b, _, t, _ = o.shape
        o = self.norm(o.transpose(1, 2).to(hidden_states.dtype))  # in the model's dtype (LlamaRMSNorm upcasts itself)
        if self.out_gate_proj is not None:
            o = o * F.silu(self.out_gate_proj(hidden_states).view(b, t, self.num_heads, self.head_dim))
        return self.o_proj(o.reshape(b, t, -1))


class ReglaDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm mixer + SwiGLU MLP, as Llama's layer; the unit layer skipping removes."""

    def __init__(self, config: ReglaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_softmax = config.is_softmax_layer(layer_idx)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx) if self.is_softmax else ReglaAttention(config, layer_idx)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, hidden_states, valid, position_embeddings=None, attention_mask=None, past_key_values=None,
                **kwargs):
        x = self.input_layernorm(hidden_states)
        if self.is_softmax:
            mixed, _ = self.self_attn(x, position_embeddings=position_embeddings, attention_mask=attention_mask,
                                      past_key_values=past_key_values)
        else:
            mixed = self.self_attn(x, valid, past_key_values)
        h = hidden_states + mixed
        return h + self.mlp(self.post_attention_layernorm(h))


class ReglaPreTrainedModel(PreTrainedModel):
    config: ReglaConfig
    config_class = ReglaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ReglaDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _is_stateful = True  # the recurrent state cannot be rolled back (no assisted generation)


def _chunk_validity(attention_mask, batch: int, length: int, past_columns: int, device) -> torch.Tensor:
    """(B, T) bool: which of this chunk's tokens are real. `attention_mask` is the 2-D padding mask of
    the chunk or of everything so far (what generate() passes)."""
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    if attention_mask.dim() != 2:
        raise ValueError(f"ReGLA takes a 2-D padding mask and builds its own masks; got {attention_mask.dim()}-D")
    if attention_mask.size(1) not in (length, past_columns + length):
        raise ValueError(f"attention_mask has {attention_mask.size(1)} columns for a chunk of {length} tokens "
                         f"after {past_columns} cached ones")
    return attention_mask[:, attention_mask.size(1) - length:].bool()


def softmax_mask(valid: torch.Tensor, key_valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, T, K) additive mask for the softmax layers, 0 where query column i sees key column j (a real
    key, j ≤ i) and dtype-min elsewhere; every query also sees itself, so a pad's softmax is never empty
    (its output is never read). Additive, not boolean: transformers' eager attention adds the mask it gets."""
    t, width = valid.size(1), key_valid.size(1)
    query_col = torch.arange(width - t, width, device=valid.device)[:, None]
    key_col = torch.arange(width, device=valid.device)[None, :]
    allowed = (key_valid[:, None, :] & (key_col <= query_col)[None]) | (key_col == query_col)[None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=valid.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


class ReglaModel(ReglaPreTrainedModel):
    # What a family built on ReGLA (Resona) replaces: the decoder layer and the cache it decodes with.
    decoder_layer_class = ReglaDecoderLayer
    cache_class = ReglaCache

    def __init__(self, config: ReglaConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([self.decoder_layer_class(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config) if config.softmax_layers else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_hidden_states=None, **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if past_key_values is not None and not isinstance(past_key_values, self.cache_class):
            raise TypeError(f"{type(self).__name__} needs a {self.cache_class.__name__}, "
                            f"got {type(past_key_values).__name__}")
        cache = past_key_values if past_key_values is not None else (self.cache_class() if use_cache else None)

        batch, length = inputs_embeds.shape[:2]
        valid = _chunk_validity(attention_mask, batch, length, cache.columns if cache is not None else 0,
                                inputs_embeds.device)
        has_softmax = any(layer.is_softmax for layer in self.layers)
        seen = cache.begin(valid, track_columns=has_softmax) if cache is not None else None
        position_embeddings = mask = None
        if has_softmax:
            if position_ids is None:  # content positions: real tokens seen before this one in its row
                before = seen[:, None] if seen is not None else 0
                positions = (before + valid.long().cumsum(dim=1) - 1).clamp(min=0)
            else:
                positions = position_ids.long().expand(batch, length)
            position_embeddings = self.rotary_emb(inputs_embeds, positions)
            mask = softmax_mask(valid, cache.column_valid if cache is not None else valid, inputs_embeds.dtype)

        hidden_states = inputs_embeds
        all_hidden = [hidden_states] if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(hidden_states, valid, position_embeddings=position_embeddings, attention_mask=mask,
                                  past_key_values=cache)
            if all_hidden is not None:
                all_hidden.append(hidden_states)
        if cache is not None:
            cache.end()
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden[-1] = hidden_states
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=cache if use_cache else None,
                                       hidden_states=tuple(all_hidden) if all_hidden is not None else None)


class ReglaForCausalLM(ReglaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    base_model_class = ReglaModel  # Resona replaces it

    def __init__(self, config: ReglaConfig):
        super().__init__(config)
        self.model = self.base_model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep: int | torch.Tensor = 0,
                output_hidden_states=None, **kwargs) -> CausalLMOutputWithPast:
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                             output_hidden_states=output_hidden_states)
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                      hidden_states=outputs.hidden_states)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate() gets the family's own cache (a ReglaCache), never a DynamicCache/StaticCache."""
        cache_class = self.model.cache_class
        if generation_config.cache_implementation is not None:
            raise ValueError(f"{type(self).__name__} generates with its own {cache_class.__name__}; cache_implementation="
                             f"{generation_config.cache_implementation!r} is not supported")
        if model_kwargs.get("past_key_values") is not None or generation_config.use_cache is False:
            return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        model_kwargs["past_key_values"] = cache_class()


__all__ = ["ReglaForCausalLM", "ReglaModel", "ReglaPreTrainedModel"]
