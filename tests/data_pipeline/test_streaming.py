"""StreamingReader / EpochPlan: worker-count independence, exactly-once, resume, sequential reads, prefetch errors."""

from __future__ import annotations

import threading
import uuid
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline import fsio, streaming
from data_pipeline.streaming import BlockReadError, BlockRef, EpochPlan, StreamingReader, list_blocks

# Three files with uneven row groups (one group of a single row); 59 rows in 9 blocks.
ROW_GROUPS = [[7, 5, 13], [1, 9, 4, 6], [11, 3]]
NUM_ROWS = sum(map(sum, ROW_GROUPS))
J = 5  # virtual shards: more than the largest W tested, not a multiple of 2, 3 or 4
B = 7  # global batch: b_j = 2, 2, 1, 1, 1
SEED = 3


def uid(file_index: int, row: int) -> int:
    """The value stored in column ``uid``: identifies a row independently of the reader's bookkeeping."""
    return file_index * 1000 + row


def write_store(base: str, storage_options=None) -> list[str]:
    """Write ROW_GROUPS as Parquet files under ``base`` (any fsspec URL); columns uid: int64, items: list<int32>."""
    files = []
    for f, sizes in enumerate(ROW_GROUPS):
        sink = pa.BufferOutputStream()
        schema = pa.schema([("uid", pa.int64()), ("items", pa.list_(pa.int32()))])
        with pq.ParquetWriter(sink, schema) as writer:
            row = 0
            for size in sizes:  # one write_table call per row group
                uids = [uid(f, r) for r in range(row, row + size)]
                items = [[r % 7 + 1] * (r % 3 + 1) for r in range(row, row + size)]
                writer.write_table(pa.table({"uid": uids, "items": items}, schema=schema))
                row += size
        url = fsio.join(base, f"part-{f:05d}.parquet")
        fsio.atomic_write_bytes(url, sink.getvalue().to_pybytes(), storage_options)
        files.append(url)
    return files


@pytest.fixture
def store(tmp_path):
    files = write_store(str(tmp_path / "train"))
    return files, list_blocks(files)


@pytest.fixture
def reads(monkeypatch):
    """Record every block read (the reader's only data I/O goes through streaming.read_block)."""
    log: list[BlockRef] = []
    real = streaming.read_block

    def counting(block, columns=None, storage_options=None, footers=None):
        log.append(block)
        return real(block, columns, storage_options, footers)

    monkeypatch.setattr(streaming, "read_block", counting)
    return log


def reader(blocks, rank, world, **kw) -> StreamingReader:
    kw = {"num_virtual_shards": J, "global_batch_size": B, "seed": SEED, **kw}
    return StreamingReader(blocks, ["uid", "items"], rank=rank, world=world, **kw)


def rows_of(table: pa.Table) -> list[tuple[int, int]]:
    return list(zip(table["_block_id"].to_pylist(), table["_row_in_block"].to_pylist()))


def run_epoch(blocks, world, epoch=0, start_step=0, **kw) -> dict[int, list[tuple[int, int]]]:
    """Global batches {step: rows} of an epoch from ``start_step``: every worker's rows, in rank order."""
    per_worker = []
    for rank in range(world):
        steps = list(reader(blocks, rank, world, **kw).iter_epoch(epoch, start_step))
        per_worker.append({step: rows_of(table) for step, table in steps})
    assert len({tuple(w) for w in per_worker}) == 1, "workers must yield the same steps"
    return {step: [row for w in per_worker for row in w[step]] for step in per_worker[0]}


# --------------------------------------------------------------------------------------
# Listing


def test_list_blocks_reads_row_groups_in_order(store):
    files, blocks = store
    groups = [(files[f], rg, size) for f, sizes in enumerate(ROW_GROUPS) for rg, size in enumerate(sizes)]
    assert [(b.file, b.row_group, b.num_rows, b.block_id) for b in blocks] == [(*g, i) for i, g in enumerate(groups)]


def test_list_blocks_expected_rows_mismatch_names_the_file(store):
    files, _ = store
    assert len(list_blocks(files, expected_rows=[25, 20, 14])) == 9
    with pytest.raises(ValueError, match=r"part-00001\.parquet.*20 rows, expected 21"):
        list_blocks(files, expected_rows=[25, 21, 14])
    with pytest.raises(ValueError, match="duplicates"):
        list_blocks([files[0], files[0]])


