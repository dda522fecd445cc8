"""The documented real-model commands, run with their shipped configs on models of the real families.

Each model is a random-weight Qwen2.5 with the real vocabulary size, rope θ, tied or untied
embeddings and query/key-value head ratio, but few layers and a small hidden size, saved with a
locally trained byte-level BPE that carries Qwen's ChatML template. The command line overrides only
sizes (lengths, batches, steps, evaluation limits), the CPU settings and the data/model paths; the
runs start in tmp_path so that the configs' relative `outputs/...` paths chain there as documented
(SFT `final/` → GRPO → evaluation).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "recipes" / "configs"
CPU = ["--use_cpu", "true", "--bf16", "false", "--dtype", "float32"]

# The real checkpoints' config.json values this test keeps (the sizes are shrunk below).
QWEN25_7B_INSTRUCT = dict(vocab_size=152064, num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6,
                          max_position_embeddings=32768, tie_word_embeddings=False, rms_norm_eps=1e-6)
QWEN25_MATH_1_5B = dict(vocab_size=151936, num_attention_heads=12, num_key_value_heads=2, rope_theta=1e4,
                        max_position_embeddings=4096, tie_word_embeddings=True, rms_norm_eps=1e-6)
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN_MATH_SYSTEM = "Please reason step by step, and put your final answer within \\\\boxed{}."

# Qwen2.5's chat template without its tool-calling branches: a default system message when the
# conversation has none, then <|im_start|>role\n...<|im_end|>\n per message.
CHATML = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nDEFAULT_SYSTEM<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role != 'system' or not loop.first %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

DE = ["Die Katze schläft auf dem Sofa.", "Zwei Hunde rennen schnell.", "Heute regnet es in Berlin.",
      "Wir lesen jeden Abend Bücher."]
EN = ["The cat sleeps on the sofa.", "Two dogs run fast.", "It is raining in Berlin today.",
      "We read books every evening."]
COT = ("Core elements: subject, verb, place. Nouns and verbs: Katze = cat, schläft = sleeps. "
       "Word order: subject verb place. Final review: natural English.")


def qwen_tokenizer(system: str):
    """A byte-level BPE trained on a few local strings, with Qwen's special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from r1t1.templates import SYSTEM_PROMPT, TEMPLATES

    texts = DE + EN + [COT, SYSTEM_PROMPT, system, "<think></think><answer></answer> #### \\boxed{}"]
    texts += [t.instruction for t in TEMPLATES.values()] + ["Translate from German to English:"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts * 4, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"], model_max_length=32768,
                                   chat_template=CHATML.replace("DEFAULT_SYSTEM", system))


