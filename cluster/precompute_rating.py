"""``precompute`` for the rating task (``run.task=rating``): the teacher's whole distribution over the
rating levels at every training position, into a rating store
(:func:`data_pipeline.soft_labels.rating_store_schema`).

The work is planned, dealt to ranks, run in lockstep and committed exactly as for the next-item
task (:mod:`cluster.precompute`); only what the teacher computes and what a row holds differ,
which is this module's :class:`RatingLabeller`. A row is one user's most recent ``max_len + 1``
training (item, rating) pairs; its positions are every pair but the first. With
``precompute.augment`` perturbed copies of those rows follow (:func:`data_pipeline.augment.augment_rating_sequences`),
marked as augmented: the teacher labels them like the others, and the student's hard-label loss
skips them (their levels are history features, not targets).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import torch

from data_pipeline import soft_labels as store
from data_pipeline.augment import augment_rating_sequences
from distill.rating_training import rating_sequences_with_users
from distill.sequences import left_pad


@dataclass
class RatingRows:
    users: np.ndarray  # (R,)
    items: list[np.ndarray]  # whole sequences, oldest first
    levels: list[np.ndarray]  # their rating levels 1..num_levels
    num_real: int  # rows 0..num_real-1 are training sequences, the rest augmented
    augmented_rows: bool = False  # the store has the augmented column (augmentation on, even if it made 0 rows)

    @property
    def positions(self) -> np.ndarray:
        return np.fromiter((len(s) - 1 for s in self.items), dtype=np.int64, count=len(self.items))

    @property
    def augmented(self) -> Optional[np.ndarray]:
        return (np.arange(len(self.items)) >= self.num_real) if self.augmented_rows else None


def rating_rows(train: pa.Table, max_len: int, augment=None, num_items: int = 0, num_levels: int = 0, seed: int = 0) -> RatingRows:
    """Each user's training pairs, then ``augment.ratio`` perturbed copies per sequence when augmentation is on."""
    users, sequences = rating_sequences_with_users(train, max_len)
    items, levels = [s for s, _ in sequences], [v for _, v in sequences]
    if augment is None or augment.ratio == 0:
        return RatingRows(users, items, levels, len(sequences))
    sources, rows = augment_rating_sequences(sequences, num_items, num_levels, round(augment.ratio * len(sequences)),
                                             augment.ops, augment.rate, seed, max_len + 1)
    return RatingRows(np.concatenate([users, users[sources]]), items + [s for s, _ in rows], levels + [v for _, v in rows],
                      len(sequences), True)


class RatingLabeller:
    """The rating task's labeller for :func:`cluster.precompute.run_precompute`."""

    def __init__(self, teacher, rows: RatingRows, spec: store.StoreSpec):
        if teacher.meta.get("rating_values") is None:
            raise ValueError("the rating task's precompute needs a rating teacher; this export is a next-item model")
        self.teacher, self.rows, self.spec = teacher, rows, spec

    def dummy_forward(self) -> None:
        ones = torch.ones(1, 2, dtype=torch.long)
        self.teacher.rating_log_probs(ones, ones)

    def forward(self, batch_rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(self.rows.items[i]) for i in batch_rows)
        items = left_pad([self.rows.items[i] for i in batch_rows], width)
        levels = left_pad([self.rows.levels[i] for i in batch_rows], width)
        return self.teacher.rating_log_probs(items, levels).cpu(), items

    def outputs(self, forward: tuple[torch.Tensor, torch.Tensor], generator) -> tuple[list[np.ndarray], int]:
        """Per row of the batch, (n, R) log-probabilities of its positions; and the batch's positions."""
        log_probs, items = forward
        valid = (items[:, :-1] != 0) & (items[:, 1:] != 0)  # left-padded: each row's positions, in order
        return [a.numpy() for a in torch.split(log_probs[valid], valid.sum(dim=1).tolist())], int(valid.sum())

    def encode(self, shard) -> pa.Table:
        rows, r = shard.plan.seq_indices, self.rows
        return store.encode_rating_rows(
            self.spec, seq_index=rows, users=r.users[rows], example_start=shard.plan.example_start,
            inputs=[r.items[i][:-1] for i in rows], targets=[r.items[i][1:] for i in rows],
            input_levels=[r.levels[i][:-1] for i in rows], target_levels=[r.levels[i][1:] for i in rows],
            log_probs=[a for batch in shard.batches for a in batch], shard_name=store.shard_name(shard.plan.index),
            augmented=None if r.augmented is None else r.augmented[rows])
