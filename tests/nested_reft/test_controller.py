"""The adaptive skip controller on synthetic ESS sequences."""

import pytest

from nested_reft.controller import AdaptiveSkipController
from nested_reft.skipping import LayerSkipPolicy


def test_ratio_rises_while_ess_is_high_falls_when_low_and_holds_in_the_band():
    c = AdaptiveSkipController(0.25, target=0.8, band=0.05, r_min=0.0, r_max=0.5, step=0.05)
    ess = [0.95, 0.9, 0.85, 0.78, 0.76, 0.6, 0.5, 0.9, 0.99, 0.99, 0.99, 0.99, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]
    ratios = [c.update(e) for e in ess]
    assert ratios == pytest.approx([
        0.30, 0.35, 0.40,  # above target: up
        0.40, 0.40,        # within the band [0.75, 0.8]: hold
        0.35, 0.30,        # below the band: down
        0.35, 0.40, 0.45, 0.50, 0.50,  # up, capped at r_max
        0.45, 0.40, 0.35, 0.30, 0.25, 0.20, 0.15,
    ])
    for _ in range(10):
        c.update(0.0)
    assert c.ratio == 0.0  # floored at r_min


def test_controller_drives_the_policy_and_validates():
    policy = LayerSkipPolicy(16, skip_ratio=0.25, seed=0)
    c = AdaptiveSkipController(0.25, r_max=0.5, step=0.125)
    policy.set_skip_ratio(c.update(0.95))
    assert len(policy.draw()) == 6  # round(0.375 * 16)
    policy.set_skip_ratio(c.update(0.1))
    assert len(policy.draw()) == 4
    with pytest.raises(ValueError, match="0.7, 0.5"):
        AdaptiveSkipController(0.2, r_min=0.7, r_max=0.5)
    with pytest.raises(ValueError, match="got 1.5"):
        AdaptiveSkipController(0.2, target=1.5)
    with pytest.raises(ValueError, match="cannot change"):
        LayerSkipPolicy(8, mode="fixed", layers=[3]).set_skip_ratio(0.5)


def test_controller_moves_a_k_range_keeping_its_width():
    from nested_reft.skipping import LayerSkipPolicy

    policy = LayerSkipPolicy(8, keep_first=2, keep_last=2, k_range=(0, 2), seed=0)  # 4 eligible layers
    assert policy.mean_skip_ratio == 1 / 8
    policy.set_skip_ratio(0.25)  # centre 2 layers
    assert policy.k_range == (1, 3)
    policy.set_skip_ratio(0.49)  # centre 3.9: shifted back inside the 4 eligible layers
    assert policy.k_range == (2, 4)
    policy.set_skip_ratio(0.0)
    assert policy.k_range == (0, 2)
    assert all(0 <= len(policy.draw()) <= 2 for _ in range(20))
    state = policy.state_dict()
    policy.set_skip_ratio(0.3)
    policy.load_state_dict(state)
    assert policy.k_range == (0, 2)  # the range is part of the checkpointed state
