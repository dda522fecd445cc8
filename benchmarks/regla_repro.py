"""ReGLA reproductions (SPEC §9, arXiv 2502.01578), on tiny models and the embedded synthetic corpus.

    python -m benchmarks.regla_repro [--steps 120] [--lengths 16 64 256 512] [--output_dir outputs/regla_repro]

1. Gate-saturation escape. Two tiny ReGLA models, identical but for the forget gate: the refining gate
   F = (1 − r) g² + r (1 − (1 − g)²) and the plain gate (r ≡ 0, F = g²). Their gate biases b_g start at
   ±6 (alternating over gate features; W_r's bias at 0), so every gate value starts within 1e-2 of 0
   or 1. Both train the same steps on the same batches of the synthetic math chats (next-token loss).
   Every `--eval_every` steps, on a fixed held-out batch: the fraction of gate values F (every real
   token, layer, head and feature) within 1e-2 of 0 or 1, per half (+6 and −6) and overall, and the loss.
   The paper's expectation: the refining gate moves off the boundary, the plain gate stays.
2. Decode memory against generation length. A pure ReGLA model, the hybrid (softmax attention in half
   the layers) and a Llama model of the same shape decode greedily from one prompt; at each length N
   the bytes their real caches hold are read from the tensors themselves (ReGLA: S and m per layer;
   Llama: DynamicCache K/V), with the entry counts.

Writes `regla_repro.json`, `regla_repro.md` and `regla_repro.png` under `--output_dir`.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from archs.regla import ReglaCache, ReglaConfig, ReglaForCausalLM
from archs.regla.modeling_regla import gate_bias
from archs.tiny.build import TinyMathRecipe, build_tokenizer
from archs.tiny.math_task import as_chat, generate_problems
from archs.tiny.tokenizer import render_chat
from benchmarks.report import command_line, write_report

SATURATION = 1e-2


# --------------------------------------------------------------------------- 1. gate saturation


def corpus(tokenizer, n: int, split: str, seed: int, max_tokens: int) -> list[list[int]]:
    """Whole chats (system, question, worked solution) as token ids."""
    texts = [render_chat(as_chat(p) + [{"role": "assistant", "content": p.solution}])
             for p in generate_problems(n, split, seed=seed)]
    return [tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens] for t in texts]


def collate(seqs: list[list[int]], pad_id: int):
    """Right-padded ids, attention mask and labels (−100 at pads)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(seqs):
        ids[row, :len(s)] = torch.tensor(s)
        mask[row, :len(s)] = 1
    return ids, mask, ids.masked_fill(mask == 0, -100)


def saturation_model(vocab: int, refining: bool, hidden: int, layers: int, seed: int) -> ReglaForCausalLM:
    torch.manual_seed(seed)
    config = ReglaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, refining_gate=refining, tie_word_embeddings=True)
    model = ReglaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            b = gate_bias(layer.self_attn.forget_proj)
            b.copy_(torch.where(torch.arange(b.numel()) % 2 == 0, 6.0, -6.0))
    return model


@torch.no_grad()
def gate_values(model, ids, mask) -> torch.Tensor:
    """F (B, H, T, D) of every layer, flattened over real tokens: (layers, values)."""
    captured = []
    hooks = [layer.self_attn.register_forward_pre_hook(
        lambda mod, args: captured.append((mod.log_forget_gate(args[0]).exp(), args[1])))
        for layer in model.model.layers]
    model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    return [f.permute(0, 2, 1, 3)[valid] for f, valid in captured]  # each (real tokens, H, D)


def saturation_stats(model, batch) -> dict:
    ids, mask, labels = batch
    f = torch.stack(gate_values(model, ids, mask))  # (layers, tokens, H, D)
    near = (f < SATURATION) | (f > 1 - SATURATION)
    plus = torch.arange(f.size(-2) * f.size(-1)) % 2 == 0  # gate features whose b_g began at +6
    near = near.flatten(-2)
    biases = torch.stack([gate_bias(layer.self_attn.forget_proj).detach() for layer in model.model.layers])
    with torch.no_grad():
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    return {"saturated": near.double().mean().item(),
            "saturated_plus6": near[..., plus].double().mean().item(),
            "saturated_minus6": near[..., ~plus].double().mean().item(),
            "mean_gate": f.double().mean().item(),
            "mean_bias_plus6": biases[:, plus].mean().item(),
            "mean_bias_minus6": biases[:, ~plus].mean().item(),
            "loss": loss}


