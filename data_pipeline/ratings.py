"""The rating task's data: rating levels, the rating columns of the split tables, a synthetic rated log.

With ``task: rating`` a prepared dataset keeps each interaction's rating as a *level*: the data's
distinct rating values sorted (``rating_values`` in the manifest, e.g. 1.0..5.0) and numbered
``1..R`` (0 is padding, as for items). The split tables gain, beside their item lists:

    train   levels: list<int8>           the rating of each training item
    valid   history_levels: list<int8>,  target_level: int8
    test    history_levels: list<int8>,  target_level: int8

The leave-one-out split is the next-item task's, unchanged: a user's last rating is the test
example, the one before it the validation example.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from data_pipeline.ingest import DataError

MAX_LEVELS = 20  # more distinct values than this is not a rating scale (a score or a price?)


def rating_levels(ratings: pa.ChunkedArray | pa.Array, source: str, fmt: str) -> tuple[list[float], np.ndarray]:
    """(the distinct rating values sorted, each row's level 1..R). Refuses data without ratings, with the fix."""
    if isinstance(ratings, pa.ChunkedArray):
        ratings = ratings.combine_chunks()
    if len(ratings) and ratings.null_count == len(ratings):
        raise DataError(
            f"{source}: the rating task needs ratings, and this data ({fmt}) has none; use a format with a rating "
            "column (movielens_udata, movielens_dat, or csv/parquet with data.columns.rating), or run.task=next_item")
    if ratings.null_count:
        missing = int(np.flatnonzero(ratings.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{source}: {ratings.null_count} interactions have no rating (the first is row {missing + 1}); "
                        "the rating task needs one for every interaction")
    values = ratings.to_numpy()
    distinct = np.unique(values)
    if len(distinct) < 2:
        raise DataError(f"{source}: every rating is {distinct[0] if len(distinct) else 'absent'}: nothing to predict")
    if len(distinct) > MAX_LEVELS:
        raise DataError(f"{source}: {len(distinct)} distinct rating values (at most {MAX_LEVELS}): the rating task predicts "
                        "a distribution over a rating scale such as 1..5 stars")
    return [float(v) for v in distinct], (np.searchsorted(distinct, values) + 1).astype(np.int8)


def update_fingerprint(h: "hashlib._Hash", levels: np.ndarray, values: list[float]) -> None:
    """Mix the ratings into a dataset fingerprint: the same items with other ratings are another dataset."""
    h.update(b"ratings")
    h.update(np.asarray(values, dtype="<f8").tobytes())
    h.update(levels.astype("<i1").tobytes())


def rating_columns(lengths: np.ndarray, levels: np.ndarray) -> dict[str, dict[str, pa.Array]]:
    """The columns each split table gains, from the time-ordered levels of every user's sequence (``lengths``)."""
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    remaining = np.repeat(lengths, lengths) - (np.arange(len(levels)) - np.repeat(starts, lengths))

    def lists(mask: np.ndarray, per_user: np.ndarray) -> pa.Array:
        offsets = np.concatenate([[0], np.cumsum(per_user)]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(levels[mask], type=pa.int8()))

    train = lists(remaining > 2, lengths - 2)
    return {
        "train": {"levels": train},
        "valid": {"history_levels": train, "target_level": pa.array(levels[remaining == 2], type=pa.int8())},
        "test": {"history_levels": lists(remaining > 1, lengths - 1), "target_level": pa.array(levels[remaining == 1], type=pa.int8())},
    }


def synthetic_ratings(users: np.ndarray, items: np.ndarray, clusters: np.ndarray, seed: int) -> np.ndarray:
    """1..5 star ratings with structure a sequence model can learn and a mean cannot: each user has a taste for each
    item cluster (revealed by their earlier ratings of that cluster), plus a user and an item bias and noise.

    ``users``, ``items``, ``clusters``: each interaction's user index, item index and the item's cluster."""
    rng = np.random.default_rng([seed, 7])
    taste = rng.normal(0.0, 1.0, size=(int(users.max()) + 1, int(clusters.max()) + 1))
    user_bias = rng.normal(0.0, 0.4, size=int(users.max()) + 1)
    item_bias = rng.normal(0.0, 0.4, size=int(items.max()) + 1)
    score = 3.4 + user_bias[users] + item_bias[items] + taste[users, clusters] + rng.normal(0.0, 0.5, size=len(users))
    return np.clip(np.rint(score), 1, 5)
