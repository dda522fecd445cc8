"""Pretrain every architecture family and a Llama baseline of the same size on the same corpus and
token budget, then measure each against sequence length.

    python -m recipes.pretrain_compare [--families llama scout_swa scout_mamba dtrnet integral ...]
        [--corpus_path my.txt] [--train_tokens 300000] [--lengths 256 512 1024 2048 4096 8192]
        [--output_dir outputs/pretrain_compare]

The corpus is the embedded synthetic one (word problems with worked solutions, `archs.tiny`) or a
user's UTF-8 text file, read as bytes (vocabulary 256, no tokenizer to train, the same for every
family). Every model has the same width, heads and MLP size, and the same number of MLPs (a SCOUT
double block holds two, so SCOUT gets half as many blocks). Reports per family: parameters, final
training loss, training tokens/s, and against length N: forward seconds, decode ms per token (after
a prefill of N tokens, through the family's cache), KV-cache bytes after the prefill (every tensor
the cache holds, counted once) and, on a GPU, peak memory; DTRNet's routed fraction per layer over
training. Writes `pretrain_compare.json`, `pretrain_compare.md` and `pretrain_compare.png`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import archs  # noqa: F401  (registers the families)
from archs.cache_utils import cache_bytes

logger = logging.getLogger("recipes.pretrain_compare")

VOCAB = 256


# --------------------------------------------------------------------------- models of one size

def family_configs(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, max_len: int) -> dict:
    """Config builders of every family at one shape; `layers` counts MLPs (decoder layers of Llama)."""
    from transformers import LlamaConfig

    from archs.dtrnet.configuration_dtrnet import DTRNetConfig
    from archs.integral.configuration_integral import IntegralConfig
    from archs.scout.configuration_scout import ScoutConfig

    common = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, max_position_embeddings=max_len, tie_word_embeddings=True,
                  bos_token_id=None, eos_token_id=None, pad_token_id=0)
    head_dim = hidden // heads
    builders = {
        "llama": lambda: LlamaConfig(num_hidden_layers=layers, **common),
        "scout_swa": lambda: ScoutConfig(num_hidden_layers=max(1, layers // 2), mixer="swa", sliding_window=256,
                                         segment_size=10, **common),
        "scout_mamba": lambda: ScoutConfig(num_hidden_layers=max(1, layers // 2), mixer="mamba", segment_size=10,
                                           time_step_rank="auto", **common),
        "dtrnet": lambda: DTRNetConfig(num_hidden_layers=layers, **common),
        "integral": lambda: IntegralConfig(num_hidden_layers=layers, num_signals=4 if head_dim % 8 == 0 else 2,
                                           **common),
    }
    try:
        from archs.echo.configuration_echo import EchoConfig  # noqa: F401
        from archs.echo.convert import convert_to_echo
        builders["echo"] = lambda: ("convert", convert_to_echo, LlamaConfig(num_hidden_layers=layers, **common))
    except ImportError:
        pass
    try:
        from archs.regla.configuration_regla import ReglaConfig
        builders["regla"] = lambda: ReglaConfig(num_hidden_layers=layers, **common)
    except ImportError:
        pass
    return builders


def build_model(name: str, builders: dict, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = builders[name]()
    if isinstance(config, tuple):  # ECHO is a conversion of a Llama model
        _, convert, base = config
        return convert(AutoModelForCausalLM.from_config(base))
    return AutoModelForCausalLM.from_config(config)


# --------------------------------------------------------------------------- corpus

def corpus_bytes(path: str | None, seed: int, min_bytes: int) -> bytes:
    if path:
        data = Path(path).expanduser().read_bytes()
        if len(data) < 1024:
            raise ValueError(f"corpus {path!r} has {len(data)} bytes; need at least 1024")
        return data
    from archs.tiny.math_task import make_problem

    rng, parts, size = random.Random(seed), [], 0
    while size < min_bytes:
        problem = make_problem(rng.randint(1, 5), rng)
        text = f"Q: {problem.question}\nA: {problem.solution}\n\n"
        parts.append(text)
        size += len(text)
    return "".join(parts).encode()


def batches(data: bytes, batch: int, seq_len: int, steps: int, seed: int):
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(tokens) - seq_len - 1, (batch,), generator=g)
        yield torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])


# --------------------------------------------------------------------------- training

def train(model, name: str, data: bytes, args) -> dict:
    steps = max(1, args.train_tokens // (args.batch_size * args.seq_len))
    opt = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10))
                                              * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    losses, fractions, seen, start = [], [], 0, time.perf_counter()
    bar = tqdm(batches(data, args.batch_size, args.seq_len, steps, args.seed), total=steps, desc=f"train {name}")
    for step, ids in enumerate(bar):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        seen += ids.numel()
        if step % args.log_every == 0 or step == steps - 1:
            losses.append({"step": step, "tokens": seen, "loss": out.loss.item()})
            routed = getattr(out, "routed_fraction", None)
            if routed is not None:
                fractions.append({"tokens": seen, "routed_fraction": routed.detach().tolist()})
            bar.set_postfix(loss=f"{losses[-1]['loss']:.3f}")
    seconds = time.perf_counter() - start
    model.eval()
    return {"steps": steps, "tokens": seen, "seconds": seconds, "tokens_per_s": seen / seconds,
            "final_loss": sum(r["loss"] for r in losses[-3:]) / len(losses[-3:]), "losses": losses,
            "routed_fraction": fractions}


# --------------------------------------------------------------------------- length sweep

def _seconds(fn, device, repeats: int) -> float:
    """The fastest of `repeats` runs (the least disturbed by other work on a shared machine)."""
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


@torch.no_grad()
def decode_seconds(model, ids, decode_tokens: int, device) -> tuple[float, object]:
    """Prefill `ids` through `generate()` (the family's own cache), then time `decode_tokens` single-token
    forwards through that cache; returns (seconds per token, the cache as the prefill left it: its size)."""
    first = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                           pad_token_id=0, eos_token_id=None, return_dict_in_generate=True)
    cache, seq = first.past_key_values, first.sequences
    size = cache_bytes(cache)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(decode_tokens):
        out = model(input_ids=seq[:, -1:], attention_mask=torch.ones_like(seq), past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        seq = torch.cat([seq, out.logits[:, -1:].argmax(-1)], dim=1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / decode_tokens, size


@torch.no_grad()
def measure_length(model, n: int, decode_tokens: int, device, repeats: int = 3) -> dict:
    ids = torch.randint(1, VOCAB, (1, n), device=device)
    mask = torch.ones_like(ids)
    model(input_ids=ids, attention_mask=mask)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    forward_s = _seconds(lambda: model(input_ids=ids, attention_mask=mask), device, repeats)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    runs = [decode_seconds(model, ids, decode_tokens, device) for _ in range(repeats)]
    return {"length": n, "forward_s": forward_s, "decode_ms_per_token": 1000 * min(r[0] for r in runs),
            "cache_bytes": runs[0][1], "peak_memory_bytes": peak}


# --------------------------------------------------------------------------- report

def markdown(results: dict) -> str:
    lines = ["| family | parameters | final loss | train tokens/s |", "|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['parameters']:,} | {r['train']['final_loss']:.3f} | {r['train']['tokens_per_s']:.0f} |")
    lengths = [m["length"] for m in next(iter(results.values()))["lengths"]]
    for key, title, fmt in (("forward_s", "forward seconds", "{:.3f}"), ("decode_ms_per_token", "decode ms per token", "{:.1f}"),
                            ("cache_bytes", "KV-cache KiB after the prefill", "{:.0f}")):
        lines += ["", f"{title} against length", "", "| family | " + " | ".join(map(str, lengths)) + " |",
                  "|---|" + "---|" * len(lengths)]
        for name, r in results.items():
            values = [m[key] / 1024 if key == "cache_bytes" else m[key] for m in r["lengths"]]
            lines.append(f"| {name} | " + " | ".join(fmt.format(v) for v in values) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_routing = any(r["train"]["routed_fraction"] for r in results.values())
    fig, axes = plt.subplots(1, 5 if has_routing else 4, figsize=(24 if has_routing else 19, 4))
    for name, r in results.items():
        axes[0].plot([x["tokens"] for x in r["train"]["losses"]], [x["loss"] for x in r["train"]["losses"]], label=name)
        n = [m["length"] for m in r["lengths"]]
        axes[1].plot(n, [m["forward_s"] for m in r["lengths"]], "o-", label=name)
        axes[2].plot(n, [m["decode_ms_per_token"] for m in r["lengths"]], "o-", label=name)
        axes[3].plot(n, [m["cache_bytes"] / 2**20 for m in r["lengths"]], "o-", label=name)
    for ax, title in zip(axes, ("training loss (nats/byte) vs tokens", "forward s vs length",
                                "decode ms/token vs length", "KV-cache MiB vs length")):
        ax.set_title(title)
        ax.legend(fontsize=7)
    for ax in axes[1:4]:
        ax.set_xscale("log", base=2)
    if has_routing:
        for name, r in results.items():
            rows = r["train"]["routed_fraction"]
            for layer in range(len(rows[0]["routed_fraction"]) if rows else 0):
                axes[4].plot([x["tokens"] for x in rows], [x["routed_fraction"][layer] for x in rows],
                             label=f"{name} layer {layer}")
        axes[4].set_title("DTRNet routed fraction per layer")
        axes[4].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", nargs="+", default=None, help="default: every family available")
    p.add_argument("--corpus_path", default=None, help="a UTF-8 text file (default: the synthetic corpus)")
    p.add_argument("--hidden_size", type=int, default=128)
    p.add_argument("--layers", type=int, default=4, help="MLP layers (Llama decoder layers; SCOUT gets half as many double blocks)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv_heads", type=int, default=2)
    p.add_argument("--intermediate_size", type=int, default=512)
    p.add_argument("--train_tokens", type=int, default=300_000)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--learning_rate", type=float, default=3e-3)
    p.add_argument("--log_every", type=int, default=10)
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192])
    p.add_argument("--decode_tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="timings are the fastest of this many runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--output_dir", default="outputs/pretrain_compare")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    builders = family_configs(args.hidden_size, args.layers, args.heads, args.kv_heads, args.intermediate_size,
                              max(max(args.lengths) + args.decode_tokens + 1, args.seq_len))
    families = args.families or list(builders)
    unknown = [f for f in families if f not in builders]
    if unknown:
        raise ValueError(f"unknown families {unknown}; available: {sorted(builders)}")
    if args.train_tokens < args.batch_size * args.seq_len or min(args.lengths) < 1 or args.decode_tokens < 1:
        raise ValueError("need train_tokens >= batch_size * seq_len, lengths >= 1 and decode_tokens >= 1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = corpus_bytes(args.corpus_path, args.seed, min_bytes=max(200_000, 4 * args.seq_len))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m recipes.pretrain_compare " + " ".join(argv if argv is not None else sys.argv[1:])
    results = {}
    for name in families:
        model = build_model(name, builders, args.seed).to(device)
        n_params = sum(p.numel() for p in model.parameters())
        logger.info("%s: %s parameters", name, f"{n_params:,}")
        trained = train(model, name, data, args)
        lengths = [measure_length(model, n, args.decode_tokens, device, args.repeats)
                   for n in tqdm(args.lengths, desc=f"lengths {name}")]
        results[name] = {"parameters": n_params, "train": trained, "lengths": lengths}
        write_outputs(out, command, args, device, results)  # after every family: a stopped run keeps its results
    print(markdown(results))
    print(f"outputs: {out}/pretrain_compare.json, pretrain_compare.md, pretrain_compare.png")
    return results


def write_outputs(out: Path, command: str, args, device, results: dict) -> None:
    (out / "pretrain_compare.json").write_text(json.dumps({"command": command, "config": vars(args),
                                                           "device": str(device), "results": results}, indent=2))
    (out / "pretrain_compare.md").write_text(f"`{command}` on {device}\n\n{markdown(results)}\n")
    plot(results, out / "pretrain_compare.png")


if __name__ == "__main__":
    main()
