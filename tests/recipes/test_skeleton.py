"""recipes.skeleton: one way to parse, resume, evaluate before, train and save, shared by the recipes."""

import json

import pytest

from recipes import evaluate_translation, generate_cot, math_reft, translate_r1t1, translate_sft
from recipes.skeleton import Run


@pytest.mark.parametrize("recipe", [math_reft, translate_sft, translate_r1t1, evaluate_translation, generate_cot])
def test_every_recipe_takes_the_same_flag_names(recipe, capsys):
    with pytest.raises(SystemExit):
        recipe.main(["--help"])
    text = capsys.readouterr().out
    assert "--model_name_or_path" in text
    assert "--output_dir" in text or recipe is generate_cot  # generate_cot writes one file: --output


def test_a_yaml_config_sets_any_flag_and_the_command_line_overrides_it(tmp_path):
    from recipes.skeleton import parse

    config = tmp_path / "eval.yaml"
    config.write_text("model_name_or_path: outputs/run/final\ndecoding: authors\nlimit: 5\n")
    (args,) = parse((evaluate_translation.EvaluateTranslationArguments,), ["--config", str(config), "--limit", "7"])
    assert (args.model_name_or_path, args.decoding, args.limit) == ("outputs/run/final", "authors", 7)


def test_before_is_measured_once_and_kept_on_resume(tmp_path):
    calls = []
    fresh = Run(tmp_path, resume=None)
    assert fresh.before(lambda: calls.append(1) or {"accuracy": 0.25}) == {"accuracy": 0.25}
    assert json.loads(fresh.summary_path.read_text()) == {"before": {"accuracy": 0.25}}
    from recipes.skeleton import last_summary

    previous = last_summary(tmp_path)  # what open_run reads from the folder
    resumed = Run(tmp_path, resume=str(tmp_path / "checkpoint-2"), previous=previous)
    assert resumed.before(lambda: calls.append(2) or {"accuracy": 0.9}) == {"accuracy": 0.25}
    assert calls == [1]


def test_train_closes_the_engine_even_when_training_fails(tmp_path):
    closed = []

    class Engine:
        def close(self):
            closed.append(True)

    class Trainer:
        engine = Engine()

        def train(self, resume_from_checkpoint=None):
            assert resume_from_checkpoint == "ckpt"
            raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        Run(tmp_path, resume="ckpt").train(Trainer())
    assert closed == [True]
    # with several processes the engine stays open until close_engine (after the last gather/save)
    run = Run(tmp_path, resume="ckpt", world_size=2)
    with pytest.raises(RuntimeError, match="out of memory"):
        run.train(Trainer())
    assert closed == [True]
    run.close_engine(Trainer())
    run.close_engine(Trainer())
    assert closed == [True, True]  # once


def test_only_the_main_process_writes(tmp_path):
    run = Run(tmp_path, resume=None, is_main=False, world_size=2)
    assert run.before(lambda: {"accuracy": 0.5}) == {"accuracy": 0.5}
    run.write_summary({"after": 1})
    assert not run.summary_path.exists()