# --------------------------------------------------------------------------------------
# The plan


def test_plan_deals_every_row_once_and_sizes_steps(store):
    _, blocks = store
    plan = EpochPlan(blocks, J, B, SEED, epoch=0)
    assert [plan.rows_per_step(j) for j in range(J)] == [2, 2, 1, 1, 1]
    dealt = [b for j in range(J) for b in plan.virtual_shard_blocks(j)]
    assert sorted(b.block_id for b in dealt) == list(range(len(blocks)))
    lengths = [plan.shard_num_rows(j) for j in range(J)]
    assert plan.steps == max(-(-n // plan.rows_per_step(j)) for j, n in enumerate(lengths))

    batches = [plan.global_batch(s) for s in range(plan.steps)]
    everything = [row for batch in batches for row in batch]
    assert len(everything) == NUM_ROWS
    assert set(everything) == {(b.block_id, r) for b in blocks for r in range(b.num_rows)}
    assert [len(batch) for batch in batches] == [plan.global_rows(s) for s in range(plan.steps)]
    assert len(batches[0]) == B  # full while no virtual shard is exhausted
    assert len(batches[-1]) >= 1
    with pytest.raises(IndexError):
        plan.global_batch(plan.steps)


def test_plan_is_a_function_of_seed_and_epoch(store):
    _, blocks = store

    def order(seed, epoch):
        plan = EpochPlan(blocks, J, B, seed, epoch)
        return [row for s in range(plan.steps) for row in plan.global_batch(s)]

    assert order(SEED, 0) == order(SEED, 0)
    assert order(SEED, 0) != order(SEED, 1)
    assert order(SEED, 0) != order(SEED + 1, 0)


def test_in_block_shuffle_is_deterministic_and_per_block(store):
    _, blocks = store
    plan = EpochPlan(blocks, J, B, SEED, epoch=0)
    big = blocks[2]  # 13 rows
    order = plan.block_row_order(big)
    assert sorted(order.tolist()) == list(range(13))
    assert order.tolist() == EpochPlan(blocks, J, B, SEED, 0).block_row_order(big).tolist()
    assert order.tolist() != EpochPlan(blocks, J, B, SEED, 1).block_row_order(big).tolist()
    assert order.tolist() != list(range(13))


def test_plan_skips_empty_blocks_and_handles_more_shards_than_blocks():
    blocks = [BlockRef("a", 0, 3, 0), BlockRef("a", 1, 0, 1), BlockRef("b", 0, 2, 2)]
    plan = EpochPlan(blocks, num_virtual_shards=4, global_batch_size=4, seed=0, epoch=0)
    rows = [row for s in range(plan.steps) for row in plan.global_batch(s)]
    assert sorted(rows) == [(0, 0), (0, 1), (0, 2), (2, 0), (2, 1)]
    assert all(b.num_rows for b in plan.read_order(range(4)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 0, "world": J + 1}, r"world \(6\) must be <= num_virtual_shards \(5\)"),
        ({"rank": 2, "world": 2}, r"rank must be in \[0, 2\)"),
        ({"rank": 0, "world": 1, "global_batch_size": J - 1}, r"global_batch_size \(4\) must be >= num_virtual"),
    ],
)
def test_invalid_configurations_raise(store, kwargs, message):
    _, blocks = store
    with pytest.raises(ValueError, match=message):
        reader(blocks, **kwargs)


def test_workers_own_virtual_shards_modulo_world():
    assert streaming.owned_virtual_shards(1, 2, 5) == [1, 3]
    assert streaming.owned_virtual_shards(0, 3, 5) == [0, 3]
    assert streaming.owned_virtual_shards(0, 1, 3) == [0, 1, 2]


def test_worker_rows_rejects_world_above_shards(store):
    _, blocks = store
    with pytest.raises(ValueError, match="must be <= num_virtual_shards"):
        EpochPlan(blocks, J, B, SEED, 0).worker_rows(0, J + 1, 0)


