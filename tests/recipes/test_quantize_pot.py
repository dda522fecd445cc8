"""The PoT quantization recipe end to end on a small saved checkpoint."""

import json
import math

from recipes.quantize_pot import main


def test_recipe_reports_four_perplexities_and_saves_a_loadable_model(small_model_dir, tmp_path):
    out = tmp_path / "q"
    result = main(["--model_name_or_path", small_model_dir, "--bits", "3", "--group_size", "32",
                   "--calib_sequences", "16", "--eval_sequences", "16", "--refine_steps", "5",
                   "--output_dir", str(out), "--save_model", "true"])
    saved = json.loads((out / "results.json").read_text())
    ppl = saved["perplexity"]
    assert list(ppl) == ["fp32", "INT3 RTN", "PoT3 init", "PoT3 refined"] and ppl == result["perplexity"]
    assert all(math.isfinite(v) and v > 1 for v in ppl.values())
    assert len(set(ppl.values())) == 4  # each model is really a different one
    assert saved["eval_scored_tokens"] > 0 and saved["calib_tokens"] > saved["eval_scored_tokens"] / 2
    assert (out / "pot_model" / "pot_quantization.json").exists()

    from transformers import AutoTokenizer

    from recipes.quantize_pot import perplexity, synthetic_examples
    from reft_kernels.pot.quantize import load_quantized

    model = load_quantized(out / "pot_model")
    held = synthetic_examples(AutoTokenizer.from_pretrained(small_model_dir), "test", 16, 1)
    assert perplexity(model, held, 32, "reloaded") == ppl["PoT3 refined"]
