"""ECHO: a Llama / Qwen2 decoder in which sharer layers read an earlier owner layer's K/V.

A sharer has its own `q_proj` (RoPE at the same positions) and `o_proj` but no `k_proj` / `v_proj`:
it attends over its owner's keys and values after RoPE, read from the forward's `shared_kv` table
(filled by the owner, from the cache when there is one). Everything else is transformers' Llama
(`LlamaRMSNorm`, `LlamaMLP`, `LlamaRotaryEmbedding`, the attention interfaces), so an empty sharing
map computes exactly what transformers' Llama / Qwen2 compute. docs/architectures/echo.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from transformers import initialization as init
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
    rotate_half,
)
from transformers.utils import can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .cache_echo import EchoCache, content_positions
from .configuration_echo import EchoConfig, validate_kv_sharing


class EchoKVAdapter(nn.Module):
    """A sharer's trainable map of the borrowed post-RoPE K/V; exactly the identity at init.

    `scale`: values times a gain per channel; keys times a gain per rotary pair (channel i and
    i + head_dim/2 share one), which commutes with RoPE, so scores still depend on relative positions
    only. `lowrank`: values += up(down(values)) over all KV heads, `up` zero at init; keys are left
    alone (mixing RoPE-rotated channels would make scores depend on absolute positions).
    """

    def __init__(self, config: EchoConfig):
        super().__init__()
        self.kind = config.kv_adapter
        heads, head_dim = config.num_key_value_heads, config.head_dim
        # Plain parameters, not nn.Linear: the generic initialisation must not overwrite the identity.
        if self.kind == "scale":
            self.key_scale = nn.Parameter(torch.empty(heads, head_dim // 2))
            self.value_scale = nn.Parameter(torch.empty(heads, head_dim))
        elif self.kind == "lowrank":
            self.down = nn.Parameter(torch.empty(config.kv_adapter_rank, heads * head_dim))
            self.up = nn.Parameter(torch.empty(heads * head_dim, config.kv_adapter_rank))
        else:
            raise ValueError(f"no adapter for kv_adapter={self.kind!r}")
        self.reset_to_identity()

    def reset_to_identity(self) -> None:
        if self.kind == "scale":
            init.ones_(self.key_scale)
            init.ones_(self.value_scale)
        else:
            init.kaiming_uniform_(self.down, a=math.sqrt(5))  # as LoRA's A
            init.zeros_(self.up)

    def forward(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # keys, values: (B, kv_heads, T, head_dim)
        if self.kind == "scale":
            pair_gain = torch.cat([self.key_scale, self.key_scale], dim=-1)
            return keys * pair_gain[None, :, None, :], values * self.value_scale[None, :, None, :]
        b, h, t, d = values.shape
        flat = values.transpose(1, 2).reshape(b, t, h * d)
        delta = (flat @ self.down.T @ self.up.T).view(b, t, h, d).transpose(1, 2)
        return keys, values + delta


def rope_query(query: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rotary_pos_emb`'s query half, the same ops (a sharer has no key to rotate)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (query * cos) + (rotate_half(query) * sin)


class EchoAttention(nn.Module):
    """Llama attention; a sharer (`kv_source_idx` = its owner's index, an int) has no k/v projections."""

    def __init__(self, config: EchoConfig, layer_idx: int, kv_source_idx: int | None = None):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        kv_width = config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=config.qkv_bias)
        self.kv_source_idx = None
        self.kv_adapter = None
        if kv_source_idx is None:
            self.k_proj = nn.Linear(config.hidden_size, kv_width, bias=config.qkv_bias)
            self.v_proj = nn.Linear(config.hidden_size, kv_width, bias=config.qkv_bias)
        else:
            self.become_sharer(kv_source_idx)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=config.o_bias)

    @property
    def is_sharer(self) -> bool:
        return self.kv_source_idx is not None

    def become_sharer(self, owner_idx: int) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """From now on read layer `owner_idx`'s K/V: the k/v projections are deleted and the adapter,
        if configured, starts at the identity. Returns (removed, added) parameters for an optimizer."""
        removed = []
        for name in ("k_proj", "v_proj"):
            if hasattr(self, name):
                removed += list(getattr(self, name).parameters())
                delattr(self, name)
        self.kv_source_idx = int(owner_idx)
        if self.config.kv_adapter != "none":
            weight = self.q_proj.weight
            self.kv_adapter = EchoKVAdapter(self.config).to(device=weight.device, dtype=weight.dtype)
        return removed, list(self.kv_adapter.parameters()) if self.kv_adapter is not None else []

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values: EchoCache | None = None,
        shared_kv: dict | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        cos, sin = position_embeddings
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        if self.kv_source_idx is None:
            key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
            value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
            query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
            if past_key_values is not None:
                key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
            if shared_kv is not None and self.layer_idx in shared_kv:  # a sharer reads this layer
                shared_kv[self.layer_idx] = (key_states, value_states)
        else:
            query_states = rope_query(query_states, cos, sin)
            borrowed = None if shared_kv is None else shared_kv.get(self.kv_source_idx)
            if borrowed is None:
                raise RuntimeError(f"layer {self.layer_idx} reads the K/V of layer {self.kv_source_idx}, "
                                   "which did not run before it in this forward")
            key_states, value_states = borrowed
            if self.kv_adapter is not None:
                key_states, value_states = self.kv_adapter(key_states, value_states)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class EchoDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: EchoConfig, layer_idx: int, kv_source_idx: int | None = None):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = EchoAttention(config, layer_idx, kv_source_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: EchoCache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        shared_kv: dict | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            shared_kv=shared_kv,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


class EchoPreTrainedModel(PreTrainedModel):
    config: EchoConfig
    config_class = EchoConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["EchoDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False
    _can_record_outputs = {"hidden_states": EchoDecoderLayer, "attentions": EchoAttention}

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, EchoKVAdapter):
            module.reset_to_identity()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        # Under re-entrant checkpointing a sharer's read of its owner's K/V (a tensor leaving the owner's
        # checkpointed layer outside its outputs) would carry no gradient back to the owner.
        if (gradient_checkpointing_kwargs or {}).get("use_reentrant", False):
            raise ValueError("ECHO models support only non-reentrant gradient checkpointing "
                             "(gradient_checkpointing_kwargs={'use_reentrant': False}, the default)")
        super().gradient_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)


