"""Turn variable-length item histories into the model's left-padded input tensors.

Left padding puts every sequence's most recent item in the last column, which is where
:meth:`distill.model.SequentialRecommender.last_hidden` reads it. Sequences longer than
``max_len`` keep their most recent ``max_len`` items. Item ids must be >= 1: 0 is the
padding id, and a 0 inside a sequence would silently be treated as padding, so it is an
error here.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

Seqs = Sequence[Sequence[int] | np.ndarray]


def left_pad_flat(values: np.ndarray, offsets: np.ndarray, width: int, allow_zero: bool = False) -> np.ndarray:
    """Left-pad B sequences given flat (Arrow list layout) into (B, width) int64, keeping the last ``width`` items.

    Sequence b is ``values[offsets[b]:offsets[b + 1]]`` (``offsets`` has B + 1 entries).
    Ids must be >= 1 unless ``allow_zero`` (targets of augmented rows: 0 = no hard target).
    One vectorised scatter, no per-row Python: the student's batch decode runs beside the
    training step, where per-row loops would hold the GIL.

    >>> left_pad_flat(np.array([1, 2, 3, 4]), np.array([0, 3, 4, 4]), 2).tolist()
    [[2, 3], [0, 4], [0, 0]]
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.diff(offsets)
    out = np.zeros((len(lengths), width), dtype=np.int64)
    if len(values) == 0 or len(lengths) == 0:
        return out
    # Element k of row b (k from 0) goes to column width - len_b + k; columns < 0 are older than the window.
    rows = np.repeat(np.arange(len(lengths)), lengths)
    cols = np.arange(offsets[0], offsets[-1]) - offsets[:-1][rows] + (width - lengths)[rows]
    kept = cols >= 0
    flat = np.asarray(values)[offsets[0] : offsets[-1]][kept].astype(np.int64, copy=False)
    if len(flat) and flat.min() < (0 if allow_zero else 1):
        raise ValueError(f"item ids must be >= 1 (0 is padding), found {int(flat.min())}")
    out[rows[kept], cols[kept]] = flat
    return out


def _pad_tails(tails: list[np.ndarray], max_len: int) -> torch.Tensor:
    """Right-align already-truncated 1-D arrays (each of length <= max_len) into (B, max_len)."""
    lengths = np.fromiter((len(t) for t in tails), dtype=np.int64, count=len(tails))
    flat = np.concatenate(tails) if lengths.sum() else np.zeros(0, dtype=np.int64)
    return torch.from_numpy(left_pad_flat(flat, np.concatenate([[0], np.cumsum(lengths)]), max_len))


def left_pad(seqs: Seqs, max_len: int) -> torch.Tensor:
    """Left-pad item sequences with 0, keeping the most recent ``max_len`` items.

    Args:
        seqs: B sequences of item ids (lists or 1-D integer arrays), oldest first.
        max_len: output width.

    Returns:
        (B, max_len) int64 tensor; row b ends with ``seqs[b][-max_len:]``.

    >>> left_pad([[1, 2, 3], [4]], 2).tolist()
    [[2, 3], [0, 4]]
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    return _pad_tails([np.asarray(s)[-max_len:] for s in seqs], max_len)


def next_item_batch(seqs: Seqs, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forcing pairs for next-item training.

    For a sequence s of length n >= 2, inputs are ``s[:-1]`` and targets ``s[1:]``
    (target at position t is the item that followed input t), both left-padded to
    ``max_len`` keeping the most recent positions. Target 0 means "no target, ignore".

    Args:
        seqs: B sequences of item ids, each of length >= 2, oldest first.
        max_len: output width.

    Returns:
        (inputs, targets), each (B, max_len) int64, aligned position by position.

    >>> [t.tolist() for t in next_item_batch([[1, 2, 3]], 4)]
    [[[0, 0, 1, 2]], [[0, 0, 2, 3]]]
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    arrays = [np.asarray(s) for s in seqs]
    for b, a in enumerate(arrays):
        if len(a) < 2:
            raise ValueError(f"sequence {b} has {len(a)} item(s); next-item training needs at least 2")
    inputs = _pad_tails([a[:-1][-max_len:] for a in arrays], max_len)
    targets = _pad_tails([a[1:][-max_len:] for a in arrays], max_len)
    return inputs, targets
