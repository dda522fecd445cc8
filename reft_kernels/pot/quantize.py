"""Quantize a Hugging Face causal LM to PoT: `quantize_model`, save / load, and the INT baseline.

Which layers: every `nn.Linear` except those whose name matches `skip` (default: `lm_head`,
which tied-embedding models share with the input embeddings). Small `in_features`: the last
group of a row is partial when `in_features % group_size != 0`, and a layer narrower than one
group has a single (partial) group per row; nothing is padded in storage (see `format`). The
embedded tiny model has hidden size 128, so its q/k/v/o/gate/up projections have exactly one
group per row at the default group size, and down_proj (in 512) four.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .format import check_bits, check_group_size, codes_per_word
from .linear import PoTLinear
from .reference import check_rounding, int_quantize_rtn
from .refine import refine_block_scales, refine_layer_scales, refine_model_scales
from .search import grid_search_scales

POT_CONFIG_FILE = "pot_quantization.json"
GRANULARITIES = ("layer", "block", "model")


def target_linears(model: nn.Module, skip=("lm_head",)) -> dict[str, nn.Linear]:
    """Linear layers to quantize: every nn.Linear whose qualified name matches no `skip` regex."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not any(re.search(p, name) for p in skip)}


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def decoder_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of each decoder block: the ModuleList named `layers`/`h`/`blocks`."""
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h", "blocks"):
            return [(f"{name}.{i}", b) for i, b in enumerate(m)]
    raise ValueError(f"found no decoder block list (a ModuleList named layers/h/blocks) in {type(model).__name__}")


def _check_calib(calib_data) -> list[torch.Tensor]:
    """Calibration batches: a LongTensor [n_seq, seq_len] (split into batches later) or a list of
    LongTensor batches [b, T_i] (sequences of one length per batch, so no padding is needed)."""
    if calib_data is None:
        raise ValueError("refine=True needs calib_data: a LongTensor [n_sequences, seq_len] of token ids "
                         "or a list of such batches")
    batches = list(calib_data) if isinstance(calib_data, (list, tuple)) else [torch.as_tensor(calib_data)]
    for b in batches:
        if not isinstance(b, torch.Tensor) or b.dim() != 2 or b.dtype != torch.long or b.numel() == 0:
            got = f"{b.dtype} {tuple(b.shape)}" if isinstance(b, torch.Tensor) else type(b).__name__
            raise ValueError(f"calib_data must be a non-empty LongTensor [n_sequences, seq_len] or a list "
                             f"of them, got {got}")
    if not batches:
        raise ValueError("calib_data is an empty list")
    return batches


def _run_calibration(model, calib: list[torch.Tensor], batch_size: int, progress: bool) -> None:
    device = next(model.parameters()).device
    chunks = [b[i:i + batch_size] for b in calib for i in range(0, len(b), batch_size)]
    with torch.no_grad():
        for ids in tqdm(chunks, desc="calibration forward", disable=not progress):
            model(input_ids=ids.to(device), use_cache=False)


def capture_hessians(model, linears: dict[str, nn.Linear], calib: list[torch.Tensor], batch_size: int,
                     progress: bool) -> dict[str, torch.Tensor]:
    """H = XᵀX / T of every linear's input over the calibration tokens (fp32)."""
    sums = {n: torch.zeros(m.in_features, m.in_features, device=m.weight.device) for n, m in linears.items()}
    counts = dict.fromkeys(linears, 0)

    def hook(name):
        def fn(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name] += x.T @ x
            counts[name] += x.shape[0]
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        _run_calibration(model, calib, batch_size, progress)
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / max(counts[n], 1) for n in linears}


def capture_block_io(model, blocks, calib: list[torch.Tensor], batch_size: int, progress: bool):
    """Per block: [(args, kwargs)] of its forward per calibration batch, and its outputs."""
    inputs = {n: [] for n, _ in blocks}
    outputs = {n: [] for n, _ in blocks}

    def detach(v):
        return v.detach() if isinstance(v, torch.Tensor) else (
            tuple(detach(x) for x in v) if isinstance(v, tuple) else v)

    def pre(name):
        def fn(_mod, args, kwargs):
            inputs[name].append((detach(args), {k: detach(v) for k, v in kwargs.items()}))
        return fn

    def post(name):
        def fn(_mod, _args, out):
            outputs[name].append(detach(out[0] if isinstance(out, tuple) else out))
        return fn

    handles = [b.register_forward_pre_hook(pre(n), with_kwargs=True) for n, b in blocks]
    handles += [b.register_forward_hook(post(n)) for n, b in blocks]
    try:
        _run_calibration(model, calib, batch_size, progress)
    finally:
        for h in handles:
            h.remove()
    return inputs, outputs