class EchoModel(EchoPreTrainedModel):
    def __init__(self, config: EchoConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [EchoDecoderLayer(config, i, config.kv_sharing.get(i)) for i in range(config.num_hidden_layers)]
        )
        self.num_layers_built = config.num_hidden_layers  # skip_layers changes the config's count, not this
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def kv_readers(self) -> dict[int, list[int]]:
        """{owner index: [sharer indices]} over the layers present now (indices as they are now)."""
        readers: dict[int, list[int]] = {}
        for i, layer in enumerate(self.layers):
            if layer.self_attn.kv_source_idx is not None:
                readers.setdefault(layer.self_attn.kv_source_idx, []).append(i)
        return readers

    def skippable_layers(self) -> list[int]:
        """Every present layer except the owners a present sharer reads (their K/V must be computed)."""
        owners = self.kv_readers()
        return [i for i in range(len(self.layers)) if i not in owners]

    def share_kv(self, pairs: dict[int, int]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """Make each sharer of `pairs` ({sharer: owner}) read its owner's K/V from now on (the gradual
        conversion). The merged map is validated as a config's; the sharers' k/v projections are deleted.
        Returns (removed, added) parameters. Not inside `skip_layers` (indices there are renumbered)."""
        if len(self.layers) != self.num_layers_built:
            raise RuntimeError("share_kv needs the full stack (not inside skip_layers)")
        pairs = {int(s): int(o) for s, o in pairs.items()}
        again = sorted(s for s in pairs if s in self.config.kv_sharing)
        if again:
            raise ValueError(f"layers {again} already share K/V ({ {s: self.config.kv_sharing[s] for s in again} })")
        merged = {**self.config.kv_sharing, **pairs}
        validate_kv_sharing(merged, len(self.layers))
        removed, added = [], []
        for sharer, owner in pairs.items():
            r, a = self.layers[sharer].self_attn.become_sharer(owner)
            removed += r
            added += a
        self.config.kv_sharing = dict(sorted(merged.items()))
        return removed, added

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: EchoCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if past_key_values is not None and not isinstance(past_key_values, EchoCache):
            raise TypeError(f"ECHO models cache K/V in an EchoCache (owners only), got {type(past_key_values).__name__}")
        if use_cache and past_key_values is None:
            past_key_values = EchoCache()

        # Content positions per row: from the seen-token count and the mask of the new columns.
        batch, q_len = inputs_embeds.shape[:2]
        if attention_mask is not None and attention_mask.ndim == 2:
            new_tokens = attention_mask[:, -q_len:].long()
        else:  # no mask (or a prepared 4-D one): every new column is a content token
            new_tokens = torch.ones(batch, q_len, dtype=torch.long, device=inputs_embeds.device)
        if position_ids is None:
            seen = past_key_values.seen_tokens if past_key_values is not None else None
            position_ids = content_positions(seen, new_tokens)
        if past_key_values is not None:
            past_key_values.record_tokens(new_tokens)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        shared_kv = dict.fromkeys(self.kv_readers())  # owner index -> its (K, V), filled as the owner runs
        for decoder_layer in self.layers:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                shared_kv=shared_kv,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=past_key_values)


class EchoForCausalLM(EchoPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: EchoConfig):
        super().__init__(config)
        self.model = EchoModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate() gets an EchoCache (owners only, per-row seen counts) instead of a DynamicCache."""
        if model_kwargs.get("past_key_values") is None and generation_config.use_cache is not False:
            if generation_config.cache_implementation not in (None, "dynamic"):
                raise ValueError(f"ECHO models decode with their own EchoCache; cache_implementation="
                                 f"{generation_config.cache_implementation!r} is not supported")
            model_kwargs["past_key_values"] = EchoCache()
            return
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: EchoCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = ["EchoForCausalLM", "EchoModel", "EchoPreTrainedModel"]
