"""DTRNet (arXiv 2509.00925, SPEC §5): per-token routing between attention and a cheap bypass.

In a routed layer a router on the pre-norm residual stream h gives p = softmax(MLP(h)) = (p_attn, p_byp);
tokens with p_attn > 0.5 (never pads) attend causally among the routed tokens of their own row, at their
original RoPE positions, and their output after W_O is scaled by p_attn; every other token gets
p_byp · W_O(repeat_kv(W_V x̂)), x̂ = norm(h) (attention whose only key is the token itself). The MLP runs
for all tokens. Dense layers are plain Llama layers. The decode cache keeps, per layer and row, only the
tokens that attended (`DTRNetCache`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
    repeat_kv,
)
from transformers.utils.output_capturing import capture_outputs

from reft_kernels.routed_attention import (
    RoutedKV,
    pack_routed,
    routed_attention_mask,
    unpack_routed,
    varlen_attention_flash,
    varlen_attention_torch,
)

from .cache_dtrnet import DTRNetCache
from .configuration_dtrnet import DTRNetConfig


class DTRNetRouter(nn.Module):
    """Linear(d, d/2, bias) → SiLU → Linear(d/2, 2, bias): logits for (attend, bypass). Parameter names
    follow the released `TokenRouter` (`weight_predictor.0`, `weight_predictor.2`)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.weight_predictor = nn.Sequential(nn.Linear(hidden_size, hidden_size // 2), nn.SiLU(),
                                              nn.Linear(hidden_size // 2, 2))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.weight_predictor(hidden_states)


def random_routes(real: torch.Tensor, fraction: float) -> torch.Tensor:
    """Route `fraction` of the real tokens of the batch, chosen uniformly (the released fallback)."""
    flat = real.flatten()
    candidates = flat.nonzero().squeeze(1)
    chosen = candidates[torch.randperm(candidates.numel(), device=real.device)[: int(candidates.numel() * fraction)]]
    take = torch.zeros_like(flat)
    take[chosen] = True
    return take.view_as(real)


class DTRNetAttention(LlamaAttention):
    """LlamaAttention's projections (same names: Llama weights load 1:1), attention restricted to the
    tokens in `take`; the others get their own value (before W_O)."""

    def forward(self, hidden_states: torch.Tensor, take: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor],
                past_key_values: DTRNetCache | None = None, **kwargs) -> torch.Tensor:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        impl = self.config._attn_implementation
        if impl.startswith("flash_attention") or self.config.routed_attention == "packed":
            out = self._packed(q, k, v, take, past_key_values, flash=impl.startswith("flash_attention"))
        else:
            out = self._masked(q, k, v, take, past_key_values, impl)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous())

    def _masked(self, q, k, v, take, cache, impl) -> torch.Tensor:
        """All tokens of the chunk as queries, [cached routed keys; chunk keys] as keys, the routed mask."""
        if cache is not None:
            store = cache.layer(self.layer_idx, k)
            past_k, past_v, past_lengths = store.view()
            keys, values = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
            mask = routed_attention_mask(take, past_lengths, past_k.shape[2])
            store.append(k, v, take)
        else:
            keys, values, mask = k, v, routed_attention_mask(take)
        if impl == "eager":
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, torch.finfo(q.dtype).min)
            out, _ = eager_attention_forward(self, q, keys, values, mask, scaling=self.scaling)
        elif impl == "sdpa":
            out, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](self, q, keys, values, mask, scaling=self.scaling)
        else:
            raise ValueError(f"DTRNet attention supports attn_implementation eager, sdpa or flash_attention_2; got {impl!r}")
        return out  # (B, T, H, D)

    def _packed(self, q, k, v, take, cache, flash: bool) -> torch.Tensor:
        """Only the routed tokens are scored: gathered per row, one variable-length segment each."""
        store = cache.layer(self.layer_idx, k) if cache is not None else RoutedKV.empty(k)
        store.append(k, v, take)
        segments = pack_routed(q, take, store)
        packed = (varlen_attention_flash if flash else varlen_attention_torch)(segments, self.scaling)
        bypass = repeat_kv(v, self.num_key_value_groups).transpose(1, 2)  # (B, T, H, D)
        return unpack_routed(packed, take, bypass)


