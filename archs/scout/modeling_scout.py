"""SCOUT (SPEC.md §4, arXiv 2509.00935): double blocks of a token mixer (causal sliding-window
attention or Mamba-1) and checkpoint attention, each followed by its own SwiGLU MLP.

    h += Mixer(norm₁ h);  h += MLP(norm₂ h);  h += ScoutAttn(norm₃ h);  h += MLP₂(norm₄ h)

ScoutAttn: token i attends, with one fp32 softmax, to {i} ∪ {j < i : pos_j ≡ S−1 (mod S)}, pos being the
per-row content position. Everything positional is defined on content positions, pads are no-ops,
and one element of `model.model.layers` (a double block) is the skippable unit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)
from transformers.models.mamba.modeling_mamba import MambaMixer

from reft_kernels.scout_attention import (
    checkpoint_attention,
    checkpoint_visible,
    is_checkpoint,
    masked_attention,
)

from .cache_scout import KVSlots, ScoutCache
from .configuration_scout import ScoutConfig


class _QKVO(nn.Module):
    """q/k/v/o projections (no biases, GQA) with RoPE on the whole head, as in Llama."""

    def __init__(self, config: ScoutConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)

    def project(self, hidden_states, position_embeddings):
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def output(self, attn: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = attn.shape
        return self.o_proj(attn.transpose(1, 2).reshape(b, t, -1))


class ScoutAttention(_QKVO):
    """Checkpoint attention. The chunk's own checkpoints are gathered (about T/S per row), so prefill
    scores are T × (1 + cached + T/S) and decode scores 1 × (1 + ⌊N/S⌋): never an N × N mask. A token
    joins the checkpoint cache after its own step has used the cache."""

    def __init__(self, config: ScoutConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.segment_size = config.segment_size

    def forward(self, hidden_states, position_embeddings, positions, valid, cache: ScoutCache | None = None):
        q, k, v = self.project(hidden_states, position_embeddings)
        chunk_is_checkpoint = is_checkpoint(positions, valid, self.segment_size)
        count = int(chunk_is_checkpoint.sum(dim=1).max())
        # T consecutive positions hold at most ⌈T/S⌉ checkpoints: a width set by T alone keeps rows independent
        width = max(-(-positions.size(1) // self.segment_size), count)
        chunk = KVSlots(k, v, positions, valid).compact(chunk_is_checkpoint, width)
        cached = cache.checkpoints(self.layer_idx) if cache is not None else None
        checkpoints = chunk if cached is None else cached.cat(chunk)
        visible = checkpoint_visible(positions, valid, checkpoints.positions, checkpoints.valid)
        out = checkpoint_attention(q, k, v, checkpoints.keys, checkpoints.values, visible, self.scaling)
        if cache is not None:
            cache.store_checkpoints(self.layer_idx, checkpoints)
        return self.output(out)


class ScoutSlidingWindowAttention(_QKVO):
    """Causal sliding-window attention: key j is visible to query i iff pos_i − w < pos_j ≤ pos_i,
    in prefill and in decode alike. The cache keeps the last w−1 K/V of each row."""

    def __init__(self, config: ScoutConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.sliding_window = config.sliding_window

    def forward(self, hidden_states, position_embeddings, positions, valid, cache: ScoutCache | None = None):
        q, k, v = self.project(hidden_states, position_embeddings)
        new = KVSlots(k, v, positions, valid)
        keys = new if cache is None else cache.update_window(self.layer_idx, new)
        kp, qp = keys.positions[:, None, :], positions[:, :, None]
        visible = valid[:, :, None] & keys.valid[:, None, :] & (kp <= qp) & (kp > qp - self.sliding_window)
        # every query sees its own key (a pad sees only itself, which keeps its softmax finite)
        t = positions.size(1)
        visible[:, :, keys.width - t:] |= torch.eye(t, dtype=torch.bool, device=visible.device)
        return self.output(masked_attention(q, keys.keys, keys.values, visible, self.scaling))


def selective_scan(x, dt, A, B, C, D, state=None):
    """Mamba-1 recurrence in float32 (float64 for float64 inputs): h_t = exp(dt_t A) h_{t−1} + dt_t B_t x_t,
    y_t = C_t h_t + D x_t. x, dt: (b, T, E); A: (E, N); B, C: (b, T, N); state: (b, E, N) or None (zeros).
    Returns y (b, T, E) and the last state. dt = 0 leaves the state exactly as it was (how pads pass)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    x, dt, A, B, C = (t.to(acc) for t in (x, dt, A, B, C))
    decay = torch.exp(dt[..., None] * A)  # (b, T, E, N)
    inject = (dt * x)[..., None] * B[:, :, None, :]
    h = x.new_zeros(x.size(0), x.size(2), A.size(1)) if state is None else state.to(acc)
    ys = []
    for t in range(x.size(1)):
        h = decay[:, t] * h + inject[:, t]
        ys.append((h * C[:, t, None, :]).sum(-1))
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(x.shape)
    return y + x * D.to(acc), h


