"""Every rule for bad configurations and inputs, in one table: each is rejected before any model
weights load, with one message that names the bad value.

Each row runs a recipe's `main` with a small checkpoint folder whose weights may not be read
(`from_pretrained` of any model raises here), so a rule that fires only after loading fails.
"""

import json
import re
import shutil

import pytest
import transformers

from recipes import math_reft, translate_r1t1


class ModelLoaded(AssertionError):
    pass


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise ModelLoaded("model weights were loaded before the bad input was rejected")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr("archs.tiny.build_tiny_math_model", refuse)
    monkeypatch.setattr("recipes.translation_common.build_toy_model", refuse)


@pytest.fixture
def files(tmp_path, small_model_dir):
    """Bad inputs that need files: a model with a 24-token context, a tokenizer without a chat
    template, data files with a missing field, no rows, unknown languages."""
    short = tmp_path / "short_context"
    shutil.copytree(small_model_dir, short, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 24}))
    plain = tmp_path / "no_chat_template"
    shutil.copytree(small_model_dir, plain, ignore=shutil.ignore_patterns("*.safetensors", "chat_template.jinja"))
    tok = json.loads((plain / "tokenizer_config.json").read_text())
    tok.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(tok))
    (tmp_path / "no_question.jsonl").write_text('{"q": "What is 2 + 3?", "answer": "5"}\n')
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "xx.tsv").write_text("hallo\thello\txx\ten\n")
    (tmp_path / "pairs.tsv").write_text("hallo welt\thello world\n")
    (tmp_path / "lr_list.yaml").write_text("learning_rate: [1.0e-6]\n")
    (tmp_path / "beta_list.yaml").write_text("beta: [0.1]\n")
    (tmp_path / "lr_word.yaml").write_text("learning_rate: fast\n")
    return {"model": small_model_dir, "short": str(short), "plain": str(plain), "dir": tmp_path}