class DTRNetDecoderLayer(GradientCheckpointingLayer):
    """A Llama decoder layer; routed unless its index is in `config.dense_layers`. One skippable unit."""

    def __init__(self, config: DTRNetConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.built_index = layer_idx  # index in the full stack, for logging (skip_layers renumbers only layer_idx)
        self.self_attn = DTRNetAttention(config=config, layer_idx=layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.router = None if layer_idx in config.dense_layers else DTRNetRouter(config.hidden_size)

    @property
    def routed(self) -> bool:
        return self.router is not None

    def route(self, hidden_states: torch.Tensor, real: torch.Tensor):
        """(take, p_attn, per-token output scale); dense layers: every real token, no scale."""
        if self.router is None:
            return real, None, None
        logits = self.router(hidden_states)
        probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(-1)  # at least float32
        take = (probs[..., 0] > 0.5) & real
        fraction = self.config.random_route_fraction
        if self.training and fraction > 0 and not bool(take.any()):
            take = random_routes(real, fraction)
        scale = torch.where(take, probs[..., 0], probs[..., 1]).to(hidden_states.dtype)
        return take, probs[..., 0], scale

    def forward(self, hidden_states: torch.Tensor, real: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor],
                past_key_values: DTRNetCache | None = None, **kwargs):
        take, p_attn, scale = self.route(hidden_states, real)
        attn = self.self_attn(self.input_layernorm(hidden_states), take, position_embeddings, past_key_values)
        if scale is not None:
            attn = attn * scale[..., None]
        hidden_states = hidden_states + attn
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, take, p_attn


@dataclass
class DTRNetModelOutput(BaseModelOutputWithPast):
    """`routed_fraction` (num_layers,): fraction of the real tokens that took the attention path in each
    layer (1 for dense layers); `router_loss`: Σ_l f_l · mean(p_attn,l) / Σ_l f_l over routed layers
    (training only)."""

    routed_fraction: torch.FloatTensor | None = None
    router_loss: torch.FloatTensor | None = None


@dataclass
class DTRNetCausalLMOutput(CausalLMOutputWithPast):
    """`aux_loss` = aux_loss_coef · router_loss (training only; already in `loss` when labels are given)."""

    aux_loss: torch.FloatTensor | None = None
    routed_fraction: torch.FloatTensor | None = None


class DTRNetPreTrainedModel(PreTrainedModel):
    config_class = DTRNetConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DTRNetDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _can_record_outputs = {"hidden_states": DTRNetDecoderLayer}


class DTRNetModel(DTRNetPreTrainedModel):
    # Trainers that call the backbone directly (TRL's fused LM head) add `aux_loss_coef · router_loss`
    # through these (nested_reft.aux_loss); `DTRNetForCausalLM` adds it itself when given labels.
    auxiliary_loss_output = "router_loss"
    auxiliary_loss_coef = "aux_loss_coef"

    def __init__(self, config: DTRNetConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([DTRNetDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.routing_log: dict[int, list[float]] = {}  # built_index -> routed fractions of training forwards
        self.post_init()

    def pop_routing_log(self) -> dict[int, float]:
        """Mean routed fraction per routed layer (by index in the full stack) over the training-mode
        forwards since the last call; emptied by the call."""
        means = {i: sum(v) / len(v) for i, v in sorted(self.routing_log.items())}
        self.routing_log = {}
        return means

    @capture_outputs
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: DTRNetCache | None = None,
                inputs_embeds: torch.FloatTensor | None = None, use_cache: bool | None = None,
                **kwargs) -> DTRNetModelOutput:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, length = inputs_embeds.shape[:2]
        if attention_mask is None:
            real = torch.ones(batch, length, dtype=torch.bool, device=inputs_embeds.device)
        elif attention_mask.dim() != 2:
            raise ValueError(f"DTRNet takes a 2-D padding mask (B, past + T); got shape {tuple(attention_mask.shape)}")
        else:
            real = attention_mask[:, -length:].bool()
        if use_cache is None:  # a cache costs copies; plain training forwards do not need one
            use_cache = bool(self.config.use_cache) and not self.training
        if use_cache and past_key_values is None:
            past_key_values = DTRNetCache()
        if past_key_values is not None and not isinstance(past_key_values, DTRNetCache):
            raise TypeError(f"DTRNet needs a DTRNetCache (routed tokens only, per row); got {type(past_key_values).__name__}")
        if position_ids is None:  # content positions per row, from the seen-token count
            position_ids = (past_key_values.positions(real) if past_key_values is not None
                            else real.long().cumsum(1) - real.long())

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        acc = torch.promote_types(hidden_states.dtype, torch.float32)
        n_real = real.sum().clamp_min(1).to(acc)
        fractions, weighted, routed_total = [], [], None
        for layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states, take, p_attn = layer(hidden_states, real, position_embeddings, past_key_values)
            fraction = take.sum().to(acc) / n_real  # a count: no gradient
            fractions.append(fraction)
            if p_attn is not None and self.training:
                mean_p = (p_attn * real).sum() / n_real
                weighted.append(fraction * mean_p)
                routed_total = fraction if routed_total is None else routed_total + fraction
                self.routing_log.setdefault(layer.built_index, []).append(float(fraction))
        if past_key_values is not None:
            past_key_values.advance(real)
        router_loss = None
        if weighted:  # f_l carries no gradient; if no layer routed anything the loss is 0
            router_loss = torch.stack(weighted).sum() / routed_total.clamp_min(torch.finfo(torch.float32).tiny)
        return DTRNetModelOutput(last_hidden_state=self.norm(hidden_states), past_key_values=past_key_values,
                                 routed_fraction=torch.stack(fractions), router_loss=router_loss)


class DTRNetForCausalLM(DTRNetPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DTRNetConfig):
        super().__init__(config)
        self.model = DTRNetModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not hand us a DynamicCache: the model makes its DTRNetCache

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: DTRNetCache | None = None,
                inputs_embeds: torch.FloatTensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs) -> DTRNetCausalLMOutput:
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                             **kwargs)
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])
        aux_loss = None if outputs.router_loss is None else self.config.aux_loss_coef * outputs.router_loss
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            if aux_loss is not None:
                loss = loss + aux_loss
        return DTRNetCausalLMOutput(loss=loss, aux_loss=aux_loss, logits=logits,
                                    past_key_values=outputs.past_key_values, hidden_states=outputs.hidden_states,
                                    routed_fraction=outputs.routed_fraction)


__all__ = ["DTRNetCache", "DTRNetForCausalLM", "DTRNetModel", "DTRNetPreTrainedModel", "DTRNetRouter"]
