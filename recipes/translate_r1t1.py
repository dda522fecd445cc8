"""R1-T1 stage 2: GRPO with the format-gated translation reward and a KL constraint.

    python -m recipes.translate_r1t1 --config recipes/configs/translate_r1t1_toy.yaml [--key value ...]

The default starts from the cold-start model of `recipes.translate_sft` (its `final/` folder) and
trains on Toylang prompts; real runs pass `--model_name_or_path` and `--train_path` (a parallel
.tsv/.jsonl file) with a held-out Flores folder or parallel file. `kl_mode` puts the KL in the
loss or in the reward; `skip_ratio` > 0 samples rollouts from layer-skipped copies of the policy
(Nested-ReFT). Held-out chrF/BLEU before and after are printed and plotted; `summary.json`,
`metrics.jsonl`, `training.png` and `final/` go to `--output_dir`; a run resumes from the last
checkpoint there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import datasets
from trl import ModelConfig, get_peft_config

from nested_reft.evaluation import render_chat
from nested_reft.reporting import JsonlMetricsCallback, read_jsonl
from r1t1.config import R1T1Config
from r1t1.data import load_parallel
from r1t1.templates import TemplateSelector
from r1t1.toy import toy_rows
from r1t1.trainer import R1T1Trainer
from recipes.distributed import whole_model
from recipes.preflight import preflight
from recipes.skeleton import open_run, parse
from recipes.translation_common import (
    MISSING_MODEL_HINT,
    TranslationDataArguments,
    embedded_model,
    full_model_path,
    held_out,
    held_out_rows,
    load_model,
    plot,
    print_table,
    prompt_rows,
    reward_prefix,
    set_threads,
    toy_system_prompt,
)
from rewards.translation import make_format_reward, make_translation_reward

logger = logging.getLogger("recipes.translate_r1t1")

GRPO_PANELS = (
    ("reward", ("reward",), "mean reward (with KL penalty in reward mode)"),
    ("quality", ("rewards/translation_chrf/mean", "rewards/translation_bleu/mean", "rewards/translation_comet/mean"), "format-gated quality reward"),
    ("kl", ("kl", "kl_reward/sequence_kl"), "KL to the reference"),
    ("chrf", (), "held-out chrF"),
)


@dataclass
class TranslateR1T1Arguments(TranslationDataArguments):
    train_path: str | None = field(default=None, metadata={"help": "Training pairs (.tsv or .jsonl). Default: generated Toylang sentences."})
    train_limit: int | None = field(default=None, metadata={"help": "Use at most this many training pairs."})
    toy_train_size: int = field(default=4000, metadata={"help": "Generated Toylang training prompts (no train_path)."})
    merge_adapter: bool = field(default=False, metadata={"help": "When model_name_or_path is a LoRA adapter (an SFT cold start with --use_peft), merge it into its base as <adapter>-merged and start from that (reused while the adapter is unchanged); without it such a path is refused."})


def main(argv=None) -> dict:
    script_args, training_args, model_args = parse((TranslateR1T1Arguments, R1T1Config, ModelConfig), argv)
    set_threads(script_args)
    a = training_args
    # The reward is the paper's formula, format gate included; format_valid is logged only.
    if a.reward_weights is not None and [float(w) for w in a.reward_weights] != [1.0, 0.0]:
        raise ValueError(f"reward_weights={a.reward_weights!r}: the R1-T1 reward already contains the format term "
                         "(0.2 * format + format * quality), so the logged format_valid column must keep weight 0; "
                         "use reward_weights [1.0, 0.0] or leave it unset")
    a.reward_weights = [1.0, 0.0]

    # Data and reward first: a bad path, template, language or COMET checkpoint fails before the model loads.
    selector = TemplateSelector(a.template_mode, a.template, a.templates, seed=a.seed)
    if script_args.train_path:
        pairs = load_parallel(script_args.train_path, script_args.src_lang, script_args.tgt_lang)
        rows = prompt_rows(pairs[: script_args.train_limit], selector, script_args)
    else:
        rows = toy_rows("train", script_args.train_limit or script_args.toy_train_size, seed=script_args.tiny_seed + 1,
                        selector=selector, system_prompt=toy_system_prompt(script_args),
                        instruction=script_args.toy_instruction)
    logger.info("training prompts: %s (%d)", script_args.train_path or "the embedded Toylang set (en-qtl; "
                "pass --train_path for real data)", len(rows))
    rows = [{k: r[k] for k in ("prompt", "src", "ref", "src_lang", "tgt_lang")} for r in rows]
    test = held_out_rows(script_args, selector, corpus=script_args.train_path)
    prefix = reward_prefix(script_args, real_data=script_args.train_path is not None)
    reward_kwargs = dict(gate=a.format_gate, prefix=prefix)
    quality_reward = make_translation_reward(a.reward_metric, a.comet_model, bleu_tokenize=a.bleu_tokenize,
                                             target_languages={r["tgt_lang"] for r in rows},
                                             comet_batch_size=a.comet_batch_size, comet_gpus=a.comet_gpus, **reward_kwargs)
    preflight_prompts = [r["prompt"] for r in rows]
    with training_args.main_process_first(local=True, desc="building the embedded model"):  # one build per machine
        model_path = full_model_path(model_args.model_name_or_path or embedded_model(script_args), script_args.merge_adapter)
    preflight(model_path, a, preflight_prompts, use_peft=model_args.use_peft, revision=model_args.model_revision,
              hint=MISSING_MODEL_HINT)
    run = open_run(model_path, training_args, {"train_path": script_args.train_path}, script_args.fresh_run,
                   required=(R1T1Trainer.SKIP_STATE_FILE,))
    out = run.out
    model, tokenizer = load_model(model_path, model_args, use_cpu=a.use_cpu)
    if prefix:  # TRL renders chat prompts with a fresh generation prompt: pass pre-filled ones as text
        rows = [{**r, "prompt": render_chat(r["prompt"], tokenizer)} for r in rows]
    train = datasets.Dataset.from_list(rows)

    with whole_model(model) as whole:  # every process evaluates (ZeRO-3: gathered); the main one writes
        before = run.before(lambda: held_out(whole, tokenizer, test, script_args, "before GRPO", a.seed, gate=a.format_gate))

    trainer = R1T1Trainer(model=model, reward_funcs=[quality_reward, make_format_reward(**reward_kwargs)], args=a, train_dataset=train,
                          processing_class=tokenizer, peft_config=get_peft_config(model_args),
                          callbacks=[JsonlMetricsCallback(run.metrics_path)])
    train_seconds = run.train(trainer)
    with whole_model(trainer.model, trainer) as whole:
        after = held_out(whole, tokenizer, test, script_args, "after GRPO", a.seed, gate=a.format_gate)
    run.close_engine(trainer)

    steps = trainer.state.global_step
    summary = {"stage": "grpo", "model": model_path, "kl_mode": a.kl_mode, "beta": a.beta,
               "reward_metric": a.reward_metric, "template_mode": a.template_mode, "skip_ratio": a.skip_ratio,
               "format_gate": a.format_gate, "prompt_style": script_args.prompt_style if script_args.train_path else "toy",
               "steps": steps, "train_seconds": train_seconds, "seconds_per_step": train_seconds / max(1, steps),
               "before": before, "after": after, "chrf_gain": after["greedy"]["chrf"] - before["greedy"]["chrf"]}
    if not run.is_main:  # the files and the table are the main process's
        return summary
    run.write_summary(summary)
    plot(read_jsonl(run.metrics_path), out / "training.png",
         f"R1-T1 GRPO: kl_mode={a.kl_mode}, beta={a.beta}, reward={a.reward_metric}", before, after, steps, GRPO_PANELS)
    print_table(before, after, f"after GRPO ({steps} steps, {train_seconds:.0f} s)")
    print(f"outputs: {out}/summary.json, metrics.jsonl, training.png, final/")
    return summary


if __name__ == "__main__":
    main()
