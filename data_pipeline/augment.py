"""Perturbed copies of training sequences, for the teacher to label (teacher-labelled augmentation).

The data has one history per user; the teacher can label any history. Rows made here are
inputs the data does not have (cropped, thinned, locally reordered or partly substituted
histories, as in CL4SRec / CoSeRec's augmentations): ``precompute`` labels every position of
them and stores them beside the real rows, marked as augmented, with no hard target. A pure
function of its arguments: a resumed precompute remakes exactly the same rows.

The rating task's rows are (item, rating level) pairs: :func:`augment_rating_sequences` moves
each pair as one (an item keeps its rating when cropped, dropped or reordered; a substituted
pair is another training (item, level) pair, drawn by frequency).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from data_pipeline.config import AUGMENT_OPS


def _crop(seq: np.ndarray, rate: float, rng: np.random.Generator, cumulative: np.ndarray) -> np.ndarray:
    """A random contiguous window keeping between 1 - rate and all of the sequence."""
    keep = max(2, int(np.ceil(len(seq) * rng.uniform(1.0 - rate, 1.0))))
    start = int(rng.integers(0, len(seq) - keep + 1))
    return seq[start : start + keep]


def _mask(seq: np.ndarray, rate: float, rng: np.random.Generator, cumulative: np.ndarray) -> np.ndarray:
    """Drop a share ``rate`` of the items (the model has no mask token: a masked item is left out)."""
    drop = min(len(seq) - 2, int(round(len(seq) * rate)))
    if drop <= 0:
        return seq
    kept = np.sort(rng.choice(len(seq), size=len(seq) - drop, replace=False))
    return seq[kept]


def _reorder(seq: np.ndarray, rate: float, rng: np.random.Generator, cumulative: np.ndarray) -> np.ndarray:
    """Shuffle a random window of ``rate`` of the length (at least 2 items)."""
    width = min(len(seq), max(2, int(round(len(seq) * rate))))
    start = int(rng.integers(0, len(seq) - width + 1))
    out = seq.copy()
    out[start : start + width] = rng.permutation(out[start : start + width])
    return out


def _substitute(seq: np.ndarray, rate: float, rng: np.random.Generator, cumulative: np.ndarray) -> np.ndarray:
    """Replace a share ``rate`` of the items (at least 1) by items drawn by training popularity
    (``cumulative``: its running sum, normalised to end at 1)."""
    count = max(1, int(round(len(seq) * rate)))
    where = rng.choice(len(seq), size=count, replace=False)
    out = seq.copy()
    # What rng.choice(p=popularity) draws, without rebuilding the catalog-long running sum for every row.
    out[where] = cumulative.searchsorted(rng.random(count), side="right")
    return out


OPS = {"crop": _crop, "mask": _mask, "reorder": _reorder, "substitute": _substitute}
assert tuple(OPS) == AUGMENT_OPS  # the names the config accepts


def item_popularity(sequences: Sequence[np.ndarray], num_items: int) -> np.ndarray:
    """(num_items + 1,) probabilities of each id among the training items; id 0 (padding) has 0."""
    counts = np.bincount(np.concatenate(list(sequences)) if len(sequences) else np.zeros(0, np.int64),
                         minlength=num_items + 1).astype(np.float64)
    counts[0] = 0.0
    if counts.sum() == 0:
        counts[1:] = 1.0
    return counts / counts.sum()


def augment_sequences(
    sequences: Sequence[np.ndarray], num_items: int, count: int, ops: Sequence[str], rate: float, seed: int,
    max_len: int,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """``count`` perturbed copies of training sequences.

    Args:
        sequences: the training histories (item ids 1..num_items, oldest first, each >= 2 long).
        count: how many rows to make; source sequences are taken in a random order, cycling.
        ops: names from :data:`OPS`; each row gets one, drawn uniformly.
        rate: the share of a sequence an op changes, in (0, 1).
        seed: with the arguments above, fixes every row.
        max_len: rows are cut to their last ``max_len`` items (the teacher's window).

    Returns:
        ``(sources, rows)``: the index of each row's source sequence (count,) and the rows,
        each an int64 array of at least 2 ids in 1..num_items.
    """
    unknown = sorted(set(ops) - set(OPS))
    if unknown or not ops:
        raise ValueError(f"unknown augmentation ops {unknown or ops}; valid: {', '.join(OPS)}")
    if not 0 < rate < 1:
        raise ValueError(f"rate must be in (0, 1), got {rate}")
    usable = np.flatnonzero([len(s) >= 2 for s in sequences])
    if count <= 0 or len(usable) == 0:
        return np.zeros(0, np.int64), []
    rng = np.random.default_rng([seed, 0x5EED_A06])
    cumulative = np.cumsum(item_popularity(sequences, num_items))
    cumulative /= cumulative[-1]
    rounds = -(-count // len(usable))
    sources = np.concatenate([rng.permutation(usable) for _ in range(rounds)])[:count]
    chosen = rng.integers(0, len(ops), size=count)
    rows = []
    for source, op in zip(sources, chosen):
        seq = np.asarray(sequences[source], dtype=np.int64)[-max_len:]
        rows.append(OPS[ops[op]](seq, rate, rng, cumulative) if len(seq) >= 2 else seq)
    return sources.astype(np.int64), rows


def augment_rating_sequences(
    sequences: Sequence[tuple[np.ndarray, np.ndarray]], num_items: int, num_levels: int, count: int, ops: Sequence[str],
    rate: float, seed: int, max_len: int,
) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """:func:`augment_sequences` for the rating task: ``sequences`` are (items, levels 1..num_levels)
    pairs of arrays; the rows come back as such pairs, cut to their last ``max_len`` pairs.

    Each pair is coded as one id ``item * (num_levels + 1) + level``, so the ops move pairs whole and
    ``substitute`` draws real training pairs by their frequency."""
    base = num_levels + 1
    codes = [np.asarray(items, np.int64) * base + np.asarray(levels, np.int64) for items, levels in sequences]
    sources, rows = augment_sequences(codes, (num_items + 1) * base - 1, count, ops, rate, seed, max_len)
    return sources, [(row // base, row % base) for row in rows]
