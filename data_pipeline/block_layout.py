"""How big the Parquet files and row groups of a split or of the soft-label store should be.

The streaming reader (:mod:`data_pipeline.streaming`) reads whole row groups and deals
them into J virtual shards; step s takes about B / J rows from each. With too few row
groups (fewer than J, or a handful per virtual shard) some virtual shards run dry long
before others, and late steps get a fraction of the global batch B: the run then trains
with a smaller batch and more steps than configured. This module finds, for a given row
count, the largest row group (fewest, cheapest reads) whose deal still fills the batch.
Pure functions of counts: no I/O, so the run plan can decide before anything is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from data_pipeline.streaming import BlockRef, EpochPlan

#: Row-group sizes tried, largest first. 64 rows of sequences is a few hundred KB to a few MB.
ROW_GROUP_CANDIDATES = (64, 48, 32, 24, 16, 12, 8, 6, 4, 3, 2, 1)
#: A layout must give global batches of at least this share of the best possible deal.
MIN_FILL = 0.9
#: Epochs whose deal is checked (each epoch permutes the row groups anew).
CHECKED_EPOCHS = 3
#: The soft-label store is cut into about this many files (precompute's unit of work and of
#: resume), so that up to this many workers share the labelling; at most MAX_STORE_SHARD_ROWS each.
STORE_SHARDS = 16
MAX_STORE_SHARD_ROWS = 1024


@dataclass(frozen=True)
class Fill:
    """How well a layout fills the global batch: mean rows per step against the best possible."""

    mean_batch: float  # rows per step, averaged over the checked epochs' steps
    best_batch: float  # rows / ceil(rows / B)
    steps: int  # steps in epoch 0

    @property
    def ratio(self) -> float:
        return self.mean_batch / self.best_batch if self.best_batch else 1.0


def shard_row_groups(shard_rows: Sequence[int], row_group_size: int) -> list[int]:
    """Rows of every row group, in order, for files of ``shard_rows`` rows written with ``row_group_size``."""
    sizes = []
    for rows in shard_rows:
        full, rest = divmod(rows, row_group_size)
        sizes += [row_group_size] * full + ([rest] if rest else [])
    return sizes


def batch_fill(row_groups: Sequence[int], num_virtual_shards: int, global_batch_size: int, seed: int) -> Fill:
    """The reader's global batch on these row groups, over the first :data:`CHECKED_EPOCHS` epochs."""
    blocks = [BlockRef("", i, n, i) for i, n in enumerate(row_groups)]
    rows = sum(row_groups)
    if rows == 0:
        return Fill(0.0, 0.0, 0)
    plans = [EpochPlan(blocks, num_virtual_shards, global_batch_size, seed, epoch) for epoch in range(CHECKED_EPOCHS)]
    steps = sum(p.steps for p in plans)
    best = rows / math.ceil(rows / global_batch_size)
    return Fill(rows * len(plans) / steps, best, plans[0].steps)


def shard_sizes(num_rows: int, rows_per_shard: int) -> list[int]:
    """Rows per file when ``num_rows`` rows are cut into files of ``rows_per_shard``."""
    full, rest = divmod(num_rows, rows_per_shard)
    return [rows_per_shard] * full + ([rest] if rest else [])


def choose_row_group_size(
    shard_rows: Sequence[int], num_virtual_shards: int, global_batch_size: int, seed: int
) -> int:
    """The largest candidate row-group size whose deal fills at least :data:`MIN_FILL` of the batch.

    Falls back to 1 row per group (the finest deal possible) when none does, e.g. for a
    dataset with fewer rows than virtual shards, where the batch cannot be filled anyway.
    """
    for size in ROW_GROUP_CANDIDATES:
        fill = batch_fill(shard_row_groups(shard_rows, size), num_virtual_shards, global_batch_size, seed)
        if fill.ratio >= MIN_FILL:
            return size
    return 1


def choose_store_rows_per_shard(num_rows: int) -> int:
    """About :data:`STORE_SHARDS` files, each a multiple of 64 rows (whole row groups for most candidates),
    between 64 and :data:`MAX_STORE_SHARD_ROWS` rows."""
    per_shard = math.ceil(math.ceil(max(num_rows, 1) / STORE_SHARDS) / 64) * 64
    return min(max(per_shard, 64), MAX_STORE_SHARD_ROWS)