MATH = [  # (rule, extra argv, exception, message pattern)
    ("skip all layers", ["--skip_mode", "fixed", "--skip_layers", "0", "1", "2", "3", "4", "5"], ValueError, r"skip_layers=\[0, 1, 2, 3, 4, 5\] .*does not fit this 6-layer model: .*cannot skip all 6"),
    ("more layers than eligible", ["--skip_ratio", "0.9"], ValueError, r"skip_ratio=0.9 \(keep_first=2, keep_last=2\) does not fit .*cannot skip 5 layers: only 2 of 6"),
    ("skip layer out of range", ["--skip_mode", "fixed", "--skip_layers", "9"], ValueError, r"skip_layers=\[9\] .*\[9\] are out of range"),
    ("skip ratio >= 1", ["--skip_ratio", "1.0"], ValueError, r"skip_ratio must be in \[0, 1\), got 1.0"),
    ("negative skip ratio", ["--skip_ratio", "-0.1"], ValueError, r"skip_ratio must be in \[0, 1\), got -0.1"),
    ("fixed mode without layers", ["--skip_mode", "fixed"], ValueError, r"skip_mode='fixed' needs skip_layers"),
    ("half a k range", ["--skip_k_min", "1"], ValueError, r"set both skip_k_min and skip_k_max or neither, got 1, None"),
    ("unknown correction", ["--correction", "magic"], SystemExit, r"invalid choice: 'magic'"),
    ("unknown engine", ["--engine", "tgi"], SystemExit, r"invalid choice: 'tgi'"),
    ("unknown behavior", ["--behavior", "distilled"], SystemExit, r"invalid choice: 'distilled'"),
    ("clip <= 0", ["--clip", "0"], ValueError, r"clip must be >= 1, got 0.0"),
    ("clip below 1", ["--clip", "0.5"], ValueError, r"clip must be >= 1, got 0.5"),
    ("lambda > 1", ["--correction", "retrace", "--lam", "1.5"], ValueError, r"lam must be in \[0, 1\], got 1.5"),
    ("ess_target 0", ["--correction", "ess_adaptive", "--ess_target", "0"], ValueError, r"ess_target must be in \(0, 1\], got 0.0"),
    ("ess_target > 1", ["--correction", "ess_adaptive", "--ess_target", "1.5"], ValueError, r"ess_target must be in \(0, 1\], got 1.5"),
    ("ess_adaptive with a fixed set", ["--correction", "ess_adaptive", "--skip_mode", "fixed", "--skip_layers", "2"], ValueError, r"skip_mode='fixed' pins"),
    ("skip ratio bounds reversed", ["--skip_ratio_min", "0.5", "--skip_ratio_max", "0.2"], ValueError, r"got 0.5, 0.2"),
    ("top_k below -1", ["--top_k", "-5"], ValueError, r"top_k must be >= 0, or -1 / 0 for off, got -5"),
    ("min_p >= 1", ["--min_p", "1.5"], ValueError, r"min_p must be in \[0, 1\), got 1.5"),
    ("repetition penalty 0", ["--repetition_penalty", "0"], ValueError, r"repetition_penalty must be > 0 \(1 is off\), got 0.0"),
    ("generation_kwargs", ["--generation_kwargs", '{"typical_p": 0.9}'], ValueError, r"generation_kwargs \['typical_p'\]"),
    ("rescore with top_p", ["--behavior_logprobs", "rescore", "--top_p", "0.9"], ValueError, r"top_p=0.9"),
    ("PoT on a vLLM engine", ["--behavior", "pot", "--engine", "vllm_server"], ValueError, r"needs engine='hf', got 'vllm_server'"),
    ("PoT bits", ["--behavior", "pot", "--pot_bits", "5"], ValueError, r"pot_bits must be 2, 3 or 4, got 5"),
    ("PoT with PEFT", ["--behavior", "pot", "--use_peft", "true"], ValueError, r"behavior='pot' .* use_peft"),
    ("Balcony on a vLLM engine", ["--behavior", "balcony", "--skip_ratio", "0", "--engine", "vllm_server"], ValueError, r"behavior='balcony' .* needs engine='hf', got 'vllm_server'"),
    ("Balcony with a skip set", ["--behavior", "balcony"], ValueError, r"not a skip set: set skip_ratio=0 \(got 0.25\)"),
    ("Balcony exit 0", ["--behavior", "balcony", "--skip_ratio", "0", "--balcony_exit", "0"], ValueError, r"balcony_exit must be >= 1 .*, got 0"),
    ("Balcony exit deeper than the model", ["--behavior", "balcony", "--skip_ratio", "0", "--balcony_exit", "6"], ValueError, r"balcony_exit=6 does not fit this 6-layer model"),
    ("Balcony exits path missing", ["--behavior", "balcony", "--skip_ratio", "0", "--balcony_exits_path", "/no/such/exits"], FileNotFoundError, r"'/no/such/exits' has no Balcony exits"),
    ("Balcony with PEFT", ["--behavior", "balcony", "--skip_ratio", "0", "--use_peft", "true"], ValueError, r"behavior='balcony' with use_peft"),
    ("Balcony KL reduction", ["--behavior", "balcony", "--skip_ratio", "0", "--balcony_kl_reduction", "sum"], SystemExit, r"invalid choice: 'sum'"),
    ("Balcony fields without Balcony", ["--balcony_exit", "3"], ValueError, r"only with behavior='balcony', got behavior='skip'"),
    ("TRL's own vLLM path", ["--use_vllm", "true"], ValueError, r"use_vllm=True selects TRL's own vLLM path"),
    ("vespo loss", ["--loss_type", "vespo"], ValueError, r"loss_type='vespo'"),
    ("negative probe interval", ["--full_model_probe_every", "-1"], ValueError, r"got -1, 64"),
    ("server timeout 0", ["--engine", "vllm_server", "--vllm_request_timeout", "0"], ValueError, r"vllm_request_timeout > 0 .* got 0"),
    ("cache_implementation on vLLM", ["--engine", "vllm_server", "--cache_implementation", "static"], ValueError, r"cache_implementation='static'"),
    ("unknown weight transfer", ["--engine", "vllm_server", "--vllm_weight_transfer", "rdma"], SystemExit, r"invalid choice: 'rdma'"),
    ("missing weights folder", ["--engine", "vllm_server", "--vllm_server_weights_dir", "/no/such/dir"], ValueError, r"vllm_server_weights_dir '/no/such/dir' is not a folder"),
    ("sleep mode on CPU", ["--engine", "vllm", "--vllm_enable_sleep_mode", "true"], ValueError, r"sleep mode needs a CUDA/ROCm GPU"),
    ("vLLM memory fraction", ["--engine", "vllm", "--vllm_gpu_memory_utilization", "1.5"], ValueError, r"got 1.5"),
    ("missing model path", ["--model_name_or_path", "/no/such/model"], FileNotFoundError, r"model '/no/such/model' does not exist"),
    ("missing dataset", ["--dataset_path", "/no/such/data.jsonl"], FileNotFoundError, r"/no/such/data.jsonl"),
    ("missing dataset field", ["--dataset_path", "{dir}/no_question.jsonl", "--dataset_format", "generic", "--question_field", "question", "--answer_field", "answer"], ValueError, r"field 'question' is missing"),
    ("empty dataset", ["--dataset_path", "{dir}/empty.jsonl", "--dataset_format", "generic"], ValueError, r"empty"),
    ("holdout fraction", ["--dataset_path", "{dir}/no_question.jsonl", "--dataset_format", "generic", "--question_field", "q", "--answer_field", "answer", "--holdout_fraction", "1.5"], ValueError, r"holdout_fraction must be in \(0, 1\), got 1.5"),
    ("unknown data format", ["--dataset_format", "csvish"], ValueError, r"unknown format 'csvish'"),
    ("prompt longer than context", ["--model_name_or_path", "{short}"], ValueError, r"> the model's context of 24"),
    ("tokenizer without chat template", ["--model_name_or_path", "{plain}"], ValueError, r"has no chat template"),
    ("FSDP with the in-process engine", ["--fsdp", "full_shard"], ValueError, r"FSDP keeps only shards .* engine='hf'"),
    ("negative beta", ["--beta", "-0.5"], ValueError, r"beta \(the KL coefficient\) must be a finite number >= 0, got -0.5"),
    ("NaN beta", ["--beta", "nan"], ValueError, r"beta .* got nan"),
    ("negative epsilon", ["--epsilon", "-0.2"], ValueError, r"epsilon \(the PPO clip range\) must be > 0, got -0.2"),
    ("no iterations", ["--num_iterations", "0"], ValueError, r"num_iterations must be >= 1, got 0"),
    ("no accumulation steps", ["--gradient_accumulation_steps", "0"], ValueError, r"gradient_accumulation_steps must be >= 1, got 0"),
    ("rollout batch 0", ["--rollout_batch_size", "0"], ValueError, r"rollout_batch_size must be >= 1, got 0"),
    ("completion length 0", ["--max_completion_length", "0"], ValueError, r"max_completion_length must be >= 1, got 0"),
    ("learning rate list in YAML", ["--config", "{dir}/lr_list.yaml"], ValueError, r"learning_rate must be a number, got \[1e-06\] \(list\)"),
    ("beta list in YAML", ["--config", "{dir}/beta_list.yaml"], ValueError, r"beta must be a number, got \[0.1\] \(list\)"),
    ("word for a number in YAML", ["--config", "{dir}/lr_word.yaml"], SystemExit, r"learning_rate.*invalid float value: 'fast'"),
    ("idle-step limit negative", ["--max_idle_steps", "-1"], ValueError, r"max_idle_steps must be >= 0 \(0: off\), got -1"),
    ("4-bit loading", ["--load_in_4bit", "true"], ValueError, r"--load_in_4bit .* is not supported"),
    ("8-bit loading", ["--load_in_8bit", "true"], ValueError, r"--load_in_8bit .* is not supported"),
    ("remote code", ["--trust_remote_code", "true"], ValueError, r"--trust_remote_code is not supported"),
    ("resume flag", ["--resume_from_checkpoint", "/some/checkpoint-5"], ValueError, r"--resume_from_checkpoint '/some/checkpoint-5' is not used"),
    ("non-finite behavior option", ["--nonfinite_logprobs", "ignore"], SystemExit, r"invalid choice: 'ignore'"),
]

