"""Convert a Llama / Qwen2 causal LM to ECHO (shared KV) and adapt it by continued training, with the
gradual schedule: each sharer starts reading its owner's K/V at its own step.

    python -m recipes.convert_echo [--model_name_or_path PATH] [--kv_sharing upper_half_pairs]
        [--schedule '[[0, {"7": 6}], [100, {"5": 4}]]'] [--steps 300] [--train_file text.txt]

With no `--model_name_or_path`, the embedded tiny math model is used (built once, cached). The data
is the synthetic math task rendered as chat (loss on the worked solutions), or `--train_file` plain
text (windows of `--seq_len` tokens, every token scored; the last tenth held out). Without
`--schedule`, the pairs of `--kv_sharing` start one at a time, the deepest first, evenly spaced over
the first `--schedule_fraction` of the steps. Until its step a sharer keeps and trains its own k/v
projections; at its step they are deleted (and dropped from the optimizer).

Writes into `--output_dir`: `model/` (the converted checkpoint and tokenizer), `convert_echo.json`
(losses, held-out losses, schedule, parameter and KV-cache counts) and `loss_curve.png`.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from trl import TrlParser

from archs.echo import EchoCache, convert_to_echo
from archs.echo.configuration_echo import resolve_kv_sharing
from archs.echo.convert import KVSharingSchedule

logger = logging.getLogger("recipes.convert_echo")
CACHE_PROBE_LENGTHS = (1, 16, 128, 512)


@dataclass
class ConvertEchoArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Local Llama / Qwen2 checkpoint or Hub id; default: the embedded tiny math model."})
    kv_sharing: str = field(default="upper_half_pairs", metadata={"help": "The target sharing map: 'upper_half_pairs' or a JSON {sharer: owner} map. Ignored with --schedule (its pairs are the map)."})
    schedule: str | None = field(default=None, metadata={"help": "JSON [[step, {sharer: owner}], ...]: from `step` on those sharers read their owner's K/V. Default: the gradual schedule described above."})
    schedule_fraction: float = field(default=0.5, metadata={"help": "Default schedule: the pairs start evenly spaced over this fraction of the steps."})
    kv_adapter: str = field(default="none", metadata={"help": "Per-sharer adapter of the borrowed K/V: none, scale or lowrank (identity at its start)."})
    kv_adapter_rank: int = field(default=8, metadata={"help": "Rank of the lowrank adapter."})
    steps: int = field(default=300, metadata={"help": "Optimizer steps of continued training."})
    batch_size: int = field(default=16, metadata={"help": "Sequences per step."})
    lr: float = field(default=3e-4, metadata={"help": "Peak AdamW learning rate (linear warm-up, cosine to 10%)."})
    warmup_steps: int = field(default=20, metadata={"help": "Warm-up steps."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay on the matrices (not on norms, biases, adapters)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping."})
    train_file: str | None = field(default=None, metadata={"help": "Plain-text training file (default: the synthetic math corpus)."})
    seq_len: int = field(default=256, metadata={"help": "Tokens per window of --train_file text."})
    train_problems: int = field(default=4000, metadata={"help": "Synthetic training problems."})
    eval_sequences: int = field(default=200, metadata={"help": "Held-out sequences (synthetic test problems, or text windows)."})
    eval_every: int = field(default=50, metadata={"help": "Held-out loss every N steps (and at each schedule step)."})
    seed: int = field(default=0, metadata={"help": "Seed of the data order, the synthetic text and torch."})
    output_dir: str = field(default="outputs/convert_echo", metadata={"help": "Where the model, JSON and PNG go."})
    tiny_cache_dir: str | None = field(default=None, metadata={"help": "Where the embedded tiny model is cached."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})


# --------------------------------------------------------------------------- data


def synthetic_examples(tokenizer, split: str, n: int, seed: int) -> list[tuple[list[int], int]]:
    """(ids of prompt + worked solution + EOS, prompt length) per synthetic math problem."""
    from archs.tiny.math_task import as_chat, generate_problems
    from archs.tiny.tokenizer import render_chat

    out = []
    for p in generate_problems(n, split, seed=seed, unique=split == "test"):
        prompt = tokenizer(render_chat(as_chat(p), add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        reply = tokenizer(p.solution + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        out.append((prompt + reply, len(prompt)))
    return out


def text_examples(tokenizer, path: str, seq_len: int) -> list[tuple[list[int], int]]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--train_file {path!r} does not exist")
    ids = tokenizer(p.read_text(), add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_len
    if n < 2:
        raise ValueError(f"{path} has {len(ids)} tokens: fewer than two windows of {seq_len}")
    return [(ids[i * seq_len:(i + 1) * seq_len], 0) for i in range(n)]


def collate(batch, pad_id: int):
    """Right-padded ids, attention mask, and labels (-100 on prompts and pads)."""
    width = max(len(seq) for seq, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for row, (seq, start) in enumerate(batch):
        ids[row, :len(seq)] = torch.tensor(seq)
        labels[row, start:len(seq)] = torch.tensor(seq[start:])
        mask[row, :len(seq)] = 1
    return ids, mask, labels


@torch.no_grad()
def heldout_loss(model, examples, batch_size: int = 32) -> float:
    """Mean next-token NLL over the scored tokens of the held-out examples."""
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        ids, mask, labels = collate(examples[i:i + batch_size], 0)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = labels[:, 1:]
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                                 ignore_index=-100, reduction="sum").item()
        count += int((target != -100).sum())
    model.train(was_training)
    return nll / count


@torch.no_grad()
def cache_counts(model, ids: torch.Tensor) -> dict:
    """Entries and bytes of the KV cache after one prefill of `ids` (a real cache, not a formula)."""
    out = model(input_ids=ids, use_cache=True)
    cache = out.past_key_values
    if isinstance(cache, EchoCache):
        return {"entries": cache.num_entries, "bytes": cache.kv_bytes(), "tokens": ids.numel()}
    assert isinstance(cache, DynamicCache)
    layers = [layer for layer in cache.layers if layer.keys is not None]
    return {"entries": len(layers), "bytes": sum(t.numel() * t.element_size() for layer in layers
                                                for t in (layer.keys, layer.values)), "tokens": ids.numel()}


# --------------------------------------------------------------------------- optimizer surgery


def param_groups(model, weight_decay: float) -> list[dict]:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and ".kv_adapter." not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and ".kv_adapter." not in n)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def update_optimizer(optimizer, removed, added) -> None:
    """Drop the deleted k/v projections (and their Adam state); new adapters join the no-decay group."""
    gone = {id(p) for p in removed}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in gone]
    for p in removed:
        optimizer.state.pop(p, None)
    optimizer.param_groups[1]["params"].extend(added)


def plot(losses: list[float], evals: list[dict], schedule: KVSharingSchedule, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    window = max(1, len(losses) // 50)
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    ax.plot(range(len(losses)), losses, alpha=0.25, color="C0")
    ax.plot(range(len(losses)), smooth, color="C0", label=f"train loss (mean of {window})")
    ax.plot([e["step"] for e in evals], [e["loss"] for e in evals], "o-", color="C1", label="held-out loss")
    for step, pairs in schedule.entries:
        ax.axvline(step, color="grey", ls=":", lw=1)
        ax.text(step, ax.get_ylim()[1], " " + ",".join(f"{s}→{o}" for s, o in pairs.items()), fontsize=7,
                va="top", rotation=90)
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    (a,) = TrlParser((ConvertEchoArguments,)).parse_args_and_config(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = a.model_name_or_path
    if path is None:
        from archs.tiny import build_tiny_math_model

        path = str(build_tiny_math_model(a.tiny_cache_dir))
        logger.info("no --model_name_or_path: using the embedded tiny math model at %s", path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    n_layers = base.config.num_hidden_layers

    if a.schedule is not None:
        schedule = KVSharingSchedule.parse(a.schedule, n_layers)
    else:
        target = a.kv_sharing if a.kv_sharing == "upper_half_pairs" else json.loads(a.kv_sharing)
        schedule = KVSharingSchedule.gradual(resolve_kv_sharing(target, n_layers),
                                             max(1, int(a.schedule_fraction * a.steps)))
    late = [step for step, _ in schedule.entries if step >= a.steps]
    if late:
        raise ValueError(f"schedule steps {late} are not before --steps {a.steps}: those pairs would never share")
    logger.info("schedule: %s", schedule.as_json())

    if a.train_file:
        windows = text_examples(tokenizer, a.train_file, a.seq_len)
        n_held = max(1, min(a.eval_sequences, len(windows) // 10))
        train, held = windows[:-n_held], windows[-n_held:]
    else:
        train = synthetic_examples(tokenizer, "train", a.train_problems, a.seed)
        held = synthetic_examples(tokenizer, "test", a.eval_sequences, a.seed + 1)
    # Cache probes: prefixes of the held-out text, up to CACHE_PROBE_LENGTHS tokens.
    stream = [t for seq, _ in held for t in seq]
    probes = [torch.tensor([stream[:n]]) for n in CACHE_PROBE_LENGTHS
              if n <= min(len(stream), base.config.max_position_embeddings)]

    # The model before training: the original exactly, and the one-shot conversion, for reference.
    model = convert_to_echo(base, kv_sharing={}, kv_adapter=a.kv_adapter, kv_adapter_rank=a.kv_adapter_rank)
    one_shot = convert_to_echo(base, kv_sharing=schedule.kv_sharing, kv_adapter=a.kv_adapter,
                               kv_adapter_rank=a.kv_adapter_rank)
    loss_original = heldout_loss(base, held)
    loss_one_shot = heldout_loss(one_shot, held)
    params_original = sum(p.numel() for p in base.parameters())
    cache_original = [cache_counts(base, ids) for ids in probes]
    del one_shot
    logger.info("held-out loss: original %.4f, converted at once without training %.4f", loss_original, loss_one_shot)

    model.train()
    optimizer = torch.optim.AdamW(param_groups(model, a.weight_decay), lr=a.lr, betas=(0.9, 0.98))

    def lr_at(step):
        if step < a.warmup_steps:
            return (step + 1) / a.warmup_steps
        frac = (step - a.warmup_steps) / max(1, a.steps - a.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    losses, evals, events = [], [], []
    order: list[int] = []
    tokens, start = 0, time.perf_counter()
    bar = tqdm(range(a.steps), desc="ECHO continued training", disable=not a.progress)
    for step in bar:
        removed, added = schedule.apply(model, step)
        if removed or added:
            update_optimizer(optimizer, removed, added)
            events.append({"step": step, "pairs": {str(s): o for s, o in schedule.starting_at(step).items()},
                           "parameters": sum(p.numel() for p in model.parameters()),
                           "optimizer_parameters": sum(p.numel() for g in optimizer.param_groups for p in g["params"]),
                           "heldout_loss_at_start": heldout_loss(model, held)})
            logger.info("step %d: %s share now; held-out loss %.4f", step, events[-1]["pairs"],
                        events[-1]["heldout_loss_at_start"])
        if not order:
            order = list(range(len(train)))
            rng.shuffle(order)
        batch = [train[order.pop()] for _ in range(min(a.batch_size, len(order)))]
        ids, mask, labels = collate(batch, tokenizer.pad_token_id or 0)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), a.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += int(mask.sum())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
        if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
            evals.append({"step": step + 1, "loss": heldout_loss(model, held)})
    train_seconds = time.perf_counter() - start
    model.eval()

    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    cache_echo = [cache_counts(model, ids) for ids in probes]
    result = {
        "model": path, "args": asdict(a), "schedule": schedule.as_json(),
        "kv_sharing": {str(s): o for s, o in model.config.kv_sharing.items()}, "num_layers": n_layers,
        "heldout": {"original": loss_original, "one_shot_untrained": loss_one_shot, "final": evals[-1]["loss"],
                    "sequences": len(held)},
        "train_losses": losses, "evals": evals, "schedule_events": events,
        "parameters": {"original": params_original, "echo": sum(p.numel() for p in model.parameters())},
        "kv_cache": [{"tokens": c0["tokens"], "original": c0, "echo": c1} for c0, c1 in zip(cache_original, cache_echo)],
        "train_seconds": train_seconds, "tokens_per_s": tokens / train_seconds,
    }
    (out / "convert_echo.json").write_text(json.dumps(result, indent=2))
    plot(losses, evals, schedule, out / "loss_curve.png",
         f"ECHO conversion of {Path(path).name}: sharing {result['kv_sharing']}")

    print(f"\nECHO conversion of {path}: {n_layers} layers, sharing {result['kv_sharing']}")
    print("| | original | ECHO |\n|---|---|---|")
    print(f"| parameters | {params_original:,} | {result['parameters']['echo']:,} |")
    for c0, c1 in zip(cache_original, cache_echo):
        print(f"| KV cache after {c0['tokens']} tokens: entries, bytes | {c0['entries']}, {c0['bytes']:,} | "
              f"{c1['entries']}, {c1['bytes']:,} ({1 - c1['bytes'] / c0['bytes']:.2%} less) |")
    print(f"| held-out loss | {loss_original:.4f} | {evals[-1]['loss']:.4f} "
          f"(converted at once, untrained: {loss_one_shot:.4f}) |")
    print(f"\nwrote {out / 'model'}, {out / 'convert_echo.json'}, {out / 'loss_curve.png'}")
    return result


if __name__ == "__main__":
    main()
