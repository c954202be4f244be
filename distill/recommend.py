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
    catalog, mostly seen) gets all of them. Equal scores are ordered by item id; which of several items
    tied at the k-th score make the cut is left to ``torch.topk`` (exact ties of a model's float scores are
    rare; a ranking with many ties, such as popularity counts, is better ranked once with :func:`ranked_once`).
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
    # topk, not a full sort of the catalog: k of C columns (10 of 3,416 on ML-1M) is most of serving's ranking cost.
    values, items = torch.topk(masked, min(k, scores.shape[1]), dim=1)
    # Order ties by item id: sort by id, then stably by score.
    by_id = torch.sort(items, dim=1).indices
    items, values = items.gather(1, by_id), values.gather(1, by_id)
    by_score = torch.sort(values, dim=1, descending=True, stable=True).indices
    items, values = items.gather(1, by_score).tolist(), values.gather(1, by_score).tolist()
    rankable = (~excluded).sum(dim=1).clamp(max=k).tolist()
    return [(items[i][:n], values[i][:n]) for i, n in enumerate(rankable)]


def ranked_once(scores: torch.Tensor) -> torch.Tensor:
    """Every item of a fixed (C,) score vector (popularity counts, say), best first, ties by id; padding 0 left out."""
    order = torch.sort(scores[1:].float(), descending=True, stable=True).indices + 1
    return order
