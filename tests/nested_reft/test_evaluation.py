"""Held-out evaluation decodes exactly as it says and leaves the caller's state alone."""

import copy

import torch

from nested_reft.evaluation import generate_completions

PROMPTS = [[{"role": "user", "content": q}] for q in ("What is 3 + 4?", "Compute 27 - 9.", "9 + 9 = ?", "Tom has 5.")]


def argmax_decode(model, tokenizer, prompt, n):
    """Greedy decoding written out: the argmax of the model's logits, token by token."""
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(n):
            tok = int(model(ids).logits[0, -1].argmax())
            if tok == tokenizer.eos_token_id:
                break
            out.append(tok)
            ids = torch.cat([ids, torch.tensor([[tok]])], dim=1)
    return tokenizer.decode(out, skip_special_tokens=True)


def test_evaluation_leaves_the_global_rng_and_the_tokenizer_as_it_found_them(small_qwen2, chat_tokenizer):
    """Two runs seeded 1 and 2 must keep distinct random streams after an evaluation (it used to
    reseed the global generator to a fixed state), and the tokenizer keeps its padding side."""
    chat_tokenizer.padding_side = "right"
    after = []
    for seed in (1, 2, 1):
        torch.manual_seed(seed)
        generate_completions(small_qwen2, chat_tokenizer, PROMPTS, temperature=1.0, max_new_tokens=4, seed=0)
        after.append(torch.rand(4))
        torch.manual_seed(seed)
        assert torch.equal(after[-1], torch.rand(4))  # the stream continues as if no evaluation ran
    assert not torch.equal(after[0], after[1]) and torch.equal(after[0], after[2])
    assert chat_tokenizer.padding_side == "right"


def test_sampled_evaluation_replays_with_its_seed(small_qwen2, chat_tokenizer):
    a, _ = generate_completions(small_qwen2, chat_tokenizer, PROMPTS * 2, temperature=1.0, max_new_tokens=8, seed=3)
    torch.rand(7)  # the caller's stream moving does not change an evaluation's samples
    b, _ = generate_completions(small_qwen2, chat_tokenizer, PROMPTS * 2, temperature=1.0, max_new_tokens=8, seed=3)
    c, _ = generate_completions(small_qwen2, chat_tokenizer, PROMPTS * 2, temperature=1.0, max_new_tokens=8, seed=4)
    assert a == b and a != c


def test_greedy_is_argmax_whatever_the_checkpoint_generation_config_asks(small_qwen2, chat_tokenizer):
    """A checkpoint shipping repetition_penalty (Qwen2.5-Instruct: 1.05; here 3.0 so it changes the
    argmax path on a tiny model) must not change "greedy" evaluation."""
    reference = [argmax_decode(small_qwen2, chat_tokenizer, p, 12) for p in PROMPTS]
    penalised = copy.deepcopy(small_qwen2)
    penalised.generation_config.repetition_penalty = 3.0
    penalised.generation_config.no_repeat_ngram_size = 2
    texts, _ = generate_completions(penalised, chat_tokenizer, PROMPTS, temperature=0.0, max_new_tokens=12)
    assert texts == reference
    with torch.no_grad():  # the setting really changes decoding when generate() is left to read it
        enc = chat_tokenizer([chat_tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                              for p in PROMPTS], return_tensors="pt", padding=True, add_special_tokens=False)
        raw = penalised.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=chat_tokenizer.pad_token_id)
    assert chat_tokenizer.batch_decode(raw[:, enc["input_ids"].shape[1]:], skip_special_tokens=True) != reference
    assert penalised.generation_config.repetition_penalty == 3.0  # the checkpoint's config is restored


def test_pass_at_k_counts_problems_solved_by_any_of_k_samples(monkeypatch):
    """k completions per problem, problem-major: accuracy is the mean over all, pass@k the share of
    problems with at least one right, both per level."""
    import pytest
    from datasets import Dataset

    from nested_reft import evaluation

    rows = Dataset.from_list([{"prompt": "a", "solution": "1", "level": 1}, {"prompt": "b", "solution": "2", "level": 1},
                              {"prompt": "c", "solution": "3", "level": 2}])
    answers = ["\\boxed{1}", "\\boxed{0}", "\\boxed{0}",   # a: 1 of 3
               "\\boxed{0}", "\\boxed{0}", "\\boxed{0}",   # b: none
               "\\boxed{3}", "\\boxed{3}", "\\boxed{3}"]   # c: all
    seen = {}

    def fake_generate(model, tokenizer, prompts, **kwargs):
        seen["prompts"] = prompts
        return [f"<think>x</think>{a}" for a in answers], 0

    monkeypatch.setattr(evaluation, "generate_completions", fake_generate)
    r = evaluation.evaluate_pass_at_k(None, None, rows, k=3)
    assert seen["prompts"] == ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    assert r.accuracy == pytest.approx((1 / 3 + 0 + 1) / 3) and r.pass_at_k == pytest.approx(2 / 3)
    assert r.by_level[1] == {"accuracy": pytest.approx(1 / 6), "pass_at_k": 0.5}
    assert r.by_level[2] == {"accuracy": 1.0, "pass_at_k": 1.0}
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        evaluation.evaluate_pass_at_k(None, None, rows, k=3, temperature=0)
