"""Left padding and next-item (input, target) construction."""

import numpy as np
import pytest
import torch

from distill.sequences import left_pad, next_item_batch


def test_left_pad_right_aligns_and_truncates_to_the_most_recent():
    out = left_pad([[1, 2, 3], [4], np.array([5, 6, 7, 8, 9]), []], 4)
    assert out.dtype == torch.long
    assert out.tolist() == [[0, 1, 2, 3], [0, 0, 0, 4], [6, 7, 8, 9], [0, 0, 0, 0]]


def test_left_pad_matches_a_plain_loop():
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 50, size=rng.integers(0, 15)) for _ in range(40)]
    expected = torch.zeros(40, 10, dtype=torch.long)
    for b, s in enumerate(seqs):
        tail = s[-10:]
        if len(tail):
            expected[b, 10 - len(tail):] = torch.from_numpy(tail)
    assert torch.equal(left_pad(seqs, 10), expected)


def test_left_pad_edge_cases():
    assert left_pad([], 3).shape == (0, 3)
    with pytest.raises(ValueError, match="padding"):
        left_pad([[1, 0, 2]], 3)
    with pytest.raises(ValueError, match="max_len"):
        left_pad([[1]], 0)


def test_next_item_batch_shifts_by_one():
    inputs, targets = next_item_batch([[1, 2, 3], [7, 8]], 4)
    assert inputs.tolist() == [[0, 0, 1, 2], [0, 0, 0, 7]]
    assert targets.tolist() == [[0, 0, 2, 3], [0, 0, 0, 8]]


def test_next_item_batch_keeps_the_most_recent_positions():
    inputs, targets = next_item_batch([np.arange(1, 11)], 3)  # 1..10
    assert inputs.tolist() == [[7, 8, 9]]
    assert targets.tolist() == [[8, 9, 10]]
    # Every real input has a target and vice versa.
    assert torch.equal(inputs != 0, targets != 0)


def test_next_item_batch_rejects_too_short_sequences():
    with pytest.raises(ValueError, match="at least 2"):
        next_item_batch([[1, 2], [3]], 4)
