"""Translation recipes: evaluation scores on Flores fixtures, and SFT → GRPO end to end in miniature."""

import json
from pathlib import Path

import pytest
from sacrebleu.metrics import BLEU, CHRF

from r1t1.data import write_flores
from recipes import evaluate_translation, translate_r1t1, translate_sft

EN = ["the cat sleeps", "two dogs run fast", "it rains today", "we read books"]
DE = ["die Katze schläft", "zwei Hunde rennen schnell", "heute regnet es", "wir lesen Bücher"]


def test_evaluate_translation_scores_per_direction(tmp_path, monkeypatch):
    write_flores(tmp_path / "flores", "devtest", {"en": EN, "de": DE})
    by_prompt = {}
    for src, tgt in zip(EN + DE, DE + EN):
        by_prompt[src] = tgt
    seen = {}

    def fake_generate(model, prompts, decoding, max_new_tokens, batch_size, seed, engine):
        seen["decoding"] = decoding
        outs = []
        for i, p in enumerate(prompts):
            assert p[-1] == {"role": "assistant", "content": "<think>"}  # the authors' RL prompt, pre-filled
            src = p[1]["content"].rsplit("Source sentence: ", 1)[-1]
            ref = by_prompt[src]
            hyp = ref if i % 2 == 0 else ref.split()[0]  # half perfect, half one word
            # completions continue the pre-filled <think>; the 4th repeats the tag (invalid: two <think>)
            outs.append(f"t</think><answer>{hyp}</answer>" if i % 4 != 3 else f"<think>t</think><answer>{hyp}</answer>")
        return outs

    monkeypatch.setattr(evaluate_translation, "generate_hf", fake_generate)
    results = evaluate_translation.main(["--model_name_or_path", "unused", "--flores_dir", str(tmp_path / "flores"),
                                         "--directions", "de-en,en→de", "--decoding", "authors", "--prefill_think", "true",
                                         "--output_dir", str(tmp_path / "out")])
    assert seen["decoding"] == {"temperature": 0.1, "top_k": 64, "top_p": 0.75}
    assert [r["direction"] for r in results] == ["de-en", "en-de"]
    for r, refs in zip(results, (EN, DE)):
        hyps = [ref if i % 2 == 0 else ref.split()[0] for i, ref in enumerate(refs)]
        assert r["chrf"] == pytest.approx(CHRF().corpus_score(hyps, [refs]).score)
        assert r["bleu"] == pytest.approx(BLEU().corpus_score(hyps, [refs]).score)
        assert r["format_rate"] == pytest.approx(0.75)  # the 4th output has the think tag twice
        assert r["chrf_signature"].startswith("nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no")
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["directions"][1]["chrf"] == pytest.approx(results[1]["chrf"])
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| en-de | 4 |" in md
    avg = {g["group"]: g for g in saved["averages"]}
    assert avg["xx→en"]["directions"] == 1 and avg["xx→en"]["chrf"] == pytest.approx(results[0]["chrf"])
    assert avg["all"]["bleu"] == pytest.approx((results[0]["bleu"] + results[1]["bleu"]) / 2)
    assert avg["seen"]["directions"] == 2 and "unseen" not in avg  # de and en are in the released training data


