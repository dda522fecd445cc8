"""SCOUT's attention ops against independent forms: the masks against the rule written as loops
(and transformers' own sliding-window mask), the gathered checkpoint attention and the dense masked
attention against `F.scaled_dot_product_attention` with the boolean mask, in float64."""

import pytest
import torch
import torch.nn.functional as F
from transformers.masking_utils import sliding_window_causal_mask_function

from reft_kernels.scout_attention import (
    checkpoint_attention,
    checkpoint_mask,
    checkpoint_visible,
    compact_index,
    is_checkpoint,
    masked_attention,
    sliding_window_mask,
)


def left_padded_positions(lengths, width):
    """Content positions and validity of left-padded rows (pads get position 0)."""
    valid = torch.zeros(len(lengths), width, dtype=torch.bool)
    for row, n in enumerate(lengths):
        valid[row, width - n:] = True
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    return positions, valid


def rule_checkpoint_mask(positions, valid, S):
    """SPEC §4 read literally: i sees itself and every real j with pos_j < pos_i, pos_j ≡ S−1 (mod S)."""
    b, t = positions.shape
    mask = torch.zeros(b, t, t, dtype=torch.bool)
    for r in range(b):
        for i in range(t):
            for j in range(t):
                pi, pj = int(positions[r, i]), int(positions[r, j])
                mask[r, i, j] = i == j or (bool(valid[r, i] and valid[r, j]) and pj < pi and pj % S == S - 1)
    return mask


def sdpa(q, k, v, allowed, scale):
    groups = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=scale)


@pytest.mark.parametrize("S", [1, 2, 3, 5])
def test_checkpoint_mask_is_the_rule(S):
    positions, valid = left_padded_positions([13, 7, 1], 13)
    assert torch.equal(checkpoint_mask(positions, valid, S), rule_checkpoint_mask(positions, valid, S))
    # tokens 0..S−1 attend to themselves only, and S = 1 is the causal mask over real tokens
    first = checkpoint_mask(positions, valid, S)[0, :S]
    assert torch.equal(first, torch.eye(13, dtype=torch.bool)[:S])
    if S == 1:
        causal = torch.tril(torch.ones(13, 13, dtype=torch.bool))
        assert torch.equal(checkpoint_mask(positions, valid, 1)[0], causal)


@pytest.mark.parametrize("w", [1, 2, 4, 6])
def test_sliding_window_mask_is_transformers_window_on_left_padded_rows(w):
    """transformers' (Mistral's) window is `kv_idx > q_idx − w` on indices, causal; for left-padded rows
    indices and content positions differ by a constant, so on real tokens the two masks agree."""
    lengths, width = [10, 6, 2], 10
    positions, valid = left_padded_positions(lengths, width)
    ours = sliding_window_mask(positions, valid, w)
    fn = sliding_window_causal_mask_function(w)
    for r in range(len(lengths)):
        for i in range(width):
            for j in range(width):
                if valid[r, i] and valid[r, j]:
                    assert bool(ours[r, i, j]) == bool(fn(r, 0, torch.tensor(i), torch.tensor(j))), (r, i, j)
    assert ours.sum(-1)[0].max() == min(w, width)  # w keys including the query itself


def test_compact_index_keeps_each_rows_entries_in_order():
    keep = torch.tensor([[0, 1, 0, 1, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    index, slot_valid = compact_index(keep, 3)
    assert index[0].tolist() == [1, 3, 4] and index[1, 0] == 0
    assert slot_valid.tolist() == [[True] * 3, [True, False, False], [False] * 3]
    with pytest.raises(ValueError, match="cannot place"):
        compact_index(keep, 2)


@pytest.mark.parametrize("S", [1, 2, 3, 4])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)])
def test_checkpoint_attention_equals_sdpa_with_the_boolean_mask(S, heads):
    torch.manual_seed(S)
    hq, hkv = heads
    lengths, width, d = [12, 8, 3], 12, 8
    positions, valid = left_padded_positions(lengths, width)
    q = torch.randn(3, hq, width, d, dtype=torch.float64)
    k, v = torch.randn(2, 3, hkv, width, d, dtype=torch.float64)
    scale = d**-0.5
    allowed = rule_checkpoint_mask(positions, valid, S)
    want = sdpa(q, k, v, allowed, scale)

    torch.testing.assert_close(masked_attention(q, k, v, allowed, scale), want, atol=1e-12, rtol=1e-12)
    # the path the model runs: gather each row's checkpoints, one softmax over {self} ∪ earlier checkpoints
    keep = is_checkpoint(positions, valid, S)
    index, slot_valid = compact_index(keep, -(-width // S))
    gather = index[:, None, :, None].expand(-1, hkv, -1, d)
    visible = checkpoint_visible(positions, valid, positions.gather(1, index), slot_valid)
    got = checkpoint_attention(q, k, v, k.gather(2, gather), v.gather(2, gather), visible, scale)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
