"""The MQAR recall benchmark: the task generator, the accuracy bookkeeping, and a seconds-long run."""

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from benchmarks import recall

TASK = recall.MQARTask(num_keys=16, num_values=12, num_filler=3)


@pytest.mark.parametrize("pairs, length", [(1, 4), (3, 12), (5, 31), (16, 64)])
def test_generator_answers_are_the_values_paired_with_the_queried_keys(pairs, length):
    """Context: `pairs` distinct keys, each followed by a value; filler; then every key once more, followed
    by its value. labels are the answers at exactly the query-answer positions, −100 elsewhere."""
    ids, labels = recall.mqar_batch(TASK, 6, pairs, length, torch.Generator().manual_seed(0))
    assert ids.shape == labels.shape == (6, length)
    answers = length - 2 * pairs + 1 + 2 * torch.arange(pairs)
    for row in range(6):
        keys, values = ids[row, 0:2 * pairs:2], ids[row, 1:2 * pairs:2]
        assert len(set(keys.tolist())) == pairs
        assert ((keys >= 1) & (keys <= TASK.num_keys)).all()
        assert ((values >= TASK.first_value) & (values < TASK.first_filler)).all()
        gap = ids[row, 2 * pairs:length - 2 * pairs]
        assert ((gap >= TASK.first_filler) & (gap < TASK.vocab_size)).all()
        paired = dict(zip(keys.tolist(), values.tolist()))
        queried = ids[row, answers - 1].tolist()
        assert sorted(queried) == sorted(keys.tolist())  # every key queried once
        assert ids[row, answers].tolist() == [paired[k] for k in queried]
        marked = (labels[row] != recall.IGNORE).nonzero().flatten()
        assert marked.tolist() == answers.tolist()
        assert torch.equal(labels[row, answers], ids[row, answers])


def test_generator_is_seeded_and_queries_are_shuffled():
    a = recall.mqar_batch(TASK, 8, 6, 30, torch.Generator().manual_seed(1))
    b = recall.mqar_batch(TASK, 8, 6, 30, torch.Generator().manual_seed(1))
    c = recall.mqar_batch(TASK, 8, 6, 30, torch.Generator().manual_seed(2))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    ids = a[0]
    in_order = [torch.equal(ids[r, 0:12:2], ids[r, 18:30:2]) for r in range(8)]
    assert not all(in_order)


@pytest.mark.parametrize("pairs, length, message", [(0, 8, "pairs"), (17, 80, "pairs"), (4, 15, "length >= 16")])
def test_generator_rejects_impossible_settings(pairs, length, message):
    with pytest.raises(ValueError, match=message):
        recall.mqar_batch(TASK, 2, pairs, length, torch.Generator())


class _Oracle(torch.nn.Module):
    """Logits whose argmax at position i is the token at i + shift (shift 1: the true next token)."""

    def __init__(self, shift):
        super().__init__()
        self.shift = shift

    def forward(self, input_ids, use_cache=False):
        target = torch.roll(input_ids, -self.shift, dims=1)
        return SimpleNamespace(logits=F.one_hot(target, TASK.vocab_size).float())


def test_accuracy_counts_the_answers_predicted_from_the_queried_key():
    """A model that knows the next token scores 1; one that repeats the current token (the key) scores 0:
    the accuracy reads the prediction at the key's position, as the causal-LM loss does."""
    assert recall.recall_accuracy(_Oracle(1), TASK, 5, 24, n=10, batch_size=4, seed=0) == 1.0
    assert recall.recall_accuracy(_Oracle(0), TASK, 5, 24, n=10, batch_size=4, seed=0) == 0.0


