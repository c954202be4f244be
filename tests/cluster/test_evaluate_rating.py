"""The rating evaluation's pure parts against naive references: mean baselines, their smoothing selection."""

import numpy as np
import pyarrow as pa
import pytest

from cluster.evaluate_rating import STRENGTHS, mean_baselines, select_strength


def tables():
    train = pa.table({"user": [0, 1, 2], "items": [[1, 2, 3], [2, 3], [1, 1, 3]], "levels": [[5, 4, 1], [4, 2], [3, 5, 1]]})
    split = pa.table({"user": [0, 1, 2], "history": [[1, 2, 3], [2, 3], [1, 1, 3]], "history_levels": [[5, 4, 1], [4, 2], [3, 5, 1]],
                      "target": [2, 1, 4], "target_level": [4, 3, 2]})
    return train, split


def naive(train, split, num_levels, strength):
    levels = [v for row in train.column("levels").to_pylist() for v in row]
    items = [v for row in train.column("items").to_pylist() for v in row]
    prior = np.array([levels.count(r) for r in range(1, num_levels + 1)], dtype=float) / len(levels)
    out = {"global_mean": [], "user_mean": [], "item_mean": []}
    for history_levels, target in zip(split.column("history_levels").to_pylist(), split.column("target").to_pylist()):
        out["global_mean"].append(prior)
        for name, seen in (("user_mean", history_levels), ("item_mean", [l for i, l in zip(items, levels) if i == target])):
            counts = np.array([seen.count(r) for r in range(1, num_levels + 1)], dtype=float)
            out[name].append((counts + strength * prior) / (len(seen) + strength))
    return {k: np.array(v) for k, v in out.items()}


@pytest.mark.parametrize("strength", [0.5, 2.0])
def test_mean_baselines_are_smoothed_histograms_of_the_users_and_items_ratings(strength):
    train, split = tables()
    got = mean_baselines(train, split, num_items=5, num_levels=5, strength=strength)
    want = naive(train, split, 5, strength)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], err_msg=name)
        np.testing.assert_allclose(got[name].sum(axis=1), 1.0)
    assert (got["item_mean"][2] == got["global_mean"][2]).all()  # item 4 was never rated in training: the prior


def test_the_smoothing_strength_is_the_one_with_the_lowest_validation_nll():
    train, valid = tables()
    chosen = select_strength(train, valid, num_items=5, num_levels=5)
    true = valid.column("target_level").to_numpy() - 1
    for name in ("user_mean", "item_mean"):
        nll = {s: -np.log(mean_baselines(train, valid, 5, 5, s)[name][np.arange(3), true]).mean() for s in STRENGTHS}
        assert chosen[name] == min(nll, key=nll.get)