TRANSLATION = [
    ("unknown language code", ["--train_path", "{dir}/xx.tsv", "--eval_path", "{dir}/pairs.tsv"], ValueError, r"unknown language 'xx'"),
    ("unknown language name", ["--train_path", "{dir}/pairs.tsv", "--eval_path", "{dir}/pairs.tsv", "--src_lang", "klingon", "--tgt_lang", "en"], ValueError, r"unknown language 'klingon'"),
    ("real corpus without a held-out set", ["--train_path", "{dir}/pairs.tsv", "--src_lang", "de", "--tgt_lang", "en"], ValueError, r"needs a held-out set"),
    ("missing training file", ["--train_path", "/no/such/pairs.tsv"], FileNotFoundError, r"/no/such/pairs.tsv"),
    ("missing Flores folder", ["--eval_flores_dir", "/no/such/flores", "--eval_direction", "de-en"], FileNotFoundError, r"/no/such/flores"),
    ("malformed direction", ["--eval_flores_dir", "{dir}", "--eval_direction", "deen"], ValueError, r"direction 'deen' must look like 'de-en'"),
    ("unknown template", ["--template", "freestyle"], ValueError, r"unknown template 'freestyle'"),
    ("unknown KL mode", ["--kl_mode", "both"], SystemExit, r"invalid choice: 'both'"),
    ("COMET without a checkpoint", ["--reward_metric", "comet"], ValueError, r"needs comet_model"),
    ("negative beta", ["--beta", "-1"], ValueError, r"beta .*must be (a finite number )?>= 0, got -1.0"),
    ("NaN beta", ["--beta", "nan"], ValueError, r"beta .* got nan"),
    ("format column weighted", ["--reward_weights", "1", "1"], ValueError, r"reward_weights=\[1.0, 1.0\]"),
    ("missing model path", ["--model_name_or_path", "./outputs/no_such_sft/final"], FileNotFoundError, r"does not exist .*translate_sft"),
]


