import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from distill.evaluate import evaluate_split, evaluate_split_with_ranks, left_pad_list_array, per_user_ndcg, popularity_scorer
from distill.metrics import RankingAccumulator, hit_rate_at_k, ndcg_at_k, paired_bootstrap_gain, popularity_band, seen_mask, target_ranks


def brute_force_metrics(scores, targets, histories, k, filter_seen):
    """Reference: sort the catalog per user in Python, pessimistic ties."""
    hr, ndcg = [], []
    for row, target in enumerate(targets):
        seen = set(histories[row]) - {0, target} if filter_seen else set()
        t = scores[row][target]
        rank = sum(
            1 for item in range(1, len(scores[row])) if item != target and item not in seen and scores[row][item] >= t
        )
        hr.append(1.0 if rank < k else 0.0)
        ndcg.append(1.0 / math.log2(rank + 2) if rank < k else 0.0)
    return float(np.mean(hr)), float(np.mean(ndcg))


@pytest.mark.parametrize("filter_seen", [False, True])
@pytest.mark.parametrize("k", [1, 5, 10])
def test_matches_brute_force_with_ties(filter_seen, k):
    rng = np.random.default_rng(0)
    num_classes, batch = 40, 64
    # Integer scores in a small range create many ties.
    scores = rng.integers(0, 6, size=(batch, num_classes)).astype(np.float32)
    targets = rng.integers(1, num_classes, size=batch)
    histories = rng.integers(0, num_classes, size=(batch, 7))
    histories[:, 0] = targets  # the target in the history must not filter itself
    ranks = target_ranks(
        torch.from_numpy(scores),
        torch.from_numpy(targets),
        exclude=seen_mask(torch.from_numpy(histories), num_classes) if filter_seen else None,
    )
    ref_hr, ref_ndcg = brute_force_metrics(scores.tolist(), targets.tolist(), histories.tolist(), k, filter_seen)
    assert float(hit_rate_at_k(ranks, k).mean()) == pytest.approx(ref_hr)
    assert float(ndcg_at_k(ranks, k).mean()) == pytest.approx(ref_ndcg)


def test_constant_scorer_gets_no_credit():
    scores = torch.zeros(3, 11)
    ranks = target_ranks(scores, torch.tensor([1, 5, 10]))
    assert ranks.tolist() == [9, 9, 9]  # every other real item ties and counts above
    assert float(hit_rate_at_k(ranks, 9).sum()) == 0.0


def test_padding_column_is_never_ranked():
    scores = torch.tensor([[100.0, 1.0, 0.5]])
    assert target_ranks(scores, torch.tensor([1])).item() == 0


def test_perfect_and_known_ranks():
    scores = torch.tensor([[0.0, 0.1, 0.9, 0.5, 0.7]])
    assert target_ranks(scores, torch.tensor([2])).item() == 0
    assert target_ranks(scores, torch.tensor([3])).item() == 2
    ranks = torch.tensor([0, 2, 20])
    assert ndcg_at_k(ranks, 10).tolist() == pytest.approx([1.0, 0.5, 0.0])


def test_accumulator_empty_is_nan():
    acc = RankingAccumulator([10])
    assert math.isnan(acc.result()["hr@10"])


def test_left_pad_keeps_most_recent():
    arr = pa.array([[1, 2, 3], [4], []], type=pa.list_(pa.int32()))
    assert left_pad_list_array(arr).tolist() == [[1, 2, 3], [0, 0, 4], [0, 0, 0]]
    assert left_pad_list_array(arr, 2).tolist() == [[2, 3], [0, 4], [0, 0]]


def test_evaluate_split_batched_equals_single_batch_and_reference():
    rng = np.random.default_rng(1)
    num_items = 30
    histories = [rng.integers(1, num_items + 1, size=rng.integers(1, 9)).tolist() for _ in range(50)]
    targets = rng.integers(1, num_items + 1, size=50)
    table = pa.table({"history": pa.array(histories, type=pa.list_(pa.int32())), "target": pa.array(targets, pa.int32())})
    counts = rng.integers(0, 4, size=num_items + 1)
    counts[0] = 0
    scorer = popularity_scorer(counts)
    small = evaluate_split(scorer, table, num_items, ks=[5], batch_size=7)
    large = evaluate_split(scorer, table, num_items, ks=[5], batch_size=1000)
    assert small["unfiltered"] == pytest.approx(large["unfiltered"])
    assert {k: v for k, v in small.items() if k != "unfiltered"} == pytest.approx(
        {k: v for k, v in large.items() if k != "unfiltered"}
    )
    scores = np.tile(counts.astype(np.float32), (50, 1))
    ref = brute_force_metrics(scores.tolist(), targets.tolist(), histories, 5, True)
    assert (small["hr@5"], small["ndcg@5"]) == pytest.approx(ref)
    ref_unf = brute_force_metrics(scores.tolist(), targets.tolist(), histories, 5, False)
    assert (large["unfiltered"]["hr@5"], large["unfiltered"]["ndcg@5"]) == pytest.approx(ref_unf)
    assert small["num_users"] == 50


