"""Balcony exits on a frozen Llama / Qwen2-style model or one of this project's families (SPEC.md §3,
arXiv 2503.05005).

Exit `k` reads the residual stream after `k` base layers (transformers' `hidden_states[k]`) and
computes

    logits_k = lm_head(norm_k(exit_layer_k(h_k)))

with `exit_layer_k` one extra decoder layer (a copy of the base's **last** layer at init; ECHO: of
its last layer that computes its own K/V), `norm_k` an RMSNorm (a copy of `layers[k].input_layernorm`
at init, SCOUT's `mixer_norm`, not the final norm) and the base's own frozen LM head. It costs k + 1
layers. The exits live in one `BalconyExits` ModuleDict (`model.balcony_exits` after `add_exits`),
saved and loaded alone (`save_exits` / `load_exits`).

`use_exit(model, k)` runs the model *as* exit k: the decoder stack becomes layers 0..k−1 plus the
exit layer (whose `layer_idx` is k, the next free cache slot) and the final norm becomes `norm_k`,
so `generate()`, the KV cache and left-padded batches work as for the base model. Training uses
`exit_logits`, which computes every exit from one teacher forward.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..skipping import LAYER_INDEX_ATTRS, decoder_stack
from .configuration_balcony import KL_REDUCTIONS, BalconyConfig

# The released exits 15, 18 and 21 of 32 layers, as fractions of the depth.
DEFAULT_EXIT_FRACTIONS = (15 / 32, 18 / 32, 21 / 32)
EXITS_FILE = "balcony_exits.safetensors"


def default_exits(num_layers: int, keep_first: int = 2) -> list[int]:
    """The released 15/18/21-of-32 exits scaled to `num_layers`: k = floor(f·L + ½), clamped to
    [max(1, keep_first), L − 1]; depths that round to the same k give one exit (8 layers: [4, 5])."""
    low, high = max(1, keep_first), num_layers - 1
    if low > high:
        raise ValueError(f"a {num_layers}-layer model has no exit depth k with {low} <= k <= {high} "
                         f"(keep_first={keep_first})")
    return sorted({min(max(math.floor(f * num_layers + 0.5), low), high) for f in DEFAULT_EXIT_FRACTIONS})


class _NoAttention(nn.Module):
    """The attention branch of an MLP-only exit layer: contributes nothing, caches nothing."""

    def forward(self, hidden_states, **kwargs):
        return torch.zeros_like(hidden_states), None


class _NoMLP(nn.Module):
    """The MLP branch of an attention-only exit layer."""

    def forward(self, hidden_states):
        return torch.zeros_like(hidden_states)


class BalconyExit(nn.Module):
    """One exit: its decoder layer, then its norm (the LM head is the base's)."""

    def __init__(self, layer: nn.Module, norm: nn.Module):
        super().__init__()
        self.layer = layer
        self.norm = norm

    def forward(self, hidden_states: torch.Tensor, *layer_args, **layer_kwargs) -> torch.Tensor:
        out = self.layer(hidden_states, *layer_args, **layer_kwargs)
        return self.norm(out[0] if isinstance(out, tuple) else out)


class BalconyExits(nn.ModuleDict):
    """The exits of one base model, keyed by depth (`exits[k]`), with their `BalconyConfig`."""

    def __init__(self, exits: dict[int, BalconyExit], config: BalconyConfig):
        super().__init__({str(k): e for k, e in exits.items()})
        self.config = config

    def __getitem__(self, k) -> BalconyExit:
        return super().__getitem__(str(k))

    def __contains__(self, k) -> bool:
        return super().__contains__(str(k))

    @property
    def depths(self) -> list[int]:
        return list(self.config.exits)


def _refuse_peft(model: nn.Module) -> None:
    if hasattr(model, "peft_config"):
        raise TypeError("Balcony exits are built on the plain base model; add or load them before wrapping it with PEFT")


@torch.no_grad()
def _reinit(module: nn.Module, std: float) -> None:
    """The `init="random"` ablation: matrices N(0, std²), biases 0, norm weights 1 (transformers' init)."""
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, std)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.fill_(1.0)


def _input_norm(layer: nn.Module) -> nn.Module:
    """The norm a decoder layer applies first to its input: Llama's `input_layernorm`, the `mixer_norm`
    of a SCOUT double block."""
    for name in ("input_layernorm", "mixer_norm"):
        if isinstance(getattr(layer, name, None), nn.Module):
            return getattr(layer, name)
    raise TypeError(f"Balcony exits need the norm a {type(layer).__name__} applies to its input "
                    "(input_layernorm or mixer_norm); this layer has neither")


def _reads_other_kv(layer: nn.Module) -> bool:
    """An ECHO sharer: it attends over the K/V another layer computed (`kv_source_idx`)."""
    return any(isinstance(getattr(m, "kv_source_idx", None), int) for m in layer.modules())


def _template_layer(stack: nn.Module) -> nn.Module:
    """What an exit layer copies: the base's last layer, or (ECHO) the last one that computes its own
    K/V; a copied sharer would attend over the K/V of a layer the exit never runs."""
    return next(layer for layer in reversed(stack.layers) if not _reads_other_kv(layer))