def test_selection_hits_count_the_chunk_that_holds_the_answer(monkeypatch):
    """With the selection forced to chunk 0 (C = 4: pairs 0 and 1 of the context), exactly the answers to
    those two of the 4 queried keys count as hits: 0.5; with every chunk picked, 1."""
    import archs.resona.modeling_resona as modeling_resona

    args = recall.parse(["--hidden", "16", "--heads", "2", "--feature_dim", "2", "--chunk", "4", "--top_k", "1",
                         "--lengths", "24", "--pairs", "4"])
    model = recall.build_models(TASK, args)["resona"]
    assert 0.0 <= recall.selection_hits(model, TASK, 4, 24, n=6, batch_size=4, seed=0) <= 1.0

    def chunk_zero(r, summaries, positions, query_valid, *rest):
        b, h, t, _ = r.shape
        picks = torch.zeros(b, h, t, 1, dtype=torch.long)
        return picks, torch.ones_like(picks, dtype=torch.bool), torch.zeros(b, h, t, 1, dtype=r.dtype)

    monkeypatch.setattr(modeling_resona, "select_chunks", chunk_zero)
    assert recall.selection_hits(model, TASK, 4, 24, n=6, batch_size=4, seed=0) == 0.5
    monkeypatch.undo()
    every = recall.build_models(TASK, recall.parse(["--hidden", "16", "--heads", "2", "--chunk", "4", "--top_k", "99",
                                                   "--lengths", "24"]))["resona"]
    assert recall.selection_hits(every, TASK, 4, 24, n=6, batch_size=4, seed=0) == 1.0


def test_resona_starts_from_the_plain_models_weights():
    models = recall.build_models(TASK, recall.parse(["--hidden", "16", "--heads", "2", "--lengths", "24"]))
    regla, resona = models["regla"].state_dict(), models["resona"].state_dict()
    assert all(torch.equal(resona[k], v) for k, v in regla.items())
    assert {k for k in resona if k not in regla} == {k for k in resona if ".retrieval." in k} != set()


def test_training_batches_share_every_pair_count_and_alternate_lengths():
    args = recall.parse(["--pairs", "2", "4", "--lengths", "16", "32", "--batch_size", "5"])
    g = torch.Generator().manual_seed(0)
    for step, length in ((0, 16), (1, 32), (2, 16)):
        ids, labels = recall.training_batch(TASK, step, args, g)
        answers = (labels != recall.IGNORE).sum(dim=1)
        assert ids.shape == (5, length) and answers.tolist() == [2, 2, 2, 4, 4]


def test_seconds_long_run_writes_valid_json_markdown_and_plot(tmp_path, capsys):
    out = tmp_path / "recall"
    recall.main(["--steps", "2", "--pairs", "2", "4", "--lengths", "16", "24", "--hidden", "16", "--heads", "2",
                 "--feature_dim", "2", "--chunk", "4", "--top_k", "1", "--batch_size", "4", "--eval_sequences", "6",
                 "--num_keys", "8", "--num_values", "8", "--quiet", "--output_dir", str(out)])
    result = json.loads((out / "recall.json").read_text())
    assert (out / "recall.png").stat().st_size > 0 and "| pairs | length |" in (out / "recall.md").read_text()
    assert [(r["pairs"], r["length"]) for r in result["accuracy"]] == [(2, 16), (4, 16), (2, 24), (4, 24)]
    for row in result["accuracy"]:
        assert all(0.0 <= row[name] <= 1.0 for name in (*recall.MODELS, "resona_selection_hits"))
    models = result["models"]
    assert set(models) == set(recall.MODELS)
    assert all(m["parameters"] > 0 and m["final_loss"] > 0 and len(m["loss_curve"]) == 2 for m in models.values())
    # ReGLA's state: 2 layers · 2 heads · (Dk·Dv + 1) = 2 · 2 · (2 · 8 + 1); Llama has none
    assert models["regla"]["state_numbers"] == models["resona"]["state_numbers"] == 68
    assert models["llama"]["state_numbers"] is None
    assert result["command"].startswith("python -m benchmarks.recall --steps 2")
    assert "MQAR recall accuracy" in capsys.readouterr().out


def test_bad_settings_name_the_value(tmp_path):
    with pytest.raises(ValueError, match="--steps"):
        recall.main(["--steps", "0", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="length >= 64"):
        recall.main(["--pairs", "16", "--lengths", "40", "--output_dir", str(tmp_path)])
