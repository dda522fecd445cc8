"""The embedded tiny translation model: tokenizer coverage of Toylang, cache keys, loading."""

from transformers import AutoModelForCausalLM, AutoTokenizer

from archs.tiny.translation_build import TinyTranslationRecipe, build_tiny_translation_model
from archs.tiny.translation_task import ADJECTIVES, NOUNS, VERBS, generate_pairs, toy_cot

SMALL = TinyTranslationRecipe(tokenizer_pairs=300, num_layers=2)  # the default vocabulary (768)


def test_build_loads_like_a_checkpoint_and_covers_toylang(tmp_path):
    path = build_tiny_translation_model(tmp_path, recipe=SMALL, prompt_texts=("Translate from English to Toylang:",))
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == len(tok)
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        assert len(tok(tag, add_special_tokens=False)["input_ids"]) == 1
    pair = generate_pairs(1, "test", seed=5)[0]
    text = f"<think>{toy_cot(pair, 'hierarchical')}</think><answer>{pair.tgt}</answer>"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    # every Toylang stem is a short token sequence (the BPE saw them all)
    stems = list(NOUNS.values()) + list(ADJECTIVES.values()) + [v[2] for v in VERBS.values()]
    assert max(len(tok(" " + s, add_special_tokens=False)["input_ids"]) for s in stems) <= 3
    prompt = tok.apply_chat_template([{"role": "user", "content": pair.src}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_cache_is_reused_and_keyed_by_recipe_and_prompts(tmp_path):
    a = build_tiny_translation_model(tmp_path, recipe=SMALL)
    mtime = (a / "build_info.json").stat().st_mtime_ns
    assert build_tiny_translation_model(tmp_path, recipe=SMALL) == a
    assert (a / "build_info.json").stat().st_mtime_ns == mtime  # not rebuilt
    b = build_tiny_translation_model(tmp_path, recipe=SMALL, prompt_texts=("another prompt",))
    assert a != b and a.name.startswith("tiny-translation-") and b.name.startswith("tiny-translation-")