def run(recipe, argv, files, tmp_path):
    places = {"{dir}": str(files["dir"]), "{short}": files["short"], "{plain}": files["plain"]}
    argv = [places.get(a.split("/")[0], a.split("/")[0]) + a[len(a.split("/")[0]):] for a in argv]
    base = ["--model_name_or_path", files["model"], "--output_dir", str(tmp_path / "out"), "--report_to", "none",
            "--use_cpu", "true"]
    recipe.main(base + argv)  # later flags win, so a row may replace the model path


@pytest.mark.parametrize("rule, argv, error, pattern", MATH, ids=[row[0] for row in MATH])
def test_math_recipe_rejects_before_loading(rule, argv, error, pattern, files, tmp_path, capsys):
    check(math_reft, argv, error, pattern, files, tmp_path, capsys)


@pytest.mark.parametrize("rule, argv, error, pattern", TRANSLATION, ids=[row[0] for row in TRANSLATION])
def test_translation_recipe_rejects_before_loading(rule, argv, error, pattern, files, tmp_path, capsys):
    check(translate_r1t1, argv, error, pattern, files, tmp_path, capsys)


def check(recipe, argv, error, pattern, files, tmp_path, capsys):
    with pytest.raises(error) as info:
        run(recipe, argv, files, tmp_path)
    message = capsys.readouterr().err if error is SystemExit else str(info.value)
    assert info.type is not ModelLoaded
    assert re.search(pattern, message), message


@pytest.mark.parametrize("env, deepspeed", [({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, None),
                                           ({}, {"zero_optimization": {"stage": 3}})])
def test_zero3_with_the_in_process_engine(env, deepspeed, monkeypatch):
    """ZeRO-3 shards the policy: the trainer gathers it for engine='hf' (tests/recipes/test_multiprocess.py
    runs it), but not layer by layer, and not for the behavior models built from the policy."""
    from types import SimpleNamespace

    from recipes.preflight import check_engine_and_sharding

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = SimpleNamespace(engine="hf", deepspeed=deepspeed, fsdp=None, behavior="skip", ds3_gather_for_generation=True)
    check_engine_and_sharding(args, use_peft=False)
    with pytest.raises(ValueError, match=r"ds3_gather_for_generation=False with ZeRO-3"):
        check_engine_and_sharding(SimpleNamespace(**{**vars(args), "ds3_gather_for_generation": False}), use_peft=False)
    with pytest.raises(ValueError, match=r"behavior='pot' builds its sampler .* ZeRO-3 shards"):
        check_engine_and_sharding(SimpleNamespace(**{**vars(args), "behavior": "pot"}), use_peft=False)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    check_engine_and_sharding(SimpleNamespace(**{**vars(args), "behavior": "pot", "deepspeed": {"zero_optimization": {"stage": 2}}}),
                              use_peft=False)  # ZeRO-2 keeps whole parameters on every rank


def test_vllm_not_installed(files, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ValueError, match=r"engine='vllm' needs vLLM: pip install"):
        run(math_reft, ["--engine", "vllm"], files, tmp_path)