# --------------------------------------------------------------------------------------
# The reader


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_global_batches_do_not_depend_on_world_size(store, world):
    _, blocks = store
    plan = EpochPlan(blocks, J, B, SEED, epoch=1)
    batches = run_epoch(blocks, world, epoch=1)
    assert list(batches) == list(range(plan.steps))
    for step, rows in batches.items():
        # The same set for every W; virtual-shard order is the plan's when W == 1.
        assert sorted(rows) == sorted(plan.global_batch(step))
        if world == 1:
            assert rows == plan.global_batch(step)
    everything = [row for rows in batches.values() for row in rows]
    assert len(everything) == len(set(everything)) == NUM_ROWS


def test_worker_tables_match_the_plan_and_the_stored_data(store):
    files, blocks = store
    plan = EpochPlan(blocks, J, B, SEED, epoch=0)
    world = 3
    for rank in range(world):
        steps = 0
        for step, table in reader(blocks, rank, world).iter_epoch(0):
            steps += 1
            assert table.column_names == ["uid", "items", "_block_id", "_row_in_block"]
            assert table.schema.field("_block_id").type == pa.int64() == table.schema.field("_row_in_block").type
            assert rows_of(table) == plan.worker_rows(rank, world, step)
            # The data really is the row the provenance columns name.
            expected_uids = []
            for block_id, row in rows_of(table):
                block = blocks[block_id]
                f = files.index(block.file)
                expected_uids.append(uid(f, sum(ROW_GROUPS[f][: block.row_group]) + row))
            assert table["uid"].to_pylist() == expected_uids
            assert [len(x) for x in table["items"].to_pylist()] == [u % 1000 % 3 + 1 for u in expected_uids]
        assert steps == plan.steps


def test_empty_local_batches_are_yielded_with_the_schema(store):
    _, blocks = store
    plan = EpochPlan(blocks, J, B, SEED, epoch=0)
    world = 4
    empty = [
        (rank, step) for rank in range(world) for step in range(plan.steps) if not plan.worker_rows(rank, world, step)
    ]
    assert empty, "the fixture should leave some worker without rows late in the epoch"
    for rank in {r for r, _ in empty}:
        tables = dict(reader(blocks, rank, world).iter_epoch(0))
        for r, step in empty:
            if r == rank:
                assert tables[step].num_rows == 0
                assert tables[step].column_names == ["uid", "items", "_block_id", "_row_in_block"]


def test_empty_table_schema_from_footer_when_nothing_was_read(store):
    _, blocks = store
    plan = EpochPlan(blocks, J, B, SEED, epoch=0)
    world = 4
    # A worker whose shards are all exhausted at the last step has no block to take the schema from.
    rank = next(r for r in range(world) if not plan.worker_rows(r, world, plan.steps - 1))
    [(step, table)] = list(reader(blocks, rank, world).iter_epoch(0, start_step=plan.steps - 1))
    assert step == plan.steps - 1 and table.num_rows == 0
    assert table.schema.types == [pa.int64(), pa.list_(pa.int32()), pa.int64(), pa.int64()]


def test_resume_at_another_world_size_continues_the_same_batches(store, reads):
    _, blocks = store
    plan = EpochPlan(blocks, J, B, SEED, epoch=0)
    uninterrupted = run_epoch(blocks, world=2)
    for s in (3, 6):
        # Make sure the test exercises resuming in the middle of a block.
        assert any(plan.step_slices(j, s) and plan.step_slices(j, s)[0].start > 0 for j in range(J))
        reads.clear()
        resumed = run_epoch(blocks, world=3, start_step=s)
        assert list(resumed) == list(range(s, plan.steps))
        for step in resumed:
            assert sorted(resumed[step]) == sorted(uninterrupted[step])
        # Only blocks holding remaining rows were read, each once (skipped blocks never).
        remaining_blocks = {block_id for rows in resumed.values() for block_id, _ in rows}
        assert Counter(b.block_id for b in reads) == Counter(remaining_blocks)
    # Resuming at the very end yields nothing.
    assert list(reader(blocks, 0, 2).iter_epoch(0, start_step=plan.steps)) == []
    with pytest.raises(ValueError, match="start_step"):
        reader(blocks, 0, 2).iter_epoch(0, start_step=plan.steps + 1)