def _exit_layer(template: nn.Module, k: int, block: str) -> nn.Module:
    layer = copy.deepcopy(template)
    for module in layer.modules():  # its own cache slot: k, right after the k base layers it follows
        for attr in LAYER_INDEX_ATTRS:
            if isinstance(getattr(module, attr, None), int):
                setattr(module, attr, k)
    if block == "attention":
        layer.mlp, layer.post_attention_layernorm = _NoMLP(), nn.Identity()
    elif block == "mlp":
        layer.self_attn, layer.input_layernorm = _NoAttention(), nn.Identity()
    return layer


def build_exits(model: nn.Module, exits: Sequence[int] | None = None, init: str = "last_layer", block: str = "full",
                keep_first: int = 2) -> BalconyExits:
    """New exits for `model` (not attached, the model untouched). `exits=None`: `default_exits`."""
    _refuse_peft(model)
    stack = decoder_stack(model)
    n = len(stack.layers)
    depths = default_exits(n, keep_first) if exits is None else sorted(set(exits))
    config = BalconyConfig(exits=depths, init=init, block=block, base_model_type=model.config.model_type,
                           base_num_hidden_layers=n, base_hidden_size=model.config.hidden_size)
    template = _template_layer(stack)
    built = {}
    for k in depths:
        layer = _exit_layer(template, k, block)
        if init == "random":
            _reinit(layer, model.config.initializer_range)
        built[k] = BalconyExit(layer, copy.deepcopy(_input_norm(stack.layers[k])))
    out = BalconyExits(built, config)
    out.requires_grad_(True)
    return out.eval()  # no dropout in an exit; eval keeps gradient checkpointing of copied layers off


def add_exits(model: nn.Module, exits: Sequence[int] | None = None, init: str = "last_layer", block: str = "full",
              keep_first: int = 2) -> BalconyExits:
    """Freeze `model` and attach new exits as `model.balcony_exits`; only they train."""
    if hasattr(model, "balcony_exits"):
        raise ValueError("this model already has Balcony exits (model.balcony_exits)")
    built = build_exits(model, exits, init, block, keep_first)  # refusals leave the model as it was
    model.requires_grad_(False)
    model.balcony_exits = built
    return built


def _exits_of(model: nn.Module, exits: BalconyExits | None) -> BalconyExits:
    if exits is not None:
        return exits
    found = getattr(model, "balcony_exits", None)
    if found is None:
        raise ValueError("this model has no Balcony exits: call add_exits or load_exits first, or pass exits=")
    return found


def _check_exit(stack: nn.Module, exits: BalconyExits, k: int) -> None:
    if k not in exits:
        raise ValueError(f"no Balcony exit {k!r}; this model's exits are {exits.depths}")
    if len(stack.layers) != exits.config.base_num_hidden_layers:
        raise ValueError(f"the exits were built for {exits.config.base_num_hidden_layers} base layers, the model runs "
                         f"{len(stack.layers)} (skipped layers cannot be combined with an exit)")


@contextlib.contextmanager
def use_exit(model: nn.Module, k: int, exits: BalconyExits | None = None) -> Iterator[nn.Module]:
    """Run `model` as exit k inside the block: layers 0..k−1, the exit layer (cache slot k), the exit
    norm, the LM head. `generate()` then builds a k + 1-layer cache. Restored on exit, also on errors."""
    exits = _exits_of(model, exits)
    stack = decoder_stack(model)
    _check_exit(stack, exits, k)
    exit_module = exits[k]
    config = stack.config
    saved = {key: getattr(config, key) for key in ("num_hidden_layers", "layer_types") if hasattr(config, key)}
    layers, norm = stack.layers, stack.norm
    try:
        stack.layers = nn.ModuleList([*layers[:k], exit_module.layer])
        stack.norm = exit_module.norm
        config.num_hidden_layers = k + 1
        if saved.get("layer_types") is not None:  # the exit layer is a copy of the last: its attention type
            config.layer_types = [*saved["layer_types"][:k], saved["layer_types"][-1]]
        yield model
    finally:
        stack.layers, stack.norm = layers, norm
        for key, value in saved.items():
            setattr(config, key, value)


def exit_forward(model: nn.Module, k: int, exits: BalconyExits | None = None, **inputs):
    """`model(**inputs)` through exit k (a `CausalLMOutputWithPast`)."""
    with use_exit(model, k, exits):
        return model(**inputs)


