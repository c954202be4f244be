"""top_k_items against a naive reference: sort each row by hand."""

from __future__ import annotations

import pytest
import torch

from distill.recommend import top_k_items


def naive_top_k(scores, history, k, filter_seen):
    seen = {int(i) for i in history if i != 0} if filter_seen else set()
    ranked = sorted((i for i in range(1, len(scores)) if i not in seen), key=lambda i: (-float(scores[i]), i))
    return ranked[:k], [float(scores[i]) for i in ranked[:k]]


def test_matches_a_naive_sort_with_per_row_seen_filter():
    torch.manual_seed(0)
    scores = torch.randn(6, 40)
    scores[2, 5:9] = 1.5  # ties: the lower id first
    histories = torch.tensor([[0, 0, 3, 4], [1, 2, 3, 4], [0, 0, 0, 6], [0, 0, 0, 0], [9, 9, 9, 9], [39, 1, 2, 38]])
    filter_seen = torch.tensor([True, False, True, True, True, False])
    got = top_k_items(scores, histories, 10, filter_seen)
    for row in range(6):
        items, values = naive_top_k(scores[row], histories[row].tolist(), 10, bool(filter_seen[row]))
        assert got[row][0] == items
        assert got[row][1] == pytest.approx(values)


def test_padding_is_never_recommended_and_small_catalogs_return_what_is_left():
    scores = torch.tensor([[100.0, 1.0, 2.0, 3.0]])  # column 0 (padding) scores highest
    (items, values), = top_k_items(scores, torch.tensor([[0, 3]]), 10, True)
    assert items == [2, 1] and values == [2.0, 1.0]
    (items, _), = top_k_items(scores, torch.tensor([[1, 2, 3]]), 5, True)  # everything seen
    assert items == []
    (items, _), = top_k_items(scores, torch.tensor([[1, 2, 3]]), 2, False)
    assert items == [3, 2]


def test_k_must_be_positive():
    with pytest.raises(ValueError, match="k must be at least 1"):
        top_k_items(torch.zeros(1, 3), torch.zeros(1, 1, dtype=torch.long), 0)
