"""Batched full-ranking evaluation of any scorer over a leave-one-out split.

A *scorer* is a callable ``(histories (B, L) int64, left-padded) -> scores (B, C)``
with C = num_items + 1 (column 0 = padding). The histories handed to it are the
users' full histories; a model that reads at most ``max_len`` items keeps the
last ``max_len`` columns itself. The seen-item filter always uses the full history.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import torch

from distill.metrics import RankingAccumulator, ndcg_at_k, seen_mask, target_ranks
from distill.sequences import left_pad_flat

Scorer = Callable[[torch.Tensor], torch.Tensor]


def left_pad_list_array(lists: pa.Array, length: int | None = None) -> np.ndarray:
    """A pyarrow list<int> array -> (B, length) int64, left-padded with 0, keeping the last items."""
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    offsets = lists.offsets.to_numpy()
    width = int(np.diff(offsets).max(initial=0)) if length is None else length
    # .values (not flatten()) is the whole child array: left_pad_flat follows the (possibly sliced) offsets.
    return left_pad_flat(lists.values.to_numpy(zero_copy_only=False), offsets, max(width, 1))


def evaluate_split(
    scorer: Scorer,
    split: pa.Table,
    num_items: int,
    ks: list[int] | tuple[int, ...] = (10, 20),
    batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> dict:
    """HR@K / NDCG@K of ``scorer`` on a valid/test table (columns ``history``, ``target``).

    Returns the seen-filtered metrics at the top level (the headline numbers) and
    the unfiltered ones under ``"unfiltered"``.
    """
    return evaluate_split_with_ranks(scorer, split, num_items, ks, batch_size, device)[0]


def evaluate_split_with_ranks(
    scorer: Scorer,
    split: pa.Table,
    num_items: int,
    ks: list[int] | tuple[int, ...] = (10, 20),
    batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> tuple[dict, torch.Tensor]:
    """:func:`evaluate_split`, and the seen-filtered rank of every row's target in row order (on the CPU), from
    the same pass: per-user metrics (``ndcg_at_k(ranks, k)``, as :func:`per_user_ndcg`) without scoring again."""
    filtered, unfiltered = RankingAccumulator(ks), RankingAccumulator(ks)
    ranks = []
    for histories, targets, scores in _scored_batches(scorer, split, num_items, batch_size, device):
        unfiltered.add(target_ranks(scores, targets).cpu())
        ranks.append(target_ranks(scores, targets, exclude=seen_mask(histories, num_items + 1)).cpu())
        filtered.add(ranks[-1])
    result = filtered.result()
    result["unfiltered"] = unfiltered.result()
    result["num_users"] = filtered.count
    return result, torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)


def per_user_ndcg(
    scorer: Scorer, split: pa.Table, num_items: int, k: int = 10, batch_size: int = 512, device: torch.device | str = "cpu"
) -> np.ndarray:
    """Seen-filtered NDCG@k of every row of ``split``, in row order (for paired comparisons of two models)."""
    out = [
        ndcg_at_k(target_ranks(scores, targets, exclude=seen_mask(histories, num_items + 1)), k).cpu().numpy()
        for histories, targets, scores in _scored_batches(scorer, split, num_items, batch_size, device)
    ]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def _scored_batches(
    scorer: Scorer, split: pa.Table, num_items: int, batch_size: int, device: torch.device | str
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(histories, targets, scores)`` for consecutive row batches of a valid/test table, scores checked for shape."""
    num_classes = num_items + 1
    for start in range(0, split.num_rows, batch_size):
        chunk = split.slice(start, batch_size)
        histories = torch.from_numpy(left_pad_list_array(chunk.column("history"))).to(device)
        targets = torch.from_numpy(chunk.column("target").to_numpy().astype(np.int64)).to(device)
        with torch.no_grad():
            scores = scorer(histories).float()
        if scores.shape != (histories.shape[0], num_classes):
            raise ValueError(f"scorer returned shape {tuple(scores.shape)}, expected {(histories.shape[0], num_classes)}")
        yield histories, targets, scores


def popularity_scorer(item_counts: np.ndarray) -> Scorer:
    """Scores every user by training-set popularity; ``item_counts`` has shape (C,), index 0 = padding."""
    counts = torch.as_tensor(np.asarray(item_counts), dtype=torch.float32)

    def score(histories: torch.Tensor) -> torch.Tensor:
        return counts.to(histories.device).expand(histories.shape[0], -1)

    return score


def model_scorer(model: torch.nn.Module, max_len: int) -> Scorer:
    """Scores of a :class:`~distill.model.SequentialRecommender` from its last ``max_len`` history items."""
    model.eval()

    def score(histories: torch.Tensor) -> torch.Tensor:
        return model.score_last(histories[:, -max_len:])

    return score


def latency_per_batch(scorer: Scorer, histories: torch.Tensor, repeats: int = 20, warmup: int = 3) -> dict[str, float]:
    """Wall time of one scorer call on a batch of requests (e.g. 256 users): p50 and p99 in ms."""
    import time

    with torch.no_grad():
        for _ in range(warmup):
            scorer(histories)
        times = []
        for _ in range(repeats):
            if histories.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            scorer(histories)
            if histories.is_cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1000)
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99)), "batch": int(histories.shape[0])}