@pytest.mark.parametrize("world, start_step", [(1, 0), (2, 0), (3, 4)])
def test_blocks_are_read_once_and_sequentially_per_virtual_shard(store, reads, world, start_step):
    _, blocks = store
    plan = EpochPlan(blocks, J, B, SEED, epoch=0)
    for rank in range(world):
        reads.clear()
        r = reader(blocks, rank, world, prefetch_blocks=2)
        for _ in r.iter_epoch(0, start_step):
            pass
        assert len(reads) == len(set(reads)), "a block was read twice"
        assert reads == plan.read_order(r.virtual_shards, start_step)
        for j in r.virtual_shards:
            of_j = [b for b in reads if b in plan.virtual_shard_blocks(j)]
            shard = plan.virtual_shard_blocks(j)
            assert of_j == shard[len(shard) - len(of_j) :], f"virtual shard {j} was not read in stream order"


def test_memory_filesystem(store):
    base = f"memory://streaming-test-{uuid.uuid4().hex}"
    try:
        files = write_store(base)
        blocks = list_blocks(files, expected_rows=[sum(g) for g in ROW_GROUPS])
        assert [b.num_rows for b in blocks] == [n for g in ROW_GROUPS for n in g]
        batches = run_epoch(blocks, world=2)
        plan = EpochPlan(blocks, J, B, SEED, epoch=0)
        expected = [sorted(plan.global_batch(s)) for s in range(plan.steps)]
        assert [sorted(rows) for rows in batches.values()] == expected
    finally:
        fsio.remove_tree(base)


@pytest.mark.parametrize("base", ["local", "memory"])
def test_read_block_with_a_footer_cache_reads_the_same_rows(store, base):
    files, blocks = store
    if base == "memory":
        url = f"memory://streaming-test-{uuid.uuid4().hex}"
        files = write_store(url)
        blocks = list_blocks(files)
    try:
        footers: dict = {}
        for block in blocks + blocks:  # the second pass reads through the cached footers
            assert streaming.read_block(block, footers=footers).equals(streaming.read_block(block))
        assert sorted(footers) == sorted(files)  # one footer per file
        assert [footers[f].num_row_groups for f in files] == [len(g) for g in ROW_GROUPS]
    finally:
        if base == "memory":
            fsio.remove_tree(url)


def test_local_files_are_opened_with_arrows_native_reader(store, tmp_path):
    files, _ = store
    with fsio.open_input(files[0]) as f:
        assert isinstance(f, pa.NativeFile)  # reads release the GIL (no Python callbacks)
        assert pq.read_metadata(f).num_rows == sum(ROW_GROUPS[0])
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        fsio.open_input(str(tmp_path / "nope.parquet"))


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "streaming-prefetch"]


def test_prefetch_error_surfaces_in_the_consumer_with_the_file_name(store):
    files, blocks = store
    with open(files[1], "wb") as f:  # corrupt a file after listing
        f.write(b"not parquet at all")
    with pytest.raises(BlockReadError, match=r"part-00001\.parquet") as info:
        for _ in reader(blocks, 0, 1).iter_epoch(0):
            pass
    assert info.value.__cause__ is not None
    assert not prefetch_threads()


def test_file_changed_since_listing_is_an_error(store):
    files, blocks = store
    stale = [BlockRef(b.file, b.row_group, b.num_rows + 1, b.block_id) if b.block_id == 0 else b for b in blocks]
    with pytest.raises(BlockReadError, match=r"part-00000\.parquet.*row group 0 has 7 rows, the listing said 8"):
        for _ in reader(stale, 0, 1).iter_epoch(0):
            pass


def test_a_column_named_like_the_provenance_columns_is_refused(tmp_path):
    file = str(tmp_path / "part-00000.parquet")
    pq.write_table(pa.table({"uid": [1, 2], "_block_id": [5, 6]}), file)
    with pytest.raises(BlockReadError, match=r"part-00000\.parquet: column '_block_id' is reserved"):
        for _ in StreamingReader(list_blocks([file]), None, 1, 2, SEED, 0, 1).iter_epoch(0):
            pass


def test_stopping_early_stops_the_prefetch_thread(store, reads):
    _, blocks = store
    plan = EpochPlan(blocks, J, B, SEED, epoch=0)
    it = reader(blocks, 0, 1, prefetch_blocks=1).iter_epoch(0)
    next(it)
    it.close()
    assert not prefetch_threads()
    # Bounded read-ahead: the first step's blocks, one queued, one read but waiting for queue space.
    first_step_blocks = {row[0] for row in plan.global_batch(0)}
    assert len(first_step_blocks) + 2 < len(blocks)
    assert len(reads) <= len(first_step_blocks) + 2
