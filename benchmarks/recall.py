"""Multi-query associative recall (MQAR, SPEC §8): does retrieval give a linear recurrent model the recall
its fixed-size state lacks?

    python -m benchmarks.recall [--steps 1000] [--pairs 4 8 16] [--lengths 64 128] [--output_dir outputs/recall]

Each sequence holds `pairs` key–value pairs (distinct random keys, random values), then filler tokens, then
every key once more in a new order, each followed by its value; the loss and the accuracy count only the
answers (the values after the queried keys). Generated in-house from a seeded `torch.Generator`.

Three models of the same width, depth and heads train the same steps on the same batches (step i has
length `lengths[i mod len(lengths)]`, its batch an equal share of every pair count): plain ReGLA with a
small recurrent state (`--feature_dim`), the same ReGLA with Resona retrieval in its last layer, and a
Llama (softmax attention, RoPE) baseline. Then recall accuracy (argmax = the value) on held-out
sequences of every setting, and for Resona how often the retrieval picked the chunk that holds the
answer (any head). A ReGLA layer's state holds H·Dk·Dv numbers; Resona's cache grows with the tokens.

Writes `recall.json`, `recall.md` and `recall.png` under `--output_dir`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from archs.regla import ReglaConfig, ReglaForCausalLM
from archs.resona import ResonaConfig, ResonaForCausalLM
from benchmarks.report import command_line, write_report

IGNORE = -100
MODELS = ("regla", "resona", "llama")


# --------------------------------------------------------------------------- the task


@dataclass(frozen=True)
class MQARTask:
    """Token ids: 0 is padding (unused here), keys 1..K, values K+1..K+V, filler K+V+1..K+V+F."""

    num_keys: int = 64
    num_values: int = 64
    num_filler: int = 16

    @property
    def vocab_size(self) -> int:
        return 1 + self.num_keys + self.num_values + self.num_filler

    @property
    def first_value(self) -> int:
        return 1 + self.num_keys

    @property
    def first_filler(self) -> int:
        return 1 + self.num_keys + self.num_values

    def check(self, pairs: int, length: int) -> None:
        if pairs < 1 or pairs > self.num_keys:
            raise ValueError(f"pairs must be in [1, num_keys={self.num_keys}], got {pairs}")
        if length < 4 * pairs:
            raise ValueError(f"a sequence of {pairs} pairs and their {pairs} queries needs length >= {4 * pairs}, "
                             f"got {length}")


def mqar_batch(task: MQARTask, batch: int, pairs: int, length: int, generator: torch.Generator):
    """(ids, labels), each (batch, length): `pairs` key–value pairs, filler, then each key again followed
    by its value. labels = the value at each query's answer position, −100 elsewhere (the causal-LM
    loss predicts labels[j] from position j − 1, the queried key)."""
    task.check(pairs, length)
    keys = torch.rand(batch, task.num_keys, generator=generator).argsort(dim=1)[:, :pairs] + 1
    values = torch.randint(task.first_value, task.first_filler, (batch, pairs), generator=generator)
    order = torch.rand(batch, pairs, generator=generator).argsort(dim=1)
    context = torch.stack([keys, values], dim=2).flatten(1)
    queries = torch.stack([keys.gather(1, order), values.gather(1, order)], dim=2).flatten(1)
    gap = length - 4 * pairs
    filler = torch.randint(task.first_filler, task.vocab_size, (batch, gap), generator=generator)
    ids = torch.cat([context, filler, queries], dim=1)
    labels = torch.full_like(ids, IGNORE)
    answers = torch.arange(length - 2 * pairs + 1, length, 2)
    labels[:, answers] = ids[:, answers]
    return ids, labels


# --------------------------------------------------------------------------- the models


def build_models(task: MQARTask, args) -> dict:
    """The three models, each from the same seed; Resona starts from plain ReGLA's weights (its own are
    the retrieval branch's only), so the two differ by the branch alone."""
    shared = dict(vocab_size=task.vocab_size, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                  num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                  max_position_embeddings=max(args.lengths), tie_word_embeddings=True, pad_token_id=0,
                  bos_token_id=None, eos_token_id=None, initializer_range=args.init_std)
    regla = dict(feature_dim=args.feature_dim, chunk_size=16)
    retrieval = dict(retrieval_layers=[args.layers - 1], retrieval_chunk_size=args.chunk, retrieval_top_k=args.top_k,
                     retrieval_gate_init=args.gate_init)
    models = {}
    for name in MODELS:
        torch.manual_seed(args.seed)
        if name == "regla":
            models[name] = ReglaForCausalLM(ReglaConfig(**shared, **regla))
        elif name == "resona":
            models[name] = ResonaForCausalLM(ResonaConfig(**shared, **regla, **retrieval))
            missing, unexpected = models[name].load_state_dict(models["regla"].state_dict(), strict=False)
            assert not unexpected and all(".retrieval." in key for key in missing), (missing, unexpected)
        else:
            models[name] = LlamaForCausalLM(LlamaConfig(**shared, attn_implementation="sdpa"))
    return models


