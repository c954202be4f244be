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