def save_random_qwen(path: Path, real: dict, layers: int, system: str) -> Path:
    """Qwen2.5 of the real family shrunk to `layers` layers and head_dim 16: the real vocabulary,
    rope θ, embedding tying and query/kv head ratio (7B: 28/4 → 7/1; Math-1.5B: 12/2 → 6/1)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config

    tokenizer = qwen_tokenizer(system)
    heads = real["num_attention_heads"] // real["num_key_value_heads"]
    config = Qwen2Config(**{**real, "num_attention_heads": heads, "num_key_value_heads": 1},
                         num_hidden_layers=layers, hidden_size=16 * heads, head_dim=16, intermediate_size=32 * heads,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    assert config.vocab_size >= len(tokenizer)  # as in the real checkpoints (padded embedding rows)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Qwen2.5-Instruct's own sampler settings: the recipes must not let them change the rollouts.
    model.generation_config = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.8, top_k=20,
                                               repetition_penalty=1.05, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_settings(output_dir: str) -> dict:
    return json.loads((Path(output_dir) / "run.json").read_text())["settings"]


# --------------------------------------------------------------------------------------- cheap checks


def load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


REAL_CONFIGS = ("math_reft_qwen2.5_math_1.5b_gsm8k.yaml", "math_reft_qwen2.5_math_1.5b_math.yaml",
                "r1t1_sft_qwen2.5_7b.yaml", "r1t1_grpo_qwen2.5_7b.yaml", "r1t1_grpo_qwen2.5_7b_lora.yaml")


@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_real_configs_train_in_bf16_with_checkpointing_and_name_their_hardware(name):
    text = (CONFIGS / name).read_text()
    c = yaml.safe_load(text)
    assert (c["dtype"], c["bf16"], c["gradient_checkpointing"]) == ("bfloat16", True, True)
    assert "80GB" in text and f"--config recipes/configs/{name}" in text  # hardware and the command
    assert c["output_dir"] == f"outputs/{name.removesuffix('.yaml')}"


def test_r1t1_configs_chain_and_carry_the_authors_settings():
    sft = load("r1t1_sft_qwen2.5_7b.yaml")
    assert sft["max_length"] >= 4096 and 1e-5 <= sft["learning_rate"] <= 2e-5 and sft["warmup_steps"] > 0
    for name in ("r1t1_grpo_qwen2.5_7b.yaml", "r1t1_grpo_qwen2.5_7b_lora.yaml"):
        g = load(name)
        assert g["model_name_or_path"] == sft["output_dir"] + "/final"
        per_step = g["per_device_train_batch_size"] * g["gradient_accumulation_steps"] * (1 if "lora" in name else 8)
        assert per_step == 8 * 8 and g["num_generations"] == 8  # 8 prompts x 8 rollouts per optimizer step
        assert (g["temperature"], g["kl_mode"], g["beta"], g["max_completion_length"], g["num_train_epochs"],
                g["skip_ratio"]) == (0.8, "loss", 0.001, 8000, 2, 0.0)
    assert load("r1t1_grpo_qwen2.5_7b.yaml")["learning_rate"] == 4e-7
    lora = load("r1t1_grpo_qwen2.5_7b_lora.yaml")
    assert lora["use_peft"] is True and lora["lora_r"] > 0 and "q_proj" in lora["lora_target_modules"]


def test_the_docs_run_the_real_configs_and_the_accelerate_config_loads():
    from accelerate.commands.config.config_args import load_config_from_file

    docs = (REPO / "docs" / "r1t1.md").read_text() + (REPO / "docs" / "nested_reft.md").read_text()
    for name in REAL_CONFIGS:
        assert f"recipes/configs/{name}" in docs, name
    assert "outputs/r1t1_grpo_qwen2.5_7b/final" in docs and "outputs/r1t1_grpo_qwen2.5_7b_lora/final" in docs
    ds = load_config_from_file(str(REPO / "recipes" / "accelerate" / "deepspeed_zero2.yaml"))
    assert (ds.distributed_type.value, ds.deepspeed_config["zero_stage"], ds.num_processes) == ("DEEPSPEED", 2, 8)
    assert "recipes/accelerate/deepspeed_zero2.yaml" in docs


# --------------------------------------------------------------------------------------- the chains


@pytest.mark.slow
def test_r1t1_sft_then_grpo_then_evaluation_as_documented(tmp_path, monkeypatch):
    from r1t1.data import write_flores
    from recipes import evaluate_translation, translate_r1t1, translate_sft

    monkeypatch.chdir(tmp_path)
    model = save_random_qwen(Path("models/qwen2.5-7b-instruct"), QWEN25_7B_INSTRUCT, layers=2, system=QWEN_SYSTEM)
    Path("data").mkdir()
    templates = ["hierarchical", "back_translation", "structural", "explanation"]
    Path("data/cot.jsonl").write_text("".join(json.dumps({"src": s, "tgt": t, "src_lang": "de", "tgt_lang": "en", "template": k, "cot": COT}) + "\n"
                                              for s, t, k in zip(DE, EN, templates)))
    Path("data/train.de-en.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in zip(DE, EN)))
    write_flores("data/flores101_dataset", "devtest", {"de": DE, "en": EN}, naming="flores101")
    held_out = ["--eval_flores_dir", "data/flores101_dataset", "--eval_direction", "de-en"]
    evals = ["--eval_limit", "2", "--eval_max_new_tokens", "8", "--eval_batch_size", "2"]

    sft = translate_sft.main(["--config", str(CONFIGS / "r1t1_sft_qwen2.5_7b.yaml"), "--model_name_or_path", str(model),
                              "--cot_path", "data/cot.jsonl", *held_out, *evals, *CPU, "--max_steps", "1",
                              "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
                              "--max_length", "320"])
    assert sft["steps"] == 1 and sft["train_examples"] == 4 and Path(sft["final_model"]).resolve() == Path("outputs/r1t1_sft_qwen2.5_7b/final").resolve()
    s = run_settings("outputs/r1t1_sft_qwen2.5_7b")
    assert (s["learning_rate"], s["lr_scheduler_type"], s["gradient_checkpointing"]) == (1e-5, "cosine", True)
    saved = json.loads(Path("outputs/r1t1_sft_qwen2.5_7b/final/config.json").read_text())
    assert saved["vocab_size"] == 152064 and saved["tie_word_embeddings"] is False

    grpo_size = [*held_out, *evals, *CPU, "--train_path", "data/train.de-en.tsv", "--src_lang", "de", "--tgt_lang", "en",
                 "--max_steps", "1", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1",
                 "--max_completion_length", "12", "--rollout_batch_size", "8"]
    built = {}

    class RecordingTrainer(translate_r1t1.R1T1Trainer):
        def __init__(self, *args, **kwargs):
            built.update(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(translate_r1t1, "R1T1Trainer", RecordingTrainer)
    for name, out in (("r1t1_grpo_qwen2.5_7b.yaml", "outputs/r1t1_grpo_qwen2.5_7b"),
                      ("r1t1_grpo_qwen2.5_7b_lora.yaml", "outputs/r1t1_grpo_qwen2.5_7b_lora")):
        # no --model_name_or_path: the config's default is the SFT run's final/ folder
        grpo = translate_r1t1.main(["--config", str(CONFIGS / name), *grpo_size])
        assert grpo["model"] == "outputs/r1t1_sft_qwen2.5_7b/final" and grpo["steps"] == 1
        # the authors' prompts by default: rendered as text that ends in the pre-filled <think>, which
        # the reward reads before each completion, under their format gate
        assert (grpo["prompt_style"], grpo["format_gate"]) == ("authors", "authors")
        prompt = built["train_dataset"][0]["prompt"]
        assert isinstance(prompt, str) and prompt.endswith("<|im_start|>assistant\n<think>")
        assert "Please translate the following German Source sentence into English." in prompt
        quality, fmt = built["reward_funcs"]
        ref = built["train_dataset"][0]["ref"]
        assert fmt([f"r</think><answer>{ref}</answer>"]) == [1.0]
        assert quality([f"r</think><answer>{ref}</answer>"], src=["s"], ref=[ref]) == [pytest.approx(1.2)]
        s = run_settings(out)
        assert (s["temperature"], s["beta"], s["kl_mode"], s["num_generations"]) == (0.8, 0.001, "loss", 8)
        rows = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
        assert any("rewards/translation_chrf/mean" in r for r in rows) and any("kl" in r for r in rows)
    assert run_settings("outputs/r1t1_grpo_qwen2.5_7b")["learning_rate"] == 4e-7
    adapter = json.loads(Path("outputs/r1t1_grpo_qwen2.5_7b_lora/final/adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "outputs/r1t1_sft_qwen2.5_7b/final" and adapter["r"] == 64

    # the evaluation command reads the GRPO output (a full model, or the adapter over its base)
    for final in ("outputs/r1t1_grpo_qwen2.5_7b/final", "outputs/r1t1_grpo_qwen2.5_7b_lora/final"):
        results = evaluate_translation.main(["--model", final, "--flores_dir", "data/flores101_dataset",
                                             "--directions", "de-en,en-de", "--template", "random",
                                             "--max_new_tokens", "8", "--limit", "2", "--batch_size", "2",
                                             "--output_dir", "outputs/r1t1_eval_qwen2.5_7b"])
        assert [(r["direction"], r["n"]) for r in results] == [("de-en", 2), ("en-de", 2)]
        assert json.loads(Path("outputs/r1t1_eval_qwen2.5_7b/results.json").read_text())["model"] == final


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["gsm8k", "math"])
def test_math_reft_real_config_as_documented(dataset, tmp_path, monkeypatch):
    from recipes import math_reft

    monkeypatch.chdir(tmp_path)
    # 6 layers: with keep_first = keep_last = 2 the config's skip_ratio 0.25 skips round(1.5) = 2 of them
    model = save_random_qwen(Path("models/qwen2.5-math-1.5b"), QWEN25_MATH_1_5B, layers=6, system=QWEN_MATH_SYSTEM)
    if dataset == "gsm8k":
        folder = Path("data/gsm8k/main")
        rows = [{"question": f"Tom has {a} apples and buys {b} more. How many now?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}
                for a, b in [(3, 4), (10, 5), (7, 8), (2, 9), (6, 6), (1, 12)]]
    else:
        folder = Path("data/math")
        rows = [{"problem": f"What is ${a} \\cdot {b}$?", "solution": f"${a} \\cdot {b} = \\boxed{{{a * b}}}$",
                 "level": "Level 1", "type": "Prealgebra"} for a, b in [(3, 4), (10, 5), (7, 8), (2, 9), (6, 6), (1, 12)]]
    folder.mkdir(parents=True)
    for split, part in (("train", rows[:4]), ("test", rows[4:])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))

    name = f"math_reft_qwen2.5_math_1.5b_{dataset}"
    summary = math_reft.main(["--config", str(CONFIGS / f"{name}.yaml"), "--model_name_or_path", str(model),
                              "--dataset_path", f"data/{dataset}/", *CPU, "--max_steps", "1",
                              "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1",
                              "--rollout_batch_size", "8", "--max_completion_length", "12",
                              "--eval_limit", "2", "--eval_max_new_tokens", "8",
                              "--eval_batch_size", "2"])
    assert summary["steps"] == 1 and summary["before"]["n"] == 2
    assert [len(s) for s in summary["skip_history"]] == [2]  # layers really skipped on the real family
    assert 0 < summary["mean_ess"] <= 1
    s = run_settings(f"outputs/{name}")
    assert (s["learning_rate"], s["skip_ratio"], s["correction"], s["beta"], s["reward_weights"]) == (
        1e-6, 0.25, "tis", 0.0, [1.0, 0.0])
    assert Path(f"outputs/{name}/final/config.json").exists()
