"""Report the embedded tiny math model's held-out accuracy: what makes it a testbed for RL.

    python -m recipes.tiny_model [--model PATH] [--cache_dir DIR] [--seed 0] [--n_test 300] [--k 16] [--rebuild]

Loads the shipped model (or builds the recipe for another --seed), then prints per difficulty
level: greedy accuracy, sampled (temperature 1) accuracy and pass@k over k samples per problem,
and how often the model answers the quick way (no worked steps). Writes
`<output_dir>/tiny_model_eval.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from archs.tiny import build_tiny_math_model, load_tiny_math_model
from archs.tiny.math_task import is_quick
from nested_reft.data import load_math_dataset
from nested_reft.evaluation import evaluate_math, evaluate_pass_at_k


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a checkpoint folder to report (default: the embedded model)")
    parser.add_argument("--cache_dir", default=None, help="where built models are kept (default ~/.cache/nested_reft)")
    parser.add_argument("--seed", type=int, default=0, help="the build's seed (0: the shipped model) and the sampling seed")
    parser.add_argument("--n_test", type=int, default=300, help="held-out synthetic problems")
    parser.add_argument("--k", type=int, default=16, help="samples per problem for the sampled accuracy and pass@k")
    parser.add_argument("--max_new_tokens", type=int, default=96)
    parser.add_argument("--rebuild", action="store_true", help="rebuild even if shipped or cached")
    parser.add_argument("--output_dir", default="outputs/tiny_model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    start = time.perf_counter()
    path = Path(args.model) if args.model else build_tiny_math_model(args.cache_dir, seed=args.seed, rebuild=args.rebuild)
    build_s = time.perf_counter() - start
    info_file = path / "build_info.json"
    info = json.loads(info_file.read_text()) if info_file.exists() else {}
    model, tokenizer = load_tiny_math_model(path)
    test = load_math_dataset("synthetic", "test", limit=args.n_test, seed=args.seed)
    greedy = evaluate_math(model, tokenizer, test, temperature=0.0, max_new_tokens=args.max_new_tokens, progress=True)
    sampled = evaluate_pass_at_k(model, tokenizer, test, k=args.k, max_new_tokens=args.max_new_tokens,
                                 seed=args.seed, progress=True)
    quick = {"greedy": sum(map(is_quick, greedy.completions)) / greedy.n,
             "sampled": sum(map(is_quick, sampled.completions)) / len(sampled.completions)}

    levels = sorted(greedy.by_level)
    print(f"\nEmbedded tiny math model: {path}")
    if info:
        print(f"{info['parameters'] / 1e6:.2f}M parameters, {info['recipe']['num_layers']} layers; built in "
              f"{info['build_seconds']:.0f} s ({'loaded, ' if build_s < 60 else ''}seed {info['seed']}), "
              f"SFT {info['tokens_per_s']:.0f} tokens/s, final loss {info['final_loss']:.3f}")
    print(f"\n| held-out ({greedy.n} problems) | all | " + " | ".join(f"level {lv}" for lv in levels) + " |")
    print("|---|---|" + "---|" * len(levels))
    print(f"| greedy accuracy | {greedy.accuracy:.1%} | " + " | ".join(f"{greedy.by_level[lv]:.0%}" for lv in levels) + " |")
    print(f"| sampled accuracy (T=1, {args.k} per problem) | {sampled.accuracy:.1%} | "
          + " | ".join(f"{sampled.by_level[lv]['accuracy']:.0%}" for lv in levels) + " |")
    print(f"| pass@{args.k} | {sampled.pass_at_k:.1%} | "
          + " | ".join(f"{sampled.by_level[lv]['pass_at_k']:.0%}" for lv in levels) + " |")
    print(f"\nanswers given the quick way (no worked steps): greedy {quick['greedy']:.1%}, sampled {quick['sampled']:.1%}")
    print(f"example completion:\n  {greedy.samples[0][1]}")

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"model_path": str(path), "build": info, "greedy": greedy.as_dict(), "sampled": sampled.as_dict(),
              "quick_fraction": quick}
    (out / "tiny_model_eval.json").write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