def test_evaluate_translation_prompts_as_the_authors_evaluation_unless_asked_to_prefill(tmp_path, monkeypatch):
    # the authors' evaluation script asks without a pre-filled <think>: the model writes the tag, and
    # the format gate reads it from the completion; --prefill_think true puts it in the prompt
    write_flores(tmp_path / "flores", "devtest", {"en": EN, "de": DE})
    own_tag, continued = "<think>t</think><answer>x</answer>", "t</think><answer>x</answer>"
    seen = {}

    def fake_generate(model, prompts, decoding, max_new_tokens, batch_size, seed, engine):
        seen["last"] = [p[-1] for p in prompts]
        return [own_tag, continued] * (len(prompts) // 2)

    monkeypatch.setattr(evaluate_translation, "generate_hf", fake_generate)
    common = ["--model", "unused", "--flores_dir", str(tmp_path / "flores"), "--directions", "de-en",
              "--output_dir", str(tmp_path / "out")]
    (default,) = evaluate_translation.main(common)
    assert all(m["role"] == "user" and m["content"].endswith(DE[i]) for i, m in enumerate(seen["last"]))
    assert default["format_rate"] == 0.5  # only the completions that open <think> themselves
    (prefilled,) = evaluate_translation.main(common + ["--prefill_think", "true"])
    assert seen["last"] == [{"role": "assistant", "content": "<think>"}] * len(DE)
    assert prefilled["format_rate"] == 0.5  # now only the continuations (a repeated tag fails the gate)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["prefill_think"] is True and saved["prompt_style"] == "authors"
    # our prompt style takes the pre-fill too when asked
    evaluate_translation.main(common + ["--prompt_style", "ours", "--prefill_think", "true"])
    assert seen["last"][0] == {"role": "assistant", "content": "<think>"}


def test_evaluate_translation_paper_grid_flat_files_and_tokenizers(tmp_path, monkeypatch):
    # the released script's flat flores.{xx} files (Korean tagged kr), the paper's direction preset on a subset
    zh = ["猫在睡觉", "两只狗跑得快", "今天下雨", "我们读书"]
    ko = ["고양이가 잔다", "개 두 마리가 빨리 달린다", "오늘 비가 온다", "우리는 책을 읽는다"]
    for tag, lines in (("en", EN), ("zh", zh), ("kr", ko), ("tl", EN)):
        (tmp_path / f"flores.{tag}").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def fake_generate(model, prompts, decoding, max_new_tokens, batch_size, seed, engine):
        return ["<think>t</think><answer>x</answer>"] * len(prompts)

    monkeypatch.setattr(evaluate_translation, "generate_hf", fake_generate)
    results = evaluate_translation.main(["--model", "unused", "--flores_dir", str(tmp_path), "--directions", "paper",
                                         "--languages", "en,zh,kr,tl", "--output_dir", str(tmp_path / "out")])
    got = [r["direction"] for r in results]
    assert got == ["ko-en", "ko-zh", "tl-en", "tl-zh", "en-ko", "en-tl", "zh-ko", "zh-tl", "zh-en", "en-zh"]
    tok = {r["direction"]: r["bleu_signature"].split("tok:")[1].split("|")[0] for r in results}
    assert tok["en-zh"] == "zh" and tok["en-ko"].startswith("ko-mecab") and tok["ko-en"] == "13a"
    from r1t1.data import paper_directions

    assert len(paper_directions()) == 78  # the released script's grid


def test_evaluate_translation_input_errors(tmp_path):
    write_flores(tmp_path / "flores", "devtest", {"en": EN, "de": DE[:3]})
    with pytest.raises(ValueError, match="unequal line counts"):
        evaluate_translation.main(["--model", "unused", "--flores_dir", str(tmp_path / "flores"), "--directions", "de-en"])
    with pytest.raises(ValueError, match="unknown language 'zz'"):
        evaluate_translation.main(["--model", "unused", "--flores_dir", str(tmp_path / "flores"), "--directions", "zz-en"])
    with pytest.raises(ValueError, match="top_p"):
        evaluate_translation.main(["--model", "unused", "--toy", "--limit", "2", "--top_p", "0"])
    with pytest.raises(FileNotFoundError, match="COMET checkpoint"):
        evaluate_translation.main(["--model", "unused", "--toy", "--limit", "2", "--comet_model", str(tmp_path / "none")])


def test_sft_then_grpo_end_to_end_in_miniature(tmp_path):
    cache, sft_out, grpo_out = tmp_path / "cache", tmp_path / "sft", tmp_path / "grpo"
    common = ["--eval_limit", "4", "--eval_max_new_tokens", "12", "--tiny_cache_dir", str(cache), "--report_to", "none",
              "--bf16", "false", "--logging_steps", "1", "--save_strategy", "no", "--system_prompt", "",
              "--toy_instruction", "false"]
    sft = translate_sft.main(["--output_dir", str(sft_out), "--toy_train_size", "64", "--max_steps", "3",
                              "--toy_literal_fraction", "0.3",
                              "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--max_length", "256",
                              "--gradient_checkpointing", "false", "--eval_sampled", "false"] + common)
    assert sft["steps"] == 3 and sft["train_examples"] == 64
    assert 0 <= sft["after"]["greedy"]["chrf"] <= 100 and "sampled" not in sft["after"]
    assert 0 <= sft["after"]["greedy"]["literal_rate"] <= 1 and 0 < sft["after"]["greedy"]["completion_tokens"] <= 12
    assert sft["before"]["greedy"]["completion_tokens"] == 12  # fresh weights never stop before the budget
    assert (sft_out / "final" / "config.json").exists() and (sft_out / "training.png").exists()
    rows = [json.loads(line) for line in (sft_out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]

    grpo = translate_r1t1.main(["--model_name_or_path", str(sft_out / "final"), "--output_dir", str(grpo_out),
                                "--toy_train_size", "16", "--max_steps", "2", "--per_device_train_batch_size", "8",
                                "--num_generations", "4", "--max_completion_length", "12", "--kl_mode", "reward",
                                "--beta", "0.01", "--reward_weights", "1.0", "0.0", "--skip_ratio", "0.0"] + common)
    assert grpo["steps"] == 2 and grpo["kl_mode"] == "reward"
    assert grpo["chrf_gain"] == pytest.approx(grpo["after"]["greedy"]["chrf"] - grpo["before"]["greedy"]["chrf"])
    rows = [json.loads(line) for line in (grpo_out / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/kl_penalty/mean" in r for r in rows) and any("rewards/translation_chrf/mean" in r for r in rows)


def test_the_toy_configs_prompt_both_stages_alike_and_the_cold_start_mixes_teachers(tmp_path):
    from trl import ModelConfig, SFTConfig

    from r1t1.config import R1T1Config
    from recipes.skeleton import parse

    configs = Path(translate_sft.__file__).parent / "configs"
    sft, _, _ = parse((translate_sft.TranslateSFTArguments, SFTConfig, ModelConfig),
                      ["--config", str(configs / "translate_sft_toy.yaml"), "--output_dir", str(tmp_path / "a")])
    grpo, grpo_args, _ = parse((translate_r1t1.TranslateR1T1Arguments, R1T1Config, ModelConfig),
                               ["--config", str(configs / "translate_r1t1_toy.yaml"), "--output_dir", str(tmp_path / "b")])
    # GRPO's prompts must be the ones the cold start learned: no template instruction, no system message
    assert (sft.toy_instruction, sft.system_prompt) == (grpo.toy_instruction, grpo.system_prompt) == (False, "")
    assert sft.toy_literal_fraction == 0.3  # the demo's numbers in docs/r1t1.md were measured with these
    assert (grpo_args.learning_rate, grpo_args.max_steps, grpo_args.num_generations) == (1e-4, 30, 8)


def test_a_literal_fraction_with_a_real_corpus_is_refused(tmp_path):
    corpus = tmp_path / "cot.jsonl"
    corpus.write_text(json.dumps({"src": "Der Hund.", "tgt": "The dog.", "template": "hierarchical", "cot": "x",
                                  "src_lang": "de", "tgt_lang": "en"}) + "\n")
    with pytest.raises(ValueError, match="toy_literal_fraction=0.3 rewrites generated Toylang examples"):
        translate_sft.main(["--output_dir", str(tmp_path / "out"), "--cot_path", str(corpus), "--toy_literal_fraction", "0.3",
                            "--eval_path", str(corpus), "--report_to", "none", "--bf16", "false"])


def test_grpo_recipe_names_a_missing_cold_start_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `python -m recipes.translate_sft"):
        translate_r1t1.main(["--model_name_or_path", "outputs/nowhere/final", "--output_dir", str(tmp_path),
                             "--toy_train_size", "8", "--eval_limit", "2", "--bf16", "false", "--report_to", "none"])


def test_grpo_recipe_keeps_the_papers_reward_whatever_the_weights(tmp_path):
    with pytest.raises(ValueError, match="already contains the format term"):
        translate_r1t1.main(["--output_dir", str(tmp_path), "--reward_weights", "1.0", "1.0", "--toy_train_size", "8",
                             "--eval_limit", "2", "--bf16", "false", "--report_to", "none"])


def test_r1t1_config_defaults_are_the_authors():
    from r1t1.config import R1T1Config

    c = R1T1Config(output_dir="unused", report_to=[], use_cpu=True, bf16=False)
    assert (c.beta, c.kl_mode, c.temperature, c.num_generations, c.learning_rate) == (0.001, "loss", 0.8, 8, 4e-7)
    assert (c.max_completion_length, c.num_train_epochs, c.skip_ratio) == (8000, 2.0, 0.0)


def test_a_real_corpus_needs_a_real_held_out_set(tmp_path):
    cot = tmp_path / "cot.jsonl"
    cot.write_text(json.dumps({"src": "die Katze", "tgt": "the cat", "src_lang": "de", "tgt_lang": "en",
                               "template": "hierarchical", "cot": "Katze = cat"}) + "\n")
    with pytest.raises(ValueError, match="needs a held-out set: pass --eval_flores_dir"):
        translate_sft.main(["--output_dir", str(tmp_path / "out"), "--cot_path", str(cot), "--bf16", "false",
                            "--report_to", "none", "--model_name_or_path", "/nonexistent"])
    tsv = tmp_path / "train.tsv"
    tsv.write_text("die Katze\tthe cat\n")
    with pytest.raises(ValueError, match="needs a held-out set"):
        translate_r1t1.main(["--output_dir", str(tmp_path / "out"), "--train_path", str(tsv), "--src_lang", "de",
                             "--tgt_lang", "en", "--bf16", "false", "--report_to", "none",
                             "--model_name_or_path", "/nonexistent"])


def test_translation_recipes_pass_use_cpu_to_model_loading(tmp_path, monkeypatch):
    import recipes.model_loading

    seen = {}

    def fake_load(model_path, model_args, use_cpu=False, use_peft=False):
        seen["use_cpu"] = use_cpu
        raise RuntimeError("stop after loading")

    monkeypatch.setattr(recipes.model_loading, "load_model_and_tokenizer", fake_load)
    with pytest.raises(RuntimeError, match="stop after loading"):
        translate_sft.main(["--output_dir", str(tmp_path / "out"), "--model_name_or_path", str(tmp_path),
                            "--toy_train_size", "4", "--eval_limit", "2", "--use_cpu", "true", "--bf16", "false",
                            "--report_to", "none"])
    assert seen == {"use_cpu": True}


def test_sft_reads_the_authors_corpus_and_ours_with_the_same_turn_layout(tmp_path):
    from r1t1.templates import format_completion

    authors = [{"instruction": "Translate the following sentence from German to English and explain your reasoning:",
                "input": DE[0], "source_lang": "German", "target_lang": "English", "target_text": EN[0],
                "thought_chains": "1. Identify the key elements.\n2. Decide between literal and idiomatic.",
                "output": f"<think>why</think>\n<answer>{EN[0]}</answer>"}]
    (tmp_path / "CoT_data.json").write_text(json.dumps(authors))
    args = translate_sft.TranslateSFTArguments(cot_path=str(tmp_path / "CoT_data.json"))
    (row,) = translate_sft.sft_rows(args, None, 0)
    assert row["prompt"] == [{"role": "user", "content": authors[0]["instruction"] + "\n" + DE[0]}]
    assert row["completion"] == [{"role": "assistant", "content": authors[0]["output"]}]  # as released

    (tmp_path / "cot.jsonl").write_text(json.dumps({"src": DE[0], "tgt": EN[0], "src_lang": "de", "tgt_lang": "en",
                                                    "template": "structural", "cot": "c"}) + "\n")
    (row,) = translate_sft.sft_rows(translate_sft.TranslateSFTArguments(cot_path=str(tmp_path / "cot.jsonl")), None, 0)
    # the authors' prompt style, without its pre-filled turn: the completion teaches the whole turn
    assert [m["role"] for m in row["prompt"]] == ["system", "user"]
    assert row["prompt"][1]["content"].startswith("Please translate the following German Source sentence into English.")
    assert row["completion"][0]["content"] == format_completion("c", EN[0])


def test_evaluate_translation_prompts_the_toy_test_split_as_the_model_was_trained():
    from types import SimpleNamespace

    from r1t1.templates import TemplateSelector
    from r1t1.toy import toy_rows

    def prompts(instruction):
        args = SimpleNamespace(toy=True, limit=3, seed=0, system_prompt="", toy_instruction=instruction)
        return [r["prompt"] for r in evaluate_translation.direction_rows(args, None, TemplateSelector("fixed"))]

    # without the instruction the prompt is what training without it saw: a different, shorter user turn
    bare = prompts(False)
    assert bare == [r["prompt"] for r in toy_rows("test", 3, seed=0, system_prompt=None, instruction=False)]
    assert all(len(b[-1]["content"]) < len(w[-1]["content"]) for b, w in zip(bare, prompts(True)))
