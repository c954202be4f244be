"""bench.rating_feature_probe's pieces against hand computations, on a few hand-made ratings (no real data)."""

from __future__ import annotations

import numpy as np
import pytest

from bench.rating_feature_probe import Statistics, position_from_end, ridge, SHRINK


def test_position_from_end_counts_back_within_each_user():
    users = np.array([1, 1, 1, 2, 3, 3])
    assert position_from_end(users).tolist() == [2, 1, 0, 0, 1, 0]


def test_statistics_are_shrunk_mean_offsets():
    genres = {10: np.eye(19)[0], 20: np.eye(19)[1]}
    rows = np.array([[1, 10, 5, 0], [1, 20, 3, 1], [2, 10, 4, 2]])  # user, item, rating, time
    stats = Statistics(rows, genres)
    mean = 4.0
    assert stats.user[1] == pytest.approx((5 - mean + 3 - mean) / (2 + SHRINK))
    assert stats.user[2] == pytest.approx((4 - mean) / (1 + SHRINK))
    item10 = ((5 - mean - stats.user[1]) + (4 - mean - stats.user[2])) / (2 + SHRINK)
    assert stats.item[10] == pytest.approx(item10)
    assert stats.count == {10: 2, 20: 1}
    residual = 5 - mean - stats.user[1] - stats.item[10]
    assert stats.affinity[1][0] == pytest.approx(residual / (1 + SHRINK))


def test_ridge_leaves_the_intercept_unshrunk():
    x = np.column_stack([np.ones(50), np.linspace(-1, 1, 50)])
    y = 3.0 + 0.0 * x[:, 1]
    w = ridge(x, y, strength=1e6)
    assert w[0] == pytest.approx(3.0) and abs(w[1]) < 1e-6
