"""Train Balcony exits on a frozen model by self-distillation (SPEC.md §3, docs/architectures/balcony.md).

    python -m recipes.train_balcony [--config x.yaml] [--model_name_or_path M] [--text_file F]
                                    [--exits 4 5] [--init last_layer|random] [--block full|attention|mlp]
                                    [--kl_reduction token_mean|batchmean] [--max_steps 300] [--key value ...]

With no `--model_name_or_path`, the embedded tiny math model is built (once, cached) and the exits
train on its synthetic corpus (chat-formatted word problems with worked solutions); `--text_file`
trains on a UTF-8 file instead (one example per line). The base is frozen and only the exits train:
the mean over exits of KL(p_full ‖ p_exit), AdamW at lr 5e-4 with a cosine decay (the released
settings). The held-out KL of each exit (token mean) is measured before and after. Writes into
`--output_dir`: `exits/` (the exits alone, for `load_exits` or `--balcony_exits_path`),
`train_balcony.json` and `train_balcony.png` (per-exit training KL).
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
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from trl import TrlParser

from archs.balcony import (
    BLOCKS,
    INITS,
    KL_REDUCTIONS,
    BalconyConfig,
    add_exits,
    distillation_loss,
    exit_kl,
    exit_logits,
    save_exits,
)
from recipes.preflight import check_model_path

logger = logging.getLogger("recipes.train_balcony")


@dataclass
class TrainBalconyArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "A Hub id or local folder of a Llama / Qwen2-style model. Default: the embedded tiny math model."})
    text_file: str | None = field(default=None, metadata={"help": "Train on this UTF-8 text file (one example per line) instead of the synthetic corpus."})
    eval_text_file: str | None = field(default=None, metadata={"help": "Held-out lines for --text_file; without it the last eval_examples lines (at most a tenth) are held out."})
    exits: list[int] | None = field(default=None, metadata={"help": "Exit depths k (exit k runs layers 0..k-1 plus its own layer). Default: the released 15/18/21 of 32 scaled to the depth."})
    keep_first: int = field(default=2, metadata={"help": "Default exits are clamped to k >= keep_first."})
    init: str = field(default="last_layer", metadata={"help": f"Exit layer init: one of {INITS} (copy of the last layer, or re-drawn: an ablation).", "choices": list(INITS)})
    block: str = field(default="full", metadata={"help": f"Exit layer: one of {BLOCKS} (full decoder layer, or attention / MLP only: ablations).", "choices": list(BLOCKS)})
    kl_reduction: str = field(default="token_mean", metadata={"help": f"One of {KL_REDUCTIONS}: KL averaged over real tokens, or the released sum over all positions / batch size.", "choices": list(KL_REDUCTIONS)})
    learning_rate: float = field(default=5e-4, metadata={"help": "AdamW peak learning rate (released: 5e-4)."})
    warmup_steps: int = field(default=10, metadata={"help": "Linear warm-up steps before the cosine decay."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (0: off)."})
    max_steps: int = field(default=300, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=16, metadata={"help": "Sequences per step."})
    max_length: int = field(default=256, metadata={"help": "Tokens per sequence (longer ones are truncated)."})
    train_examples: int = field(default=8000, metadata={"help": "Synthetic corpus: training problems."})
    eval_examples: int = field(default=256, metadata={"help": "Held-out sequences for the before/after KL."})
    eval_batch_size: int = field(default=32, metadata={"help": "Sequences per held-out forward."})
    seed: int = field(default=0, metadata={"help": "Seed of the data order, the synthetic corpus and the random init."})
    output_dir: str = field(default="outputs/train_balcony", metadata={"help": "Where exits/, train_balcony.json and .png go."})
    use_cpu: bool = field(default=False, metadata={"help": "Train on the CPU even when a GPU is available."})
    dtype: str = field(default="float32", metadata={"help": "float32 or bfloat16 (the base and the exits).", "choices": ["float32", "bfloat16"]})
    tiny_cache_dir: str | None = field(default=None, metadata={"help": "Where the embedded tiny model is cached (default ~/.cache/nested_reft)."})
    tiny_seed: int = field(default=0, metadata={"help": "Seed of the embedded tiny model's build."})

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "max_length", "eval_examples", "eval_batch_size", "train_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.learning_rate > 0 or self.warmup_steps < 0:
            raise ValueError(f"need learning_rate > 0 and warmup_steps >= 0, got {self.learning_rate!r}, {self.warmup_steps!r}")


def synthetic_texts(n: int, split: str, seed: int) -> list[str]:
    """Chat-formatted problems with their worked solutions: the corpus the tiny model was trained on."""
    from archs.tiny.math_task import as_chat, generate_problems
    from archs.tiny.tokenizer import render_chat

    return [render_chat(as_chat(p) + [{"role": "assistant", "content": p.solution}])
            for p in generate_problems(n, split, seed=seed)]


def text_file_lines(path: str) -> list[str]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"text file {path!r} does not exist")
    lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"text file {path!r} has no non-empty lines")
    return lines


def load_texts(a: TrainBalconyArguments) -> tuple[list[str], list[str]]:
    if a.text_file is None:
        return synthetic_texts(a.train_examples, "train", a.seed), synthetic_texts(a.eval_examples, "test", a.seed)
    train = text_file_lines(a.text_file)
    if a.eval_text_file:
        return train, text_file_lines(a.eval_text_file)[: a.eval_examples]
    held = min(a.eval_examples, len(train) // 10)
    if held < 1:
        raise ValueError(f"{a.text_file!r} has {len(train)} lines: too few to hold out a tenth; pass --eval_text_file")
    return train[:-held], train[-held:]


def encode(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_length] for t in texts]
    return [x for x in ids if len(x) >= 2]


def right_padded(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def held_out_kl(model, exits, seqs: list[list[int]], pad_id: int, batch_size: int) -> dict[int, float]:
    """Token-mean KL(p_full ‖ p_exit) of each exit over the held-out sequences (weighted by tokens)."""
    device = next(model.parameters()).device
    total = {k: 0.0 for k in exits.depths}
    tokens = 0
    for start in range(0, len(seqs), batch_size):
        ids, mask = right_padded(seqs[start:start + batch_size], pad_id, device)
        full, by_exit = exit_logits(model, ids, mask, exits)
        n = int(mask.sum())
        for k, logits in by_exit.items():
            total[k] += float(exit_kl(full, logits, mask)) * n
        tokens += n
    return {k: v / tokens for k, v in total.items()}


def plot_losses(train_kl: dict[int, list[float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for k, values in train_kl.items():
        window = max(1, len(values) // 30)
        smooth = [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
                  for i in range(len(values))]
        ax.plot(range(1, len(values) + 1), smooth, label=f"exit {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("KL(p_full ‖ p_exit), training batch")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def resolve_model(a: TrainBalconyArguments) -> str:
    if a.model_name_or_path:
        check_model_path(a.model_name_or_path)
        return a.model_name_or_path
    from archs.tiny import build_tiny_math_model

    logger.info("no --model_name_or_path: using the embedded tiny math model and its synthetic corpus")
    return str(build_tiny_math_model(a.tiny_cache_dir, seed=a.tiny_seed))


def check_exits_fit(model_path: str, a: TrainBalconyArguments) -> None:
    """The exits' config against the base's config alone (its family, its depth), before any weights load."""
    base = AutoConfig.from_pretrained(model_path)
    BalconyConfig(exits=sorted(set(a.exits or [])), block=a.block, base_model_type=base.model_type,
                  base_num_hidden_layers=base.num_hidden_layers)


def main(argv=None) -> dict:
    (a,) = TrlParser((TrainBalconyArguments,)).parse_args_and_config(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    train_texts, eval_texts = load_texts(a)  # a bad data file fails before the model loads
    model_path = resolve_model(a)
    check_exits_fit(model_path, a)
    device = torch.device("cuda") if torch.cuda.is_available() and not a.use_cpu else torch.device("cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, a.dtype)).to(device).eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train, held = encode(tokenizer, train_texts, a.max_length), encode(tokenizer, eval_texts, a.max_length)
    if not train or not held:
        raise ValueError(f"no training or held-out sequence of at least 2 tokens ({len(train)}, {len(held)})")

    torch.manual_seed(a.seed)
    exits = add_exits(model, a.exits, init=a.init, block=a.block, keep_first=a.keep_first)
    n_params = sum(p.numel() for p in exits.parameters())
    logger.info("exits %s (%s init, %s block): %.2fM trainable parameters; the %d-layer base is frozen",
                exits.depths, a.init, a.block, n_params / 1e6, exits.config.base_num_hidden_layers)
    before = held_out_kl(model, exits, held, pad_id, a.eval_batch_size)

    opt = torch.optim.AdamW(exits.parameters(), lr=a.learning_rate, weight_decay=a.weight_decay)

    def lr_at(step):  # linear warm-up, then cosine to 0 (transformers' cosine schedule)
        if step < a.warmup_steps:
            return (step + 1) / a.warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - a.warmup_steps) / max(1, a.max_steps - a.warmup_steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = random.Random(a.seed)
    order: list[int] = []
    train_kl: dict[int, list[float]] = {k: [] for k in exits.depths}
    tokens, start = 0, time.perf_counter()
    bar = tqdm(range(a.max_steps), desc="Balcony exits")
    for _ in bar:
        if len(order) < a.batch_size:
            order += rng.sample(range(len(train)), len(train))
        batch = [train[order.pop()] for _ in range(min(a.batch_size, len(train)))]
        ids, mask = right_padded(batch, pad_id, device)
        full, by_exit = exit_logits(model, ids, mask, exits)
        loss, per_exit = distillation_loss(full, by_exit, mask, a.kl_reduction)
        loss.backward()
        if a.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(exits.parameters(), a.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(mask.sum())
        for k, v in per_exit.items():
            train_kl[k].append(v)
        bar.set_postfix(loss=f"{loss.item():.4f}", tok_s=f"{tokens / (time.perf_counter() - start):.0f}")
    seconds = time.perf_counter() - start
    after = held_out_kl(model, exits, held, pad_id, a.eval_batch_size)

    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    exits_path = save_exits(model, out / "exits")
    summary = {
        "model": model_path, "data": a.text_file or "synthetic", "exits": exits.depths,
        "base_layers": exits.config.base_num_hidden_layers, "exit_parameters": n_params,
        "train_seconds": seconds, "tokens_per_s": tokens / seconds, "heldout_sequences": len(held),
        "heldout_kl_before": {str(k): v for k, v in before.items()},
        "heldout_kl_after": {str(k): v for k, v in after.items()},
        "train_kl": {str(k): v for k, v in train_kl.items()}, "exits_path": str(exits_path), "args": asdict(a),
    }
    (out / "train_balcony.json").write_text(json.dumps(summary, indent=2))
    plot_losses(train_kl, out / "train_balcony.png",
                f"Balcony exits {exits.depths}: {a.init} init, {a.block} block, {a.kl_reduction}")

    print(f"\n| exit k (of {exits.config.base_num_hidden_layers}) | layers run | held-out KL before | after {a.max_steps} steps |")
    print("|---|---|---|---|")
    for k in exits.depths:
        print(f"| {k} | {k + 1} | {before[k]:.4f} | {after[k]:.4f} |")
    print(f"\n{a.init} init, {a.block} block, {a.kl_reduction}, lr {a.learning_rate} cosine: {seconds:.0f} s, "
          f"{tokens / seconds:.0f} tokens/s; outputs: {exits_path}, {out}/train_balcony.json, train_balcony.png")
    return summary


if __name__ == "__main__":
    main()