def test_per_user_ndcg_averages_to_evaluate_split():
    rng = np.random.default_rng(2)
    num_items = 25
    histories = [rng.integers(1, num_items + 1, size=rng.integers(1, 7)).tolist() for _ in range(40)]
    table = pa.table({"history": pa.array(histories, type=pa.list_(pa.int32())),
                      "target": pa.array(rng.integers(1, num_items + 1, size=40), pa.int32())})
    counts = rng.integers(0, 5, size=num_items + 1)
    counts[0] = 0
    scorer = popularity_scorer(counts)
    per_user = per_user_ndcg(scorer, table, num_items, k=10, batch_size=6)
    assert per_user.shape == (40,)
    assert per_user.mean() == pytest.approx(evaluate_split(scorer, table, num_items, ks=[10])["ndcg@10"])
    # The same pass can give the per-user ranks too: the same metrics, and the same per-user NDCG@10.
    metrics, ranks = evaluate_split_with_ranks(scorer, table, num_items, ks=[10], batch_size=6)
    assert metrics == evaluate_split(scorer, table, num_items, ks=[10], batch_size=6)
    np.testing.assert_array_equal(ndcg_at_k(ranks, 10).numpy(), per_user)


def test_paired_bootstrap_gain():
    rng = np.random.default_rng(0)
    b = rng.random(500)
    same = paired_bootstrap_gain(b, b)
    assert same["gain"] == 0 and same["ci95_low"] == 0 and same["ci95_high"] == 0
    doubled = paired_bootstrap_gain(2 * b, b)
    assert doubled["gain"] == pytest.approx(1.0) and doubled["ci95_low"] == pytest.approx(1.0)
    # A small, consistent per-user lead is resolved; the same lead on noisy users is not.
    better = paired_bootstrap_gain(b + 0.05, b)
    assert better["ci95_low"] > 0 and better["p_gain_not_positive"] == 0
    noisy = paired_bootstrap_gain(b + 0.01 * rng.standard_normal(500) * 40, b)
    assert noisy["ci95_low"] < 0 < noisy["ci95_high"]
    assert paired_bootstrap_gain(b, b[::-1], seed=3) == paired_bootstrap_gain(b, b[::-1], seed=3)
    with pytest.raises(ValueError, match="equal-length"):
        paired_bootstrap_gain(b, b[:10])


def test_paired_bootstrap_gain_on_many_users_resamples_in_chunks():
    rng = np.random.default_rng(3)
    b = rng.uniform(0, 1, 9000)
    a = b * 1.1
    out = paired_bootstrap_gain(a, b, resamples=1000)
    assert out["resamples"] == 1000 and out["ci95_low"] <= out["gain"] <= out["ci95_high"]
    assert abs(out["gain"] - 0.1) < 1e-9 and out["ci95_high"] - out["ci95_low"] < 1e-9  # a is exactly 1.1 b


def test_paired_bootstrap_delta_of_means_and_of_rmse():
    from distill.metrics import paired_bootstrap_delta

    rng = np.random.default_rng(0)
    b = rng.uniform(0, 2, 400)
    a = b - 0.3 + rng.normal(0, 0.05, 400)  # a is reliably lower
    d = paired_bootstrap_delta(a, b)
    assert d["delta"] == pytest.approx(a.mean() - b.mean())
    assert d["ci95_low"] <= d["delta"] <= d["ci95_high"] < 0
    r = paired_bootstrap_delta(a**2, b**2, "rmse")
    assert r["delta"] == pytest.approx(np.sqrt((a**2).mean()) - np.sqrt((b**2).mean()))
    same = paired_bootstrap_delta(b, b)
    assert same["delta"] == same["ci95_low"] == same["ci95_high"] == 0  # paired: identical models never differ
    with pytest.raises(ValueError, match="statistic"):
        paired_bootstrap_delta(a, b, "median")


def test_popularity_band_splits_the_catalog_by_the_share_of_interactions_ahead_of_each_item():
    rng = np.random.default_rng(0)
    counts = np.concatenate([[0], rng.zipf(1.5, size=500).clip(max=10_000)])
    band = popularity_band(counts)
    # Naive reference: walk the items most frequent first, summing the interactions seen so far.
    total, ahead, expected = counts.sum(), 0, np.full(len(counts), -1)
    for item in sorted(range(1, len(counts)), key=lambda i: (-counts[i], i)):
        share = ahead / total
        expected[item] = 0 if share < 0.5 else 1 if share < 0.8 else 2
        ahead += counts[item]
    np.testing.assert_array_equal(band, expected)
    # The head holds at least half of the interactions, the head and middle at least 80%; every band is used.
    assert counts[band == 0].sum() >= 0.5 * total and counts[band <= 1].sum() >= 0.8 * total
    assert set(band[1:]) == {0, 1, 2}
    # One item with every interaction is the whole head; the rest (no interactions) are the tail.
    assert popularity_band(np.array([0, 0, 7, 0])).tolist() == [-1, 2, 0, 2]
