"""10 000 fuzzed completions through each reward, in trainer-sized batches (benchmarks/reward_soak.py)."""

import pytest

from benchmarks import reward_soak


@pytest.mark.slow
def test_ten_thousand_fuzzed_completions_per_reward(tmp_path):
    rows = reward_soak.main(["--n", "10000", "--batch", "128", "--workers", "2", "--out", str(tmp_path)])
    math_row, translation_row = rows
    for row in rows:
        assert row["items"] == 10_000 and row["labelled"] > 4000
    assert math_row["cut_off"] >= 1  # the planted hangs were cut off, not waited for
    assert (tmp_path / "reward_soak.json").exists()


def test_the_soak_check_catches_a_lost_or_reordered_result():
    items = reward_soak.translation_items(300, seed=0)

    def reordered(chunk):
        from rewards.translation import translation_reward

        scores = translation_reward([c for c, _, _, _ in chunk], [s for _, s, _, _ in chunk], [r for _, _, r, _ in chunk])
        return scores[1:] + scores[:1]

    with pytest.raises(AssertionError, match="lost or reordered"):
        reward_soak.soak("translation", items, reordered, batch=64, bound_s=1.0)
    with pytest.raises(AssertionError, match="scores for"):
        reward_soak.soak("translation", items, lambda chunk: [0.0] * (len(chunk) - 1), batch=64, bound_s=1.0)


def test_the_adversarial_batch_counts_its_power_towers_as_time_outs_without_restarts():
    row = reward_soak.adversarial_batch(batch=12, hang_every=4, workers=2, timeout=2.0, seed=0)
    assert row["power_towers"] == 3 and row["items"] == 12
    # each power tower is cut off by its own worker, which stays: none is killed and restarted
    assert row["timeouts"] >= 3 and row["restarts"] == 0 and row["cold_starts"] == 0
    assert row["power_tower_item_s_mean"] >= 2.0  # each ran to its limit
    # a normal answer can only disagree with its label by being cut off too
    assert row["labelled_disagreeing"] <= row["timeouts"] - 3