class ScoutMambaMixer(MambaMixer):
    """transformers' `MambaMixer` (same parameters and names, so its state_dict loads 1:1, and its
    initialisation), with a forward that carries per-row state through SCOUT's cache: pads have input 0
    and dt 0 (the state passes through unchanged), the conv state is always the last conv_kernel − 1
    inputs (zeros before the first token), and a chunk may continue a non-empty cache."""

    def __init__(self, config: ScoutConfig, layer_idx: int):
        super().__init__(config.mamba_config(), layer_idx)

    def forward(self, hidden_states, valid, cache: ScoutCache | None = None):
        dtype = hidden_states.dtype
        keep = valid[..., None].to(dtype)
        x, gate = self.in_proj(hidden_states * keep).transpose(1, 2).chunk(2, dim=1)  # (B, E, T) each
        conv_state, ssm_state = cache.mamba_state(self.layer_idx) if cache is not None else (None, None)
        if conv_state is None:
            conv_state = x.new_zeros(x.size(0), x.size(1), self.conv_kernel_size - 1)
        window = torch.cat([conv_state, x], dim=-1)
        x = self.act(F.conv1d(window, self.conv1d.weight, self.conv1d.bias, groups=self.intermediate_size))
        x = x.transpose(1, 2) * keep  # (B, T, E)
        dt, B, C = torch.split(self.x_proj(x), [self.time_step_rank, self.ssm_state_size, self.ssm_state_size], -1)
        dt = F.softplus(self.dt_proj(dt)) * keep
        A = -torch.exp(self.A_log)
        y, ssm_state = selective_scan(x, dt, A, B, C, self.D, ssm_state)
        y = y * F.silu(gate.transpose(1, 2).to(y.dtype))
        if cache is not None:
            # a copy: a view of the window would keep the whole prefill's activations alive in the cache
            cache.store_mamba_state(self.layer_idx, window[..., window.size(-1) - conv_state.size(-1):].clone(),
                                    ssm_state)
        return self.out_proj(y.to(dtype))