def state_numbers(model) -> int | None:
    """Numbers in the recurrent decode state (all layers, batch 1); None for Llama (its K/V grow with N)."""
    if isinstance(model, LlamaForCausalLM):
        return None
    c = model.config
    return c.num_hidden_layers * c.num_attention_heads * (c.feature_dim * c.head_dim + 1)


# --------------------------------------------------------------------------- training and evaluation


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of `lr`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def training_batch(task: MQARTask, step: int, args, generator: torch.Generator):
    """Step `step`'s batch: length `lengths[step mod len(lengths)]`, an equal share of every pair count."""
    lengths, pairs = sorted(set(args.lengths)), sorted(set(args.pairs))
    length = lengths[step % len(lengths)]
    share = [args.batch_size // len(pairs) + (i < args.batch_size % len(pairs)) for i in range(len(pairs))]
    parts = [mqar_batch(task, n, p, length, generator) for p, n in zip(pairs, share) if n]
    return torch.cat([ids for ids, _ in parts]), torch.cat([labels for _, labels in parts])


def train(model, task: MQARTask, args, desc: str) -> dict:
    """`args.steps` AdamW steps on fresh batches (`training_batch`), the same batches for every model."""
    generator = torch.Generator().manual_seed(args.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, args.steps // 10)
    model.train()
    losses, start = [], time.perf_counter()
    bar = tqdm(range(args.steps), desc=desc, leave=False, disable=args.quiet)
    for step in bar:
        ids, labels = training_batch(task, step, args, generator)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, warmup)
        loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    tail = losses[-max(1, args.steps // 10):]
    return {"seconds": round(time.perf_counter() - start, 1), "final_loss": sum(tail) / len(tail),
            "loss_curve": losses[:: max(1, args.steps // 50)]}


@torch.no_grad()
def recall_accuracy(model, task: MQARTask, pairs: int, length: int, n: int, batch_size: int, seed: int) -> float:
    """Fraction of answers whose argmax is the value, over `n` held-out sequences of one setting."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    right = total = 0
    for lo in range(0, n, batch_size):
        ids, labels = mqar_batch(task, min(batch_size, n - lo), pairs, length, generator)
        logits = model(input_ids=ids, use_cache=False).logits
        answer = labels[:, 1:] != IGNORE
        predicted = logits[:, :-1].argmax(dim=-1)
        right += int((predicted == labels[:, 1:])[answer].sum())
        total += int(answer.sum())
    return right / total


@torch.no_grad()
def selection_hits(model, task: MQARTask, pairs: int, length: int, n: int, batch_size: int, seed: int) -> float:
    """Resona: the fraction of answers for which the last retrieval layer, at the queried key, picked (in
    some head) the chunk that holds that key's value in the context. The layer's inputs are captured in the
    model's forward and its selection recomputed on them (same sequences as `recall_accuracy`)."""
    layer = next(layer for layer in reversed(model.model.layers) if layer.retrieval is not None)
    captured = []
    hook = layer.retrieval.register_forward_pre_hook(lambda module, args: captured.append(args[:3]))
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    hits = total = 0
    try:
        for lo in range(0, n, batch_size):
            ids, labels = mqar_batch(task, min(batch_size, n - lo), pairs, length, generator)
            captured.clear()
            model(input_ids=ids, use_cache=False)
            _, (index, real) = layer.retrieval.attend(*captured[0], return_selection=True)
            chunk_size = layer.retrieval.chunk_size
            for row, answer in (labels != IGNORE).nonzero().tolist():
                key = ids[row, answer - 1]
                pair = int((ids[row, 0:2 * pairs:2] == key).nonzero()[0, 0])
                picked = index[row, :, answer - 1][real[row, :, answer - 1]]
                hits += int((picked == (2 * pair + 1) // chunk_size).any())
                total += 1
    finally:
        hook.remove()
    return hits / total


# --------------------------------------------------------------------------- report


def markdown(result: dict) -> str:
    names = list(result["models"])
    lines = ["MQAR recall accuracy (held-out sequences; every key queried once)", "",
             "| pairs | length | " + " | ".join(names) + " |", "|---:|---:|" + "---:|" * len(names)]
    hits = "resona_selection_hits" in result["accuracy"][0]
    if hits:
        lines[2] += " Resona: answer's chunk picked |"
        lines[3] += "---:|"
    for row in result["accuracy"]:
        lines.append(f"| {row['pairs']} | {row['length']} | " + " | ".join(f"{row[n]:.3f}" for n in names) + " |"
                     + (f" {row['resona_selection_hits']:.3f} |" if hits else ""))
    lines += ["", "| model | parameters | recurrent state numbers | final train loss | train seconds |",
              "|---|---:|---:|---:|---:|"]
    for name, info in result["models"].items():
        state = "—" if info["state_numbers"] is None else f"{info['state_numbers']:,}"
        lines.append(f"| {name} | {info['parameters']:,} | {state} | {info['final_loss']:.3f} | {info['seconds']} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({row["length"] for row in result["accuracy"]})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 4), squeeze=False)
    colors = {"regla": "tab:blue", "resona": "tab:orange", "llama": "tab:green"}
    for ax, length in zip(axes[0], lengths):
        rows = [r for r in result["accuracy"] if r["length"] == length]
        for name in result["models"]:
            ax.plot([r["pairs"] for r in rows], [r[name] for r in rows], "o-", color=colors.get(name), label=name)
        if "resona_selection_hits" in rows[0]:
            ax.plot([r["pairs"] for r in rows], [r["resona_selection_hits"] for r in rows], "x--", color="tab:orange",
                    alpha=0.6, label="resona: answer's chunk picked")
        ax.set_xscale("log", base=2)
        ax.set_xticks([r["pairs"] for r in rows], [str(r["pairs"]) for r in rows])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("key-value pairs")
        ax.set_ylabel("recall accuracy")
        ax.set_title(f"sequence length {length}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, nargs="+", default=[4, 8, 16], help="key-value pairs per sequence")
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 128], help="sequence lengths")
    p.add_argument("--steps", type=int, default=1000, help="training steps per model")
    p.add_argument("--batch_size", type=int, default=48)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--feature_dim", type=int, default=4, help="ReGLA's Dk: the recurrent state is H·Dk·Dv per layer")
    p.add_argument("--chunk", type=int, default=8, help="Resona's retrieval chunk size C")
    p.add_argument("--top_k", type=int, default=2, help="chunks Resona reads per token and head")
    p.add_argument("--gate_init", type=float, default=1.0,
                   help="Resona's α at init (0, the config default, starts as plain ReGLA and barely opens from scratch)")
    p.add_argument("--init_std", type=float, default=0.1,
                   help="initializer_range of all three (at 0.02 ReGLA's exp feature maps start flat and it learned nothing)")
    p.add_argument("--num_keys", type=int, default=16)
    p.add_argument("--num_values", type=int, default=16)
    p.add_argument("--num_filler", type=int, default=16, help="filler token ids (the gap between pairs and queries)")
    p.add_argument("--eval_sequences", type=int, default=256, help="held-out sequences per setting")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--output_dir", default="outputs/recall")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    for name in ("steps", "batch_size", "hidden", "layers", "heads", "feature_dim", "chunk", "top_k",
                 "eval_sequences", "num_keys", "num_values", "num_filler"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.batch_size < len(set(args.pairs)):
        raise ValueError(f"--batch_size {args.batch_size} must hold one sequence of each of --pairs {args.pairs}")
    if args.hidden % args.heads:
        raise ValueError(f"--hidden {args.hidden} must be divisible by --heads {args.heads}")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    task = MQARTask(num_keys=args.num_keys, num_values=args.num_values, num_filler=args.num_filler)
    settings = [(p, n) for n in sorted(set(args.lengths)) for p in sorted(set(args.pairs))]
    for pairs, length in settings:
        task.check(pairs, length)
    start = time.perf_counter()
    models = {k: v for k, v in build_models(task, args).items() if k in args.models}
    info, accuracy = {}, {s: {} for s in settings}
    for name, model in models.items():
        info[name] = {"parameters": sum(p.numel() for p in model.parameters()), "state_numbers": state_numbers(model),
                      **train(model, task, args, desc=f"train {name}")}
        for pairs, length in settings:
            accuracy[(pairs, length)][name] = recall_accuracy(model, task, pairs, length, args.eval_sequences,
                                                              args.batch_size, seed=args.seed + 10_000)
            if name == "resona":
                accuracy[(pairs, length)]["resona_selection_hits"] = selection_hits(
                    model, task, pairs, length, args.eval_sequences, args.batch_size, seed=args.seed + 10_000)
    result = {"command": command_line("benchmarks.recall", argv), "settings": vars(args), "task": asdict(task),
              "models": info,
              "accuracy": [{"pairs": p, "length": n, **accuracy[(p, n)]} for p, n in settings]}
    result["seconds"] = round(time.perf_counter() - start, 1)
    md = markdown(result)
    print(md)
    out = Path(args.output_dir)
    write_report(out, "recall", result, md)
    plot(result, out / "recall.png")
    print(f"\nwrote {out}/recall.json, recall.md, recall.png ({result['seconds']} s)")
    return result


if __name__ == "__main__":
    main()