def exit_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                exits: BalconyExits | None = None, depths: Sequence[int] | None = None,
                ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """(full-model logits, {k: exit-k logits}) from one forward of the base (no gradient: the base is
    the frozen teacher). Each exit layer gets `hidden_states[k]` and exactly the other arguments the
    base's last layer got, positional and keyword (mask, position embeddings, its attention type; the
    families' own: padding validity, positions), so this equals `exit_forward`."""
    exits = _exits_of(model, exits)
    stack = decoder_stack(model)
    depths = exits.depths if depths is None else list(depths)
    for k in depths:
        _check_exit(stack, exits, k)
    captured: dict = {}

    def keep_input(k):
        def hook(module, args, kwargs):
            captured[k] = args[0] if args else kwargs["hidden_states"]
        return hook

    def keep_arguments(module, args, kwargs):  # all but the hidden states (the teacher runs without a cache)
        captured["layer_args"] = (args[1:], {key: v for key, v in kwargs.items() if key != "hidden_states"})

    hooks = [stack.layers[k].register_forward_pre_hook(keep_input(k), with_kwargs=True) for k in set(depths)]
    hooks.append(stack.layers[-1].register_forward_pre_hook(keep_arguments, with_kwargs=True))
    try:
        with torch.no_grad():
            full = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    layer_args, layer_kwargs = captured["layer_args"]
    head = model.get_output_embeddings()
    # The head is shared and frozen: detached, so an exit's loss never leaves a gradient on the base's
    # head (under RL the policy's head trains, and its .grad belongs to the policy's own loss).
    weight, bias = head.weight.detach(), None if head.bias is None else head.bias.detach()
    return full, {k: F.linear(exits[k](captured[k], *layer_args, **layer_kwargs), weight, bias) for k in depths}


def exit_kl(full_logits: torch.Tensor, exit_logits: torch.Tensor, mask: torch.Tensor | None = None,
            reduction: str = "token_mean") -> torch.Tensor:
    """KL(p_full ‖ p_exit) at temperature 1, the teacher detached, in float32.

    `token_mean` [ours, default]: the per-token KL averaged over the tokens where `mask` is 1.
    `batchmean` [code]: the released `F.kl_div(log p_exit, p_full, reduction="batchmean")` on (B, T, V):
    summed over every token, pads included (`mask` ignored), divided by B."""
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"kl_reduction must be one of {KL_REDUCTIONS}, got {reduction!r}")
    log_q = torch.log_softmax(exit_logits.float(), dim=-1)
    log_p = torch.log_softmax(full_logits.detach().float(), dim=-1)
    if reduction == "batchmean":
        return F.kl_div(log_q, log_p.exp(), reduction="batchmean")
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    if mask is None:
        return per_token.mean()
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp(min=1.0)


def distillation_loss(full_logits: torch.Tensor, logits_by_exit: dict[int, torch.Tensor],
                      mask: torch.Tensor | None = None, reduction: str = "token_mean",
                      ) -> tuple[torch.Tensor, dict[int, float]]:
    """The Balcony loss: the mean over exits of `exit_kl`; also each exit's KL as a float."""
    kls = {k: exit_kl(full_logits, lg, mask, reduction) for k, lg in logits_by_exit.items()}
    return sum(kls.values()) / len(kls), {k: float(v.detach()) for k, v in kls.items()}


def save_exits(model_or_exits: nn.Module, path: str | Path) -> Path:
    """Write the exits alone (config.json + balcony_exits.safetensors), never the base."""
    from safetensors.torch import save_file

    exits = model_or_exits if isinstance(model_or_exits, BalconyExits) else _exits_of(model_or_exits, None)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    exits.config.save_pretrained(path)
    save_file({k: v.detach().cpu().contiguous() for k, v in exits.state_dict().items()}, str(path / EXITS_FILE),
              metadata={"format": "pt"})
    return path


def read_exits(model: nn.Module, path: str | Path) -> BalconyExits:
    """Exits saved by `save_exits`, built for `model` (same depth and width) on its device and dtype;
    not attached, the model untouched."""
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if not (path / EXITS_FILE).is_file():
        raise FileNotFoundError(f"no Balcony exits at {str(path)!r} (expected {EXITS_FILE} and config.json, "
                                "written by save_exits / recipes/train_balcony.py)")
    config = BalconyConfig.from_pretrained(path)
    n, width = len(decoder_stack(model).layers), model.config.hidden_size
    if (config.base_num_hidden_layers, config.base_hidden_size) != (n, width):
        raise ValueError(f"the exits at {str(path)!r} were trained on a base with {config.base_num_hidden_layers} layers "
                         f"of width {config.base_hidden_size}; this model has {n} of width {width}")
    exits = build_exits(model, config.exits, init="last_layer", block=config.block)  # structure; weights below
    exits.config = config
    exits.load_state_dict(load_file(str(path / EXITS_FILE)), strict=True)
    parameter = next(model.parameters())
    return exits.to(device=parameter.device, dtype=parameter.dtype)


def load_exits(model: nn.Module, path: str | Path) -> BalconyExits:
    """`read_exits`, then attached as `model.balcony_exits` with the base frozen (as `add_exits`)."""
    if hasattr(model, "balcony_exits"):
        raise ValueError("this model already has Balcony exits (model.balcony_exits)")
    exits = read_exits(model, path)
    model.requires_grad_(False)
    model.balcony_exits = exits
    return exits


__all__ = [
    "DEFAULT_EXIT_FRACTIONS", "EXITS_FILE", "BalconyExit", "BalconyExits", "add_exits", "build_exits",
    "default_exits", "distillation_loss", "exit_forward", "exit_kl", "exit_logits", "load_exits", "read_exits",
    "save_exits", "use_exit",
]