def train_saturation(tokenizer, args) -> dict:
    train = corpus(tokenizer, args.steps * args.batch_size, "train", args.seed, args.max_tokens)
    held_out = collate(corpus(tokenizer, args.batch_size, "test", args.seed, args.max_tokens), tokenizer.pad_token_id)
    runs = {}
    for name, refining in (("refining", True), ("plain", False)):
        model = saturation_model(len(tokenizer), refining, args.hidden, args.layers, args.seed)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        order = list(range(len(train)))
        random.Random(args.seed).shuffle(order)  # the same batches for both gates
        curve, start = [], time.perf_counter()
        model.eval()
        curve.append({"step": 0, **saturation_stats(model, held_out)})
        for step in range(1, args.steps + 1):
            model.train()
            ids, mask, labels = collate([train[i] for i in order[(step - 1) * args.batch_size: step * args.batch_size]],
                                        tokenizer.pad_token_id)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step % args.eval_every == 0 or step == args.steps:
                model.eval()
                curve.append({"step": step, **saturation_stats(model, held_out)})
        runs[name] = {"curve": curve, "seconds": round(time.perf_counter() - start, 1),
                      "parameters": sum(p.numel() for p in model.parameters())}
    return runs


# --------------------------------------------------------------------------- 2. decode memory


def memory_models(hidden: int, layers: int, heads: int, seed: int) -> dict:
    shared = dict(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=heads)
    torch.manual_seed(seed)
    models = {"regla": ReglaForCausalLM(ReglaConfig(**shared)),
              "regla_hybrid": ReglaForCausalLM(ReglaConfig(**shared, softmax_layers="half")),
              "llama": LlamaForCausalLM(LlamaConfig(**shared))}
    return {k: m.eval() for k, m in models.items()}


def cache_bytes(cache) -> dict:
    """What a real cache holds, read from its tensors."""
    if isinstance(cache, ReglaCache):
        sizes = cache.nbytes()
        return {"state_bytes": sizes["state"], "kv_bytes": sizes["kv"], "kv_entries": cache.kv_entries(),
                "bookkeeping_bytes": sizes["bookkeeping"]}
    if isinstance(cache, DynamicCache):
        kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        entries = sum(layer.keys.size(0) * layer.keys.size(2) for layer in cache.layers)
        return {"state_bytes": 0, "kv_bytes": kv, "kv_entries": entries, "bookkeeping_bytes": 0}
    raise TypeError(f"unexpected cache {type(cache).__name__}")


@torch.no_grad()
def decode_memory(args) -> dict:
    models = memory_models(args.mem_hidden, args.mem_layers, args.mem_heads, args.seed)
    prompt = torch.randint(1, 256, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(args.seed))
    lengths = sorted(set(args.lengths))
    if lengths[0] < args.prompt_tokens:
        raise ValueError(f"--lengths {lengths} must be >= --prompt_tokens {args.prompt_tokens}")
    table = {}
    for name, model in models.items():
        out = model(input_ids=prompt, use_cache=True)
        cache, seen, rows = out.past_key_values, prompt.size(1), []
        for n in lengths:
            while seen < n:
                out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
                seen += 1
            rows.append({"tokens": n, **cache_bytes(cache)})
        table[name] = rows
    c = models["regla"].config
    shape = {"hidden": c.hidden_size, "layers": c.num_hidden_layers, "heads": c.num_attention_heads,
             "head_dim": c.head_dim, "feature_dim": c.feature_dim, "batch": 1, "dtype": "float32",
             "hybrid_softmax_layers": models["regla_hybrid"].config.softmax_layers}
    return {"shape": shape, "by_model": table}


# --------------------------------------------------------------------------- report


