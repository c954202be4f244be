"""Sizing row groups so the streaming reader's deal fills the global batch (data_pipeline.block_layout)."""

from __future__ import annotations

import math

import pytest

from data_pipeline import block_layout as bl
from data_pipeline.streaming import BlockRef, EpochPlan


def _naive_fill(groups, J, B, seed, epochs=bl.CHECKED_EPOCHS):
    """Mean rows per step from the reader's plan step by step (global_rows), against rows / ceil(rows / B)."""
    blocks = [BlockRef("f", i, n, i) for i, n in enumerate(groups)]
    per_step = [EpochPlan(blocks, J, B, seed, e).global_rows(s) for e in range(epochs) for s in range(EpochPlan(blocks, J, B, seed, e).steps)]
    rows = sum(groups)
    return (sum(per_step) / len(per_step)) / (rows / math.ceil(rows / B))


def test_shard_row_groups_cuts_each_file_separately():
    assert bl.shard_row_groups([10, 7], 4) == [4, 4, 2, 4, 3]
    assert bl.shard_row_groups([8], 8) == [8]
    assert bl.shard_sizes(10, 4) == [4, 4, 2] and bl.shard_sizes(8, 4) == [4, 4]


@pytest.mark.parametrize("groups,J,B", [([64] * 4 + [8], 16, 128), ([16] * 13, 16, 128), ([64] * 95, 16, 16), ([3, 5, 7, 1], 2, 4)])
def test_batch_fill_matches_the_step_by_step_reference(groups, J, B):
    assert bl.batch_fill(groups, J, B, seed=0).ratio == pytest.approx(_naive_fill(groups, J, B, 0))


def test_a_small_dataset_gets_row_groups_small_enough_to_fill_the_batch():
    # 200 sequences, B=128, J=16: row groups of 64 leave 12 of 16 virtual shards empty (a quarter of the batch).
    shards = bl.shard_sizes(200, bl.choose_store_rows_per_shard(200))
    assert bl.batch_fill(bl.shard_row_groups(shards, 64), 16, 128, 0).ratio < 0.5
    size = bl.choose_row_group_size(shards, 16, 128, 0)
    assert size < 64
    assert bl.batch_fill(bl.shard_row_groups(shards, size), 16, 128, 0).ratio >= bl.MIN_FILL
    # and it is the largest candidate that does
    larger = [c for c in bl.ROW_GROUP_CANDIDATES if c > size]
    assert all(bl.batch_fill(bl.shard_row_groups(shards, c), 16, 128, 0).ratio < bl.MIN_FILL for c in larger)


def test_large_datasets_keep_the_largest_row_groups():
    for rows, B, J in ((6040, 16, 16), (50_000, 128, 16), (1_000_000, 1024, 64)):
        shards = bl.shard_sizes(rows, bl.choose_store_rows_per_shard(rows))
        assert bl.choose_row_group_size(shards, J, B, 0) == 64, rows


def test_fewer_rows_than_virtual_shards_falls_back_to_single_rows():
    assert bl.choose_row_group_size([5], 16, 16, 0) in (1, 2, 3, 4, 6, 8)  # whatever fills; never larger than the rows
    assert bl.batch_fill([1] * 5, 16, 16, 0).ratio == 1.0  # 5 rows, one step of 5: as full as it can be


def test_store_files_are_about_sixteen_whole_multiples_of_64_rows():
    assert bl.choose_store_rows_per_shard(1) == 64
    assert bl.choose_store_rows_per_shard(6040) == 384  # ceil(6040 / 16) = 378 -> 384
    assert bl.choose_store_rows_per_shard(10**7) == bl.MAX_STORE_SHARD_ROWS
    for rows in (1, 100, 999, 6040, 50_000):
        assert bl.choose_store_rows_per_shard(rows) % 64 == 0


def test_the_layouts_seen_on_ml1m():
    # The ML-1M training split as first written (3 row groups of ~2,000 users) over 16 virtual shards
    # and 64-row batches: 12 rows per step on average (the run trained on 5x smaller batches than asked).
    fill = bl.batch_fill([2048, 2048, 1944], 16, 64, seed=0)
    assert fill.mean_batch == pytest.approx(11.8, abs=0.05) and fill.ratio < 0.2
    assert bl.batch_fill([2048, 2048, 1944], 1, 64, seed=0).ratio == 1.0  # one virtual shard: full batches
    assert bl.batch_fill([64] * 94 + [24], 16, 64, seed=0).ratio >= bl.MIN_FILL  # the ML-1M store: 95 groups
    # 400 rows, B = 128: 4 steps at best (a mean of 100), which 25 groups of 16 rows over 16 shards achieve.
    assert bl.batch_fill([16] * 25, 16, 128, seed=0).mean_batch == 100
    assert bl.batch_fill([64] * 6 + [16], 16, 128, seed=0).mean_batch < 60  # 7 groups: 7 of 16 shards used
