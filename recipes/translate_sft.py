"""R1-T1 stage 1: supervised cold start on chain-of-thought translations (TRL's SFTTrainer, as
nested_reft/sft.py extends it: a backbone's auxiliary loss is trained, half-precision weights get fp32 masters).

    python -m recipes.translate_sft --config recipes/configs/translate_sft_toy.yaml [--key value ...]

With no `--cot_path`, the corpus is generated from the Toylang pair (English → Toylang) with
traces that follow the selected templates, and with no `--model_name_or_path` the embedded tiny
model is built (a tokenizer covering Toylang, fresh weights). Real runs pass a CoT JSONL corpus
(`src`, `tgt`, `template`, `cot`) and a model. Held-out chrF/BLEU before and after are printed
and plotted; `summary.json`, `metrics.jsonl`, `training.png` and `final/` go to `--output_dir`;
a run resumes from the last checkpoint there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from trl import ModelConfig, SFTConfig, get_peft_config

from nested_reft.reporting import JsonlMetricsCallback, read_jsonl
from nested_reft.sft import SFTTrainer
from r1t1.data import load_authors_cot, load_cot_jsonl
from r1t1.templates import SELECTION_MODES, TemplateSelector, build_prompt, format_completion
from r1t1.toy import toy_rows
from recipes.distributed import whole_model
from recipes.skeleton import open_run, parse
from recipes.translation_common import (
    TranslationDataArguments,
    embedded_model,
    held_out,
    held_out_rows,
    load_model,
    plot,
    print_table,
    set_threads,
    toy_system_prompt,
)

logger = logging.getLogger("recipes.translate_sft")

SFT_PANELS = (
    ("loss", ("loss",), "training loss"),
    ("token accuracy", ("mean_token_accuracy",), "next-token accuracy"),
    ("chrf", (), "held-out chrF"),
)


@dataclass
class TranslateSFTArguments(TranslationDataArguments):
    cot_path: str | None = field(default=None, metadata={"help": "CoT corpus: ours (.jsonl: src, tgt, template, cot[, src_lang, tgt_lang]; prompts in prompt_style) or the authors' released one (.json array: instruction, input, source_lang, target_lang, target_text, thought_chains, output; their prompts and outputs as released). Default: generated Toylang traces."})
    train_limit: int | None = field(default=None, metadata={"help": "Use at most this many training examples."})
    toy_train_size: int = field(default=20_000, metadata={"help": "Generated Toylang training examples (no cot_path)."})
    toy_literal_fraction: float = field(default=0.0, metadata={"help": "Share of generated Toylang examples (no cot_path) written by a careless teacher: the thought 'word for word' and a literal answer in English word order instead of the traced reference. A cold start on both samples careful and careless translations, for GRPO to choose between."})
    template_mode: str = field(default="random", metadata={"help": f"Template of each generated Toylang example and held-out prompt: one of {SELECTION_MODES[:2]}.", "choices": list(SELECTION_MODES[:2])})
    template: str = field(default="hierarchical", metadata={"help": "The template of template_mode='fixed'."})
    templates: list[str] | None = field(default=None, metadata={"help": "The templates template_mode='random' draws from (default: all six)."})


def sft_rows(a: TranslateSFTArguments, selector: TemplateSelector, seed: int) -> list[dict]:
    """Prompt-completion rows (conversational) for TRL's SFTTrainer: loss on the completion only.
    The cold start teaches the whole assistant turn, `<think>` included: a GRPO prompt that pre-fills
    `<think>` (prompt_style 'authors') then continues where the cold-start data did."""
    if a.cot_path is not None and a.toy_literal_fraction:
        raise ValueError(f"toy_literal_fraction={a.toy_literal_fraction!r} rewrites generated Toylang examples; "
                         f"with --cot_path {a.cot_path!r} the corpus is yours: leave it at 0")
    if a.cot_path is None:
        rows = toy_rows("train", a.toy_train_size, seed=a.tiny_seed, selector=selector, with_cot=True,
                        system_prompt=toy_system_prompt(a), literal_fraction=a.toy_literal_fraction,
                        instruction=a.toy_instruction)
        rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]
    elif Path(a.cot_path).suffix.lower() == ".json":  # the authors' corpus: their prompts and outputs
        rows = [{"prompt": [{"role": "user", "content": r["prompt_text"]}],
                 "completion": [{"role": "assistant", "content": r["completion"]}]}
                for r in load_authors_cot(a.cot_path)]
    else:
        rows = []
        for r in load_cot_jsonl(a.cot_path, a.src_lang, a.tgt_lang):
            prompt = build_prompt(r["src"], r["src_lang"], r["tgt_lang"], r["template"], a.system_prompt or None,
                                  style=a.prompt_style, template_in_prompt=a.template_in_prompt)
            prompt = [m for m in prompt if m["role"] != "assistant"]  # the completion carries the whole turn
            rows.append({"prompt": prompt,
                         "completion": [{"role": "assistant", "content": format_completion(r["cot"], r["tgt"])}]})
    rows = rows[: a.train_limit] if a.train_limit is not None else rows
    logger.info("cold-start examples: %s (%d)", a.cot_path or "generated Toylang traces (en-qtl; pass --cot_path "
                "for real data)", len(rows))
    return rows


def main(argv=None) -> dict:
    script_args, training_args, model_args = parse((TranslateSFTArguments, SFTConfig, ModelConfig), argv)
    set_threads(script_args)

    # Data first: a bad path, template or language fails before any model is loaded.
    selector = TemplateSelector(script_args.template_mode, script_args.template, script_args.templates, seed=training_args.seed)
    train = datasets.Dataset.from_list(sft_rows(script_args, selector, training_args.seed))
    test = held_out_rows(script_args, selector, corpus=script_args.cot_path)
    with training_args.main_process_first(local=True, desc="building the embedded model"):  # one build per machine
        model_path = model_args.model_name_or_path or embedded_model(script_args)
    run = open_run(model_path, training_args, {"cot_path": script_args.cot_path}, script_args.fresh_run)
    out = run.out
    model, tokenizer = load_model(model_path, model_args, use_cpu=training_args.use_cpu)

    with whole_model(model) as whole:  # every process evaluates (ZeRO-3: gathered); the main one writes
        before = run.before(lambda: held_out(whole, tokenizer, test, script_args, "before SFT", training_args.seed))

    trainer = SFTTrainer(model=model, args=training_args, train_dataset=train, processing_class=tokenizer,
                         peft_config=get_peft_config(model_args), callbacks=[JsonlMetricsCallback(run.metrics_path)])
    train_seconds = run.train(trainer, save_tokenizer=tokenizer)
    with whole_model(trainer.model, trainer) as whole:
        after = held_out(whole, tokenizer, test, script_args, "after SFT", training_args.seed)

    steps = trainer.state.global_step
    summary = {"stage": "sft", "model": model_path, "corpus": script_args.cot_path or "toylang",
               "template_mode": script_args.template_mode, "train_examples": len(train), "steps": steps,
               "train_seconds": train_seconds, "before": before, "after": after, "final_model": str(out / "final")}
    if not run.is_main:  # the files and the table are the main process's
        return summary
    run.write_summary(summary)
    plot(read_jsonl(run.metrics_path), out / "training.png", "R1-T1 cold start (SFT)", before, after, steps, SFT_PANELS)
    print_table(before, after, f"after SFT ({steps} steps, {train_seconds:.0f} s)")
    print(f"outputs: {out}/summary.json, metrics.jsonl, training.png, final/")
    return summary


if __name__ == "__main__":
    main()