def markdown(result: dict) -> str:
    lines = ["Gate saturation: fraction of gate values F within 1e-2 of 0 or 1 (held-out batch)", "",
             "| step | refining: all | +6 half | −6 half | loss | plain: all | +6 half | −6 half | loss |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ref, plain = result["saturation"]["refining"]["curve"], result["saturation"]["plain"]["curve"]
    for a, b in zip(ref, plain):
        lines.append(f"| {a['step']} | {a['saturated']:.3f} | {a['saturated_plus6']:.3f} | {a['saturated_minus6']:.3f} | "
                     f"{a['loss']:.3f} | {b['saturated']:.3f} | {b['saturated_plus6']:.3f} | "
                     f"{b['saturated_minus6']:.3f} | {b['loss']:.3f} |")
    mem = result["memory"]
    s = mem["shape"]
    lines += ["", f"Decode cache bytes (batch 1, float32; hidden {s['hidden']}, {s['layers']} layers, {s['heads']} heads "
              f"of {s['head_dim']}; hybrid: softmax in layers {s['hybrid_softmax_layers']})", "",
              "| tokens | ReGLA state | ReGLA hybrid state + K/V (entries) | Llama K/V (entries) |",
              "|---:|---:|---:|---:|"]
    for r, h, ll in zip(mem["by_model"]["regla"], mem["by_model"]["regla_hybrid"], mem["by_model"]["llama"]):
        lines.append(f"| {r['tokens']} | {r['state_bytes'] + r['kv_bytes']:,} | "
                     f"{h['state_bytes']:,} + {h['kv_bytes']:,} ({h['kv_entries']}) | {ll['kv_bytes']:,} ({ll['kv_entries']}) |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, color in (("refining", "tab:orange"), ("plain", "tab:blue")):
        curve = result["saturation"][name]["curve"]
        ax1.plot([p["step"] for p in curve], [p["saturated"] for p in curve], "o-", ms=3, color=color,
                 label=f"{name} gate")
    ax1.set_xlabel("training step")
    ax1.set_ylabel("fraction of F within 1e-2 of 0 or 1")
    ax1.set_ylim(-0.02, 1.02)
    ax1.set_title("gate biases initialised at ±6", fontsize=10)
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    for name, color in (("regla", "tab:orange"), ("regla_hybrid", "tab:green"), ("llama", "tab:blue")):
        rows = result["memory"]["by_model"][name]
        ax2.plot([r["tokens"] for r in rows], [r["state_bytes"] + r["kv_bytes"] for r in rows], "o-", ms=3,
                 color=color, label=name)
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    lengths = [r["tokens"] for r in result["memory"]["by_model"]["regla"]]
    ax2.set_xticks(lengths, [str(n) for n in lengths])
    ax2.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax2.set_xlabel("tokens seen")
    ax2.set_ylabel("cache bytes (batch 1)")
    ax2.set_title("decode cache against length", fontsize=10)
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=120, help="training steps per gate")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--eval_every", type=int, default=12)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--hidden", type=int, default=64, help="hidden size of the saturation models (4 heads)")
    p.add_argument("--layers", type=int, default=2, help="layers of the saturation models")
    p.add_argument("--max_tokens", type=int, default=96, help="chats are cut to this many tokens")
    p.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 256, 512], help="decode lengths measured")
    p.add_argument("--prompt_tokens", type=int, default=8)
    p.add_argument("--mem_hidden", type=int, default=256)
    p.add_argument("--mem_layers", type=int, default=4)
    p.add_argument("--mem_heads", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", default="outputs/regla_repro")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    for name in ("steps", "batch_size", "eval_every", "hidden", "layers", "max_tokens", "prompt_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")

    start = time.perf_counter()
    tokenizer = build_tokenizer(TinyMathRecipe(vocab_size=400), seed=args.seed)
    result = {"command": command_line("benchmarks.regla_repro", argv), "settings": vars(args),
              "saturation": train_saturation(tokenizer, args), "memory": decode_memory(args)}
    result["seconds"] = round(time.perf_counter() - start, 1)
    md = markdown(result)
    print(md)
    out = Path(args.output_dir)
    write_report(out, "regla_repro", result, md)
    plot(result, out / "regla_repro.png")
    print(f"\nwrote {out}/regla_repro.json, regla_repro.md, regla_repro.png ({result['seconds']} s)")
    return result


if __name__ == "__main__":
    main()
