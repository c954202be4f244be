"""Top-k recommendations from a score matrix: what a served model answers.

The same conventions as the offline metrics (:mod:`distill.metrics`): column 0 is padding and
never recommended; "seen-filtered" removes the items of the user's history. The offline
evaluation ranks the target among these same scores, so a served top-k is the evaluation's
ranking cut at k.
"""

from __future__ import annotations

import torch

from distill.metrics import seen_mask


def top_k_items(
    scores: torch.Tensor, histories: torch.Tensor, k: int, filter_seen: torch.Tensor | bool = True
) -> list[tuple[list[int], list[float]]]:
    """The ``k`` best items of each row and their scores, best first.

    scores:      (B, C) float, column 0 = padding.
    histories:   (B, L) int, left-padded with 0 (the full history: the seen filter uses all of it).
    filter_seen: a bool for every row, or (B,) bool per row.
    Returns one ``(item ids, scores)`` per row; a row with fewer than ``k`` rankable items (a small
    catalog, mostly seen) gets all of them. Ties keep the lower item id first.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    scores = scores.float()
    excluded = torch.zeros_like(scores, dtype=torch.bool)
    excluded[:, 0] = True
    per_row = torch.as_tensor(filter_seen, dtype=torch.bool, device=scores.device).expand(scores.shape[0])
    if per_row.any():
        excluded |= seen_mask(histories, scores.shape[1]) & per_row[:, None]
    masked = scores.masked_fill(excluded, float("-inf"))
    # A stable descending sort: equal scores keep id order (torch.topk's order among ties is unspecified).
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, :k]
    best = masked.gather(1, order)
    rankable = (~excluded).sum(dim=1).clamp(max=k).tolist()
    return [(order[i, :n].tolist(), best[i, :n].tolist()) for i, n in enumerate(rankable)]
