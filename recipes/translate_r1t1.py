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

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from trl import ModelConfig, TrlParser, get_peft_config

from nested_reft.reporting import JsonlMetricsCallback, read_jsonl
from r1t1.config import R1T1Config
from r1t1.data import load_parallel
from r1t1.templates import TemplateSelector
from r1t1.toy import toy_rows
from r1t1.trainer import R1T1Trainer
from recipes.distributed import is_main_process, on_main_process, read_summary, whole_model
from recipes.preflight import preflight
from recipes.run_folder import prepare_run_folder, run_record
from recipes.translation_common import (
    MISSING_MODEL_HINT,
    TranslationDataArguments,
    embedded_model,
    held_out,
    held_out_rows,
    load_model,
    plot,
    print_table,
    prompt_rows,
    set_threads,
)
from rewards.translation import format_reward, make_translation_reward

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


def main(argv=None) -> dict:
    parser = TrlParser((TranslateR1T1Arguments, R1T1Config, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    set_threads(script_args)
    out = Path(training_args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
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
        rows = prompt_rows(pairs[: script_args.train_limit], selector, script_args.system_prompt)
    else:
        rows = toy_rows("train", script_args.train_limit or script_args.toy_train_size, seed=script_args.tiny_seed + 1,
                        selector=selector, system_prompt=script_args.system_prompt or None)
    train = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "src", "ref", "src_lang", "tgt_lang")} for r in rows])
    test = held_out_rows(script_args, selector, corpus=script_args.train_path)
    quality_reward = make_translation_reward(a.reward_metric, a.comet_model)
    with training_args.main_process_first(local=True, desc="building the embedded model"):  # one build per machine
        model_path = model_args.model_name_or_path or embedded_model(script_args)
    preflight(model_path, a, train["prompt"], use_peft=model_args.use_peft, revision=model_args.model_revision,
              hint=MISSING_MODEL_HINT)
    # A used folder is resumed only by the same run (model, data, settings); see recipes/run_folder.py.
    record = run_record(model_path, training_args, {"train_path": script_args.train_path})
    out, resume, previous = on_main_process(training_args, lambda: read_summary(*prepare_run_folder(
        training_args.output_dir, record, script_args.fresh_run, required=(R1T1Trainer.SKIP_STATE_FILE,))))
    main_process = is_main_process(training_args)
    training_args.output_dir = str(out)
    model, tokenizer = load_model(model_path, model_args, use_cpu=a.use_cpu)

    summary_path = out / "summary.json"
    if resume and "before" in previous:
        before = previous["before"]
        logger.info("resuming from %s", resume)
    else:
        with whole_model(model) as whole:  # every process evaluates (ZeRO-3: gathered); the main one writes
            before = held_out(whole, tokenizer, test, script_args, "before GRPO", a.seed)
        if main_process:
            summary_path.write_text(json.dumps({"before": before}, indent=2))

    trainer = R1T1Trainer(model=model, reward_funcs=[quality_reward, format_reward], args=a, train_dataset=train,
                          processing_class=tokenizer, peft_config=get_peft_config(model_args),
                          callbacks=[JsonlMetricsCallback(out / "metrics.jsonl")])
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.perf_counter() - start
    trainer.save_model(str(out / "final"))
    with whole_model(trainer.model, trainer) as whole:
        after = held_out(whole, tokenizer, test, script_args, "after GRPO", a.seed)

    steps = trainer.state.global_step
    summary = {"stage": "grpo", "model": model_path, "kl_mode": a.kl_mode, "beta": a.beta,
               "reward_metric": a.reward_metric, "template_mode": a.template_mode, "skip_ratio": a.skip_ratio,
               "steps": steps, "train_seconds": train_seconds, "seconds_per_step": train_seconds / max(1, steps),
               "before": before, "after": after, "chrf_gain": after["greedy"]["chrf"] - before["greedy"]["chrf"]}
    if not main_process:  # the files and the table are the main process's
        return summary
    summary_path.write_text(json.dumps(summary, indent=2))
    plot(read_jsonl(out / "metrics.jsonl"), out / "training.png",
         f"R1-T1 GRPO: kl_mode={a.kl_mode}, beta={a.beta}, reward={a.reward_metric}", before, after, steps, GRPO_PANELS)
    print_table(before, after, f"after GRPO ({steps} steps, {train_seconds:.0f} s)")
    print(f"outputs: {out}/summary.json, metrics.jsonl, training.png, final/")
    return summary


if __name__ == "__main__":
    main()