class ScoutDecoderLayer(GradientCheckpointingLayer):
    """One double block, the unit that layer skipping removes."""

    def __init__(self, config: ScoutConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        eps = config.rms_norm_eps
        self.mixer_norm = LlamaRMSNorm(config.hidden_size, eps=eps)
        if config.mixer == "swa":
            self.mixer = ScoutSlidingWindowAttention(config, layer_idx)
        else:
            self.mixer = ScoutMambaMixer(config, layer_idx)
        self.mixer_mlp_norm = LlamaRMSNorm(config.hidden_size, eps=eps)
        self.mixer_mlp = LlamaMLP(config)
        self.attn_norm = LlamaRMSNorm(config.hidden_size, eps=eps)
        self.self_attn = ScoutAttention(config, layer_idx)
        self.attn_mlp_norm = LlamaRMSNorm(config.hidden_size, eps=eps)
        self.attn_mlp = LlamaMLP(config)

    def forward(self, hidden_states, position_embeddings, positions, valid, past_key_values=None, **kwargs):
        h = hidden_states
        if isinstance(self.mixer, ScoutMambaMixer):
            h = h + self.mixer(self.mixer_norm(h), valid, past_key_values)
        else:
            h = h + self.mixer(self.mixer_norm(h), position_embeddings, positions, valid, past_key_values)
        h = h + self.mixer_mlp(self.mixer_mlp_norm(h))
        h = h + self.self_attn(self.attn_norm(h), position_embeddings, positions, valid, past_key_values)
        return h + self.attn_mlp(self.attn_mlp_norm(h))


class ScoutPreTrainedModel(PreTrainedModel):
    config: ScoutConfig
    config_class = ScoutConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ScoutDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _is_stateful = True  # the window and the Mamba state cannot be rolled back (no assisted generation)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, MambaMixer):  # as MambaPreTrainedModel: S4D-real A, D = 1, its dt init
            module.init_mamba_weights()
            init.kaiming_uniform_(module.conv1d.weight, a=math.sqrt(5))
            if module.conv1d.bias is not None:
                init.zeros_(module.conv1d.bias)
            init.kaiming_uniform_(module.out_proj.weight, a=math.sqrt(5))


def _chunk_validity(attention_mask, batch: int, length: int, past_columns: int, device) -> torch.Tensor:
    """(B, T) bool: which of this chunk's tokens are real. `attention_mask` is the 2-D padding mask of
    the chunk or of everything so far (what generate() passes)."""
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    if attention_mask.dim() != 2:
        raise ValueError(f"SCOUT takes a 2-D padding mask and builds its own masks; got {attention_mask.dim()}-D")
    if attention_mask.size(1) not in (length, past_columns + length):
        raise ValueError(f"attention_mask has {attention_mask.size(1)} columns for a chunk of {length} tokens "
                         f"after {past_columns} cached ones")
    return attention_mask[:, -length:].bool() if length else attention_mask[:, :0].bool()


class ScoutModel(ScoutPreTrainedModel):
    def __init__(self, config: ScoutConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([ScoutDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
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
        if past_key_values is not None and not isinstance(past_key_values, ScoutCache):
            raise TypeError(f"SCOUT needs a ScoutCache, got {type(past_key_values).__name__}")
        cache = past_key_values if past_key_values is not None else (ScoutCache(self.config) if use_cache else None)

        batch, length = inputs_embeds.shape[:2]
        valid = _chunk_validity(attention_mask, batch, length, cache.columns if cache is not None else 0,
                                inputs_embeds.device)
        seen = cache.begin(valid) if cache is not None else torch.zeros(batch, dtype=torch.long,
                                                                        device=valid.device)
        if position_ids is None:  # content positions: real tokens seen before this one in its row
            positions = (seen[:, None] + valid.long().cumsum(dim=1) - 1).clamp(min=0)
        else:
            positions = position_ids.long().expand(batch, length)
        position_embeddings = self.rotary_emb(inputs_embeds, positions)

        hidden_states = inputs_embeds
        all_hidden = [hidden_states] if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings, positions, valid, past_key_values=cache)
            if all_hidden is not None:
                all_hidden.append(hidden_states)
        if cache is not None:
            cache.end()
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden[-1] = hidden_states
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=cache if use_cache else None,
                                       hidden_states=tuple(all_hidden) if all_hidden is not None else None)


class ScoutForCausalLM(ScoutPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ScoutConfig):
        super().__init__(config)
        self.model = ScoutModel(config)
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
        """generate() gets a ScoutCache, never a DynamicCache/StaticCache."""
        if generation_config.cache_implementation is not None:
            raise ValueError(f"SCOUT generates with its own ScoutCache; cache_implementation="
                             f"{generation_config.cache_implementation!r} is not supported")
        if model_kwargs.get("past_key_values") is not None or generation_config.use_cache is False:
            return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        model_kwargs["past_key_values"] = ScoutCache(self.config)


__all__ = ["ScoutForCausalLM", "ScoutModel", "ScoutPreTrainedModel"]
