"""Full-ranking metrics: HR@K and NDCG@K over the whole catalog.

Conventions (the protocol in shared/data/README.md):
- column 0 of a score matrix is the padding id and is never ranked;
- ties are counted pessimistically: every other item with the target's score
  ranks above it, so a constant scorer gets no credit;
- "seen-filtered" removes the user's history items (other than the target)
  from the ranking.

All functions are pure torch, batched, and work on any device.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def seen_mask(histories: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Boolean (B, C) mask of the items in each left-padded history (B, L); padding 0 is not marked."""
    mask = torch.zeros(histories.shape[0], num_classes, dtype=torch.bool, device=histories.device)
    mask.scatter_(1, histories.long(), True)
    mask[:, 0] = False
    return mask


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """0-based pessimistic rank of each target among the catalog.

    scores:  (B, C) float, column 0 = padding.
    targets: (B,) int in 1..C-1.
    exclude: optional (B, C) bool of items to drop from the ranking; the target is never dropped.
    Returns (B,) int64: the number of ranked items scoring >= the target, the target itself excluded.
    """
    scores = scores.float()
    targets = targets.long()
    candidates = torch.ones_like(scores, dtype=torch.bool)
    candidates[:, 0] = False
    if exclude is not None:
        candidates &= ~exclude
    candidates.scatter_(1, targets[:, None], False)  # the target does not outrank itself
    target_score = scores.gather(1, targets[:, None])
    return ((scores >= target_score) & candidates).sum(dim=1)


def hit_rate_at_k(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """(B,) 1.0 where the target is in the top k."""
    return (ranks < k).float()


def ndcg_at_k(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """(B,) 1/log2(rank+2) where the target is in the top k (one relevant item, so IDCG = 1)."""
    gains = 1.0 / torch.log2(ranks.double() + 2.0)
    return torch.where(ranks < k, gains, torch.zeros_like(gains)).float()


class RankingAccumulator:
    """Sums per-user HR@K / NDCG@K over batches; ``result()`` gives the means."""

    def __init__(self, ks: list[int] | tuple[int, ...]):
        self.ks = tuple(ks)
        self.count = 0
        self.sums = {f"{name}@{k}": 0.0 for k in self.ks for name in ("hr", "ndcg")}

    def add(self, ranks: torch.Tensor) -> None:
        self.count += int(ranks.numel())
        for k in self.ks:
            self.sums[f"hr@{k}"] += float(hit_rate_at_k(ranks, k).sum())
            self.sums[f"ndcg@{k}"] += float(ndcg_at_k(ranks, k).sum())

    def result(self) -> dict[str, float]:
        if self.count == 0:
            return {key: math.nan for key in self.sums}
        return {key: total / self.count for key, total in self.sums.items()}


def paired_bootstrap_gain(a: "np.ndarray", b: "np.ndarray", resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """Relative gain ``mean(a) / mean(b) - 1`` of two models scored on the same users, with a 95% interval.

    ``a`` and ``b`` are per-user metrics (e.g. NDCG@10) in the same user order. Users are
    resampled with replacement, the same users for both models (a paired bootstrap), so the
    interval reflects which users the test set happened to hold, not two independent draws.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"need two equal-length non-empty 1-D arrays, got shapes {a.shape} and {b.shape}")
    rng = np.random.default_rng(seed)
    # Resamples in chunks of at most ~4M picks: memory stays bounded whatever the number of users.
    chunk = max(1, min(resamples, (1 << 22) // a.size))
    gains = []
    for start in range(0, resamples, chunk):
        picks = rng.integers(0, a.size, size=(min(chunk, resamples - start), a.size))
        gains.append(a[picks].mean(axis=1) / np.maximum(b[picks].mean(axis=1), 1e-12) - 1.0)
    gains = np.concatenate(gains)
    low, high = np.quantile(gains, [0.025, 0.975])
    return {"gain": float(a.mean() / max(b.mean(), 1e-12) - 1.0), "ci95_low": float(low), "ci95_high": float(high),
            "p_gain_not_positive": float((gains <= 0).mean()), "resamples": resamples, "users": int(a.size)}


def paired_bootstrap_delta(a: "np.ndarray", b: "np.ndarray", statistic: str = "mean", resamples: int = 2000,
                           seed: int = 0) -> dict[str, float]:
    """``statistic(a) - statistic(b)`` of two models' per-example values on the same examples, with a paired
    bootstrap 95% interval (the same resampled examples for both). ``statistic``: "mean", or "rmse" (the
    square root of the mean, for per-example squared errors)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"need two equal-length non-empty 1-D arrays, got shapes {a.shape} and {b.shape}")
    if statistic not in ("mean", "rmse"):
        raise ValueError(f"statistic must be 'mean' or 'rmse', got {statistic!r}")
    f = (lambda x: np.sqrt(x)) if statistic == "rmse" else (lambda x: x)  # noqa: E731 (applied to means)
    rng = np.random.default_rng(seed)
    chunk = max(1, min(resamples, (1 << 22) // a.size))
    deltas = []
    for start in range(0, resamples, chunk):
        picks = rng.integers(0, a.size, size=(min(chunk, resamples - start), a.size))
        deltas.append(f(a[picks].mean(axis=1)) - f(b[picks].mean(axis=1)))
    deltas = np.concatenate(deltas)
    low, high = np.quantile(deltas, [0.025, 0.975])
    return {"delta": float(f(a.mean()) - f(b.mean())), "ci95_low": float(low), "ci95_high": float(high),
            "resamples": resamples, "examples": int(a.size)}


#: Popularity bands of the catalog by training interactions: "head" items hold the first half of them, "middle"
#: the next 30%, "tail" the last 20%. Where a teacher leads a small student, it is usually in the tail.
POPULARITY_BANDS = (("head", 0.5), ("middle", 0.8), ("tail", 1.0))
BANDS_CAPTION = "head items hold the first 50% of the training interactions, middle the next 30%, tail the last 20%"


def popularity_band(item_counts: "np.ndarray", bands=POPULARITY_BANDS) -> "np.ndarray":
    """The band index of every item id (``item_counts``: (num_items + 1,), [0] = padding, whose band is -1).

    Items are taken most frequent first (ties by id); an item is in the first band whose share of all
    interactions the items before it have not yet reached, so every band with a share holds at least one item.
    """
    counts = np.asarray(item_counts, dtype=np.int64)[1:]
    order = np.argsort(-counts, kind="stable")  # item ids - 1, most frequent first
    before = np.concatenate([[0], np.cumsum(counts[order])[:-1]]) / max(int(counts.sum()), 1)  # share ahead of each
    limits = np.array([share for _, share in bands], dtype=np.float64)
    band = np.empty(len(counts) + 1, dtype=np.int64)
    band[0] = -1
    band[order + 1] = np.minimum(np.searchsorted(limits, before, side="right"), len(limits) - 1)
    return band


def mean_by_band(values: "np.ndarray", band: "np.ndarray", bands=POPULARITY_BANDS) -> list[dict]:
    """The mean of per-user ``values`` over the users of each band (``band``: each user's index into ``bands``,
    e.g. :func:`popularity_band` of their target), with the users counted; empty bands are left out."""
    values, band = np.asarray(values, dtype=np.float64), np.asarray(band)
    out = []
    for index, (name, _) in enumerate(bands):
        users = band == index
        if users.any():
            out.append({"band": name, "users": int(users.sum()), "mean": float(values[users].mean())})
    return out