def _block_groups(model: nn.Module, linears: dict[str, nn.Linear]) -> list[list[str]]:
    """Target linears grouped per decoder block, in block order; any outside a block come last."""
    groups, seen = [], set()
    for bname, _ in decoder_blocks(model):
        names = [n for n in linears if n.startswith(bname + ".")]
        if names:
            groups.append(names)
            seen.update(names)
    rest = [n for n in linears if n not in seen]
    return groups + ([rest] if rest else [])


def split_calibration(batches: list[torch.Tensor], val_fraction: float) -> tuple[list, list]:
    """(train, validation) batches: every round(1 / val_fraction)-th batch is held out for
    selecting the refined scales (none when val_fraction is 0 or there is a single batch: the
    training batches are then scored instead)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0.0 or len(batches) < 2:
        return batches, batches
    every = max(2, round(1.0 / val_fraction))
    held = set(range(every - 1, len(batches), every)) or {len(batches) - 1}
    return ([b for i, b in enumerate(batches) if i not in held],
            [b for i, b in enumerate(batches) if i in held])


@torch.no_grad()
def quantize_model(model: nn.Module, bits: int, group_size: int = 128, calib_data=None,
                   refine: bool = True, granularity: str = "layer", steps: int = 200,
                   lr: float = 1e-3, lam: float = 1e-4, skip=("lm_head",), calib_batch_size: int = 8,
                   backend: str = "auto", progress: bool = True, rounding: str = "log2",
                   sequential: bool = False, val_fraction: float = 0.125, eval_every: int = 50) -> nn.Module:
    """Replace the model's linear layers by `PoTLinear` in place; returns the model.

    Step 1 (always): grid-search scales per group, codes chosen by `rounding` ("log2": SPEC's
    round(log2|w|/s); "linear": the nearest level in value). Step 2 (`refine=True`): scale
    refinement over `calib_data` (LongTensor [n_seq, seq_len], or a list of such batches):
    - `granularity="layer"`: each linear on its output error, from H = XᵀX/T;
    - `"block"`: the linears of one decoder block jointly, on the block's output;
    - `"model"` [ours]: all scales jointly, on KL(p_fp ‖ p_PoT) of the logits over the
      calibration batches (`calib_batch_size` sequences each); a `val_fraction` of those batches
      is held out and scored every `eval_every` steps to pick the scales (the init included).
    `sequential` (layer / block): calibrate each decoder block on the inputs produced by the
    model whose earlier blocks are already quantized (GPTQ-style) instead of the full-precision
    model's. Per-module statistics and the settings are stored in `model.pot_quantization` (and
    saved by `save_quantized`).
    """
    check_bits(bits)
    check_group_size(group_size)
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    linears = target_linears(model, skip)
    if not linears:
        raise ValueError(f"no nn.Linear left to quantize in {type(model).__name__} after skip={skip!r}")
    calib = _check_calib(calib_data) if refine else None
    was_training = model.training
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    model.eval().requires_grad_(False)
    check_rounding(rounding)
    scales = {n: grid_search_scales(m.weight.float(), bits, group_size, rounding=rounding)
              for n, m in tqdm(linears.items(), desc=f"PoT{bits} grid search", disable=not progress)}
    stats: dict[str, dict] = {}

    def install(names):
        for n in names:
            _set_module(model, n, PoTLinear.from_linear(linears[n], bits, group_size, scales[n], backend, rounding))

    try:
        if refine and granularity == "layer":
            # sequential: one group per decoder block, in order, each calibrated on the inputs of
            # the model whose earlier blocks are already quantized; else one group, all at once
            groups = _block_groups(model, linears) if sequential else [list(linears)]
            for names in groups:
                hessians = capture_hessians(model, {n: linears[n] for n in names}, calib, calib_batch_size,
                                            progress and not sequential)
                bar = tqdm(names, desc=f"PoT{bits} refine (layer)", disable=not progress)
                for n in bar:
                    with torch.enable_grad():
                        scales[n], stats[n] = refine_layer_scales(linears[n].weight, hessians[n], scales[n], bits,
                                                                  group_size, steps, lr, lam, rounding)
                    bar.set_postfix(rel_err=f"{stats[n]['init_rel_err']:.2e}->{stats[n]['refined_rel_err']:.2e}")
                if sequential:
                    install(names)
        elif refine and granularity == "block":
            blocks = decoder_blocks(model)
            if not sequential:
                inputs, outputs = capture_block_io(model, blocks, calib, calib_batch_size, progress)
            bar = tqdm(blocks, desc=f"PoT{bits} refine (block)", disable=not progress)
            for bname, block in bar:
                inner = {n[len(bname) + 1:]: linears[n] for n in linears if n.startswith(bname + ".")}
                if not inner:
                    continue
                if sequential:  # this block's inputs from the model with earlier blocks quantized
                    inputs, outputs = capture_block_io(model, [(bname, block)], calib, calib_batch_size, False)
                with torch.enable_grad():
                    new, stats[bname] = refine_block_scales(
                        block, inner, {k: scales[f"{bname}.{k}"] for k in inner}, inputs[bname],
                        outputs[bname], bits, group_size, steps, lr, lam, rounding)
                for k, s in new.items():
                    scales[f"{bname}.{k}"] = s
                if sequential:
                    install([f"{bname}.{k}" for k in inner])
                bar.set_postfix(rel_err=f"{stats[bname]['init_rel_err']:.2e}->{stats[bname]['refined_rel_err']:.2e}")
        elif refine:  # "model": end-to-end KL of the logits, all Γ jointly
            chunks = [b[i:i + calib_batch_size] for b in calib for i in range(0, len(b), calib_batch_size)]
            train, val = split_calibration(chunks, val_fraction)
            with torch.enable_grad():
                new, stats["model"] = refine_model_scales(model, linears, scales, train, bits, group_size, steps,
                                                          lr, lam, rounding, val, eval_every, progress)
            scales.update(new)
        install(list(linears))
    finally:
        model.train(was_training)
        for n, p in model.named_parameters():
            p.requires_grad_(requires_grad.get(n, True))
    model.pot_quantization = {
        "bits": bits, "group_size": group_size, "rounding": rounding, "modules": sorted(linears), "refine": refine,
        "granularity": granularity if refine else None, "steps": steps if refine else 0, "lr": lr,
        "sequential": bool(sequential and refine and granularity != "model"),
        "val_fraction": val_fraction if refine and granularity == "model" else None,
        "lam": lam, "calib_tokens": sum(b.numel() for b in calib) if calib is not None else 0, "stats": stats,
    }
    return model


@torch.no_grad()
def int_rtn_fake_quantize(model: nn.Module, bits: int, group_size: int = 128, skip=("lm_head",)) -> nn.Module:
    """The uniform-INT round-to-nearest baseline, in place: each target linear's weight becomes
    its dequantized INT weight (the exact numbers the INT kernel produces, stored as floats)."""
    for _, m in target_linears(model, skip).items():
        q = int_quantize_rtn(m.weight.float(), bits, group_size)
        m.weight.copy_(q.dequantize().to(m.weight.dtype))
    return model


def bits_per_weight(in_out: list[tuple[int, int]], bits: int, group_size: int, zero_points: bool) -> dict:
    """Storage cost of quantized weights of shapes [(in_features, out_features), ...]:
    "nominal" = bits + (16 + 8·zero_points) / group_size (fp16 scale, uint8 zero point per group);
    "stored" = what the packed format really takes: rows of ceil(in / (32 // bits)) int32 words
    plus ceil(in / group_size) scales (and zero points) per row, over the number of weights."""
    check_bits(bits)
    check_group_size(group_size)
    per_group = 16 + (8 if zero_points else 0)
    n = sum(i * o for i, o in in_out)
    stored = sum(o * (-(-i // codes_per_word(bits)) * 32 + -(-i // group_size) * per_group) for i, o in in_out)
    return {"nominal": bits + per_group / group_size, "stored": stored / max(n, 1)}


def save_quantized(model: nn.Module, path, tokenizer=None) -> Path:
    """`save_pretrained` (packed codes and scales are buffers in the state dict) + the PoT config."""
    info = getattr(model, "pot_quantization", None)
    if info is None:
        raise ValueError("the model has no `pot_quantization` record: quantize it with quantize_model first")
    path = Path(path)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    (path / POT_CONFIG_FILE).write_text(json.dumps(info, indent=2))
    return path


def load_quantized(path, dtype=torch.float32, backend: str = "auto") -> nn.Module:
    """Rebuild a model saved by `save_quantized`: config -> empty PoTLinear shells -> state dict."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    cfg_file = path / POT_CONFIG_FILE
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file} not found: {path} is not a PoT checkpoint saved by save_quantized")
    info = json.loads(cfg_file.read_text())
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    for name in info["modules"]:
        lin = model.get_submodule(name)
        _set_module(model, name, PoTLinear(lin.in_features, lin.out_features, info["bits"],
                                           info["group_size"], bias=lin.bias is not None, backend=backend,
                                           rounding=info.get("rounding", "log2")))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {path}")
    state = {}
    for f in files:
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match its config: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.pot_quantization = info
    return model.eval()
