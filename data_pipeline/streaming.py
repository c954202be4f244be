"""Stream Parquet row groups to data-parallel workers in an order that does not depend on the worker count.

The problem: W data-parallel workers each read their share of a Parquet store,
sequentially, and we want

* the same global batches whatever W is (a run can be restarted on more or
  fewer machines and still see exactly the same data, in the same order);
* every row exactly once per epoch;
* a resume state of just ``(epoch, step)``;
* sequential I/O: whole row groups, never random rows across the store.

The idea is MosaicML StreamingDataset's "canonical nodes" (see
``shared/notes/elastic-reader.md``): the data is dealt into a fixed number J of
*virtual shards* and physical workers only decide which virtual shards they
serve.

Vocabulary
    block          one Parquet row group, identified by a :class:`BlockRef`. The
                   unit of I/O: a worker always reads a whole block.
    virtual shard  an ordered list of blocks. Its *stream* is the concatenation of
                   its blocks' rows, each block's rows shuffled.
    J              ``num_virtual_shards``: fixed for the whole run, independent of W.
    B              ``global_batch_size``: rows (user sequences) per global step.

An epoch (:class:`EpochPlan`, a pure function of ``seed`` and ``epoch``)
    1. Permute the blocks with a generator seeded by ``(seed, epoch)`` and deal
       them round-robin into the J virtual shards.
    2. Shuffle each block's rows with a generator seeded by
       ``(seed, epoch, block_id)``; this is the only shuffle below block level,
       so it needs just one block in memory.
    3. Global step ``s`` takes rows ``[s * b_j, (s + 1) * b_j)`` of every virtual
       shard j's stream, where ``b_j = B // J + (1 if j < B % J else 0)``
       (so the b_j add up to B).
    4. Virtual shards hold different numbers of rows, so towards the end of an
       epoch some are exhausted and contribute fewer or no rows: **late global
       batches can be smaller than B**. The epoch ends when every virtual shard
       is exhausted, so ``steps = max_j ceil(len_j / b_j)``. Because the deal
       changes each epoch, so can the number of steps (see
       :meth:`StreamingReader.steps_per_epoch`).

Workers
    Worker ``rank`` of ``world`` owns virtual shards ``{j : j % world == rank}``.
    When W does not divide J workers get unequal local batches (and late in an
    epoch possibly empty ones: the reader still yields them, because
    data-parallel workers must step together). Reduce the loss as a *sum* over
    the global batch divided by the global batch's row count
    (:meth:`EpochPlan.global_rows`, computable on every worker without
    communication), not as a mean of per-worker means.

Resume
    The state is ``(epoch, step)`` plus the fixed config (blocks, J, B, seed).
    Every virtual shard's offset after ``step`` steps is ``step * b_j``,
    whatever W was, so a reader restarted with any ``1 <= W' <= J`` continues
    the same global batches. It reads only the block holding each offset (and
    the ones after it), never the skipped ones.

Typical use::

    blocks = list_blocks(files, storage_options, expected_rows=manifest_rows)
    reader = StreamingReader(blocks, ["user", "items"], num_virtual_shards=64,
                             global_batch_size=1024, seed=0, rank=rank, world=world)
    for step, table in reader.iter_epoch(epoch, start_step=resume_step):
        ...  # table: this worker's rows, plus _block_id and _row_in_block (int64)
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline import fsio
from data_pipeline.prefetch import BlockReadError, PrefetchIterator, _Prefetcher, prefetch_iter

__all__ = [
    "BLOCK_ID_COLUMN", "ROW_IN_BLOCK_COLUMN", "BlockRef", "BlockSlice", "EpochPlan", "StreamingReader",
    "list_blocks", "owned_virtual_shards", "read_block",
    "BlockReadError", "PrefetchIterator", "prefetch_iter",  # from data_pipeline.prefetch
]

#: Columns added to every table the reader yields: where each row came from.
#: ``_row_in_block`` is the row's index inside its row group as stored (before shuffling).
BLOCK_ID_COLUMN = "_block_id"
ROW_IN_BLOCK_COLUMN = "_row_in_block"

# Domain tags keep the two kinds of generator seeds apart. They sit *before* the
# variable-length part because numpy's SeedSequence ignores trailing zeros
# ([s, e] and [s, e, 0] seed the same stream).
_TAG_BLOCK_ORDER = 0
_TAG_ROW_ORDER = 1


@dataclass(frozen=True)
class BlockRef:
    """One Parquet row group: the unit of reading and of the epoch permutation.

    ``block_id`` is the block's position in the listing (:func:`list_blocks`);
    it seeds the block's row shuffle, so it must be stable for a run.
    """

    file: str
    row_group: int
    num_rows: int
    block_id: int


class BlockSlice(NamedTuple):
    """Positions ``[start, stop)`` of ``block``'s *shuffled* row order taken at one step."""

    block: BlockRef
    start: int
    stop: int


# --------------------------------------------------------------------------------------
# Listing


class StreamError(ValueError):
    """A file the reader was told to stream is missing, unreadable, or not the file its manifest describes."""


def list_blocks(
    files: Sequence[str],
    storage_options: Optional[dict[str, Any]] = None,
    expected_rows: Optional[Sequence[int]] = None,
    expected_bytes: Optional[Sequence[Optional[int]]] = None,
    check_footer: Optional[Callable[[str, pq.FileMetaData], None]] = None,
) -> list[BlockRef]:
    """List every row group of ``files`` as a :class:`BlockRef`, reading only the Parquet footers.

    Blocks come in a deterministic order (files as given, row groups in order)
    and ``block_id`` is the position in that list. ``expected_rows`` and
    ``expected_bytes`` (per file, from a manifest) and ``check_footer(file, footer)``
    (e.g. the provenance a store writes into each file) guard against a file that
    was replaced or truncated: a mismatch, a missing or an unreadable file raises
    :class:`StreamError` naming the file. Empty row groups are listed too (so ids
    match row-group positions) but are never read.
    """
    for name, values in (("expected_rows", expected_rows), ("expected_bytes", expected_bytes)):
        if values is not None and len(values) != len(files):
            raise ValueError(f"{name} has {len(values)} entries for {len(files)} files")
    if len(set(files)) != len(files):
        # A file listed twice would have its rows used twice per epoch.
        raise ValueError("files must not contain duplicates")
    blocks: list[BlockRef] = []
    for i, file in enumerate(files):
        try:
            with fsio.open_input(file, storage_options) as f:
                size = f.size() if callable(f.size) else f.size
                if expected_bytes is not None and expected_bytes[i] is not None and size != expected_bytes[i]:
                    raise StreamError(f"{file}: {size} bytes, the manifest says {expected_bytes[i]} (truncated or replaced?)")
                meta = pq.read_metadata(f)
        except FileNotFoundError:
            raise StreamError(f"{file}: listed in the manifest but missing") from None
        except IsADirectoryError:
            raise StreamError(f"{file}: a directory where the manifest lists a Parquet file") from None
        except (pa.ArrowException, OSError) as exc:
            raise StreamError(f"{file}: not a readable Parquet file (truncated or corrupt?): {exc}") from None
        if expected_rows is not None and meta.num_rows != expected_rows[i]:
            raise StreamError(f"{file}: the Parquet footer says {meta.num_rows} rows, expected {expected_rows[i]}")
        if check_footer is not None:
            check_footer(file, meta)
        for rg in range(meta.num_row_groups):
            blocks.append(BlockRef(file, rg, meta.row_group(rg).num_rows, len(blocks)))
    return blocks


def read_block(
    block: BlockRef,
    columns: Optional[Sequence[str]] = None,
    storage_options: Optional[dict[str, Any]] = None,
    footers: Optional[dict[str, pq.FileMetaData]] = None,
) -> pa.Table:
    """Read one whole row group (in stored row order), verifying its pages' CRC checksums.

    ``footers`` is an optional cache of parsed Parquet footers by file, filled and
    reused here, so that a reader parses each file's footer once rather than once per
    row group (store files are immutable once committed).

    Raises :class:`StreamError` naming the file and row group if it cannot be read,
    a page fails its checksum (a bit flipped since it was written), or its row count
    differs from the listing (the file changed since :func:`list_blocks`, and the
    exactly-once bookkeeping would silently break).
    """
    columns = list(columns) if columns is not None else None
    footer = footers.get(block.file) if footers is not None else None
    try:
        with fsio.open_input(block.file, storage_options) as f:
            parquet = pq.ParquetFile(f, metadata=footer, page_checksum_verification=True)
            table = parquet.read_row_group(block.row_group, columns=columns)
            if footers is not None:
                footers[block.file] = parquet.metadata
    except FileNotFoundError:
        raise StreamError(f"{block.file}: missing (it was there when the run listed its row groups)") from None
    except (pa.ArrowException, OSError) as exc:
        raise StreamError(f"{block.file}: row group {block.row_group} is unreadable (corrupt?): {exc}") from None
    if table.num_rows != block.num_rows:
        raise StreamError(
            f"{block.file}: row group {block.row_group} has {table.num_rows} rows, the listing said {block.num_rows}"
        )
    return table


# --------------------------------------------------------------------------------------
# The epoch plan (pure: no I/O)


def _check_shape(num_virtual_shards: int, global_batch_size: int) -> None:
    if num_virtual_shards < 1:
        raise ValueError(f"num_virtual_shards must be >= 1, got {num_virtual_shards}")
    if global_batch_size < num_virtual_shards:
        # Otherwise some virtual shard would get 0 rows per step and never drain.
        raise ValueError(
            f"global_batch_size ({global_batch_size}) must be >= num_virtual_shards ({num_virtual_shards}): "
            "every virtual shard contributes at least one row per step"
        )


def owned_virtual_shards(rank: int, world: int, num_virtual_shards: int) -> list[int]:
    """The virtual shards worker ``rank`` of ``world`` reads: ``j % world == rank``, increasing."""
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    if world > num_virtual_shards:
        raise ValueError(
            f"world ({world}) must be <= num_virtual_shards ({num_virtual_shards}): "
            "a virtual shard is the smallest unit a worker can own"
        )
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    return list(range(rank, num_virtual_shards, world))


class EpochPlan:
    """Which rows every virtual shard contributes at every step of one epoch.

    A pure function of ``(blocks, num_virtual_shards, global_batch_size, seed,
    epoch)``: no I/O, no dependence on the number of workers. The reader
    follows it; tests use it as the reference.
    """

    def __init__(
        self,
        blocks: Sequence[BlockRef],
        num_virtual_shards: int,
        global_batch_size: int,
        seed: int,
        epoch: int,
    ) -> None:
        _check_shape(num_virtual_shards, global_batch_size)
        if seed < 0 or epoch < 0:
            raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
        if len({b.block_id for b in blocks}) != len(blocks):
            raise ValueError("block ids must be unique")
        self.blocks = tuple(blocks)
        self.num_virtual_shards = num_virtual_shards
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.epoch = epoch

        order = np.random.default_rng([seed, epoch, _TAG_BLOCK_ORDER]).permutation(len(self.blocks))
        J = num_virtual_shards
        self._shards = [tuple(self.blocks[i] for i in order[j::J]) for j in range(J)]
        # _starts[j][k]: offset of shard j's k-th block in the shard's stream; the
        # last entry is the stream length. Lets a step's row range be mapped to
        # blocks by bisection, without walking the stream.
        self._starts = [[0, *np.cumsum([b.num_rows for b in shard]).tolist()] for shard in self._shards]
        self.steps = max((math.ceil(self.shard_num_rows(j) / self.rows_per_step(j)) for j in range(J)), default=0)

    @property
    def num_rows(self) -> int:
        """Rows in the epoch (every block's, once)."""
        return sum(b.num_rows for b in self.blocks)

    def virtual_shard_blocks(self, j: int) -> list[BlockRef]:
        """Virtual shard ``j``'s blocks, in stream order."""
        return list(self._shards[j])

    def shard_num_rows(self, j: int) -> int:
        """Length of virtual shard ``j``'s stream."""
        return self._starts[j][-1]

    def rows_per_step(self, j: int) -> int:
        """``b_j``: rows virtual shard ``j`` contributes to a full global batch."""
        B, J = self.global_batch_size, self.num_virtual_shards
        return B // J + (1 if j < B % J else 0)

    def block_row_order(self, block: BlockRef) -> np.ndarray:
        """The block's rows (indices into the stored row group) in this epoch's shuffled order."""
        rng = np.random.default_rng([self.seed, self.epoch, _TAG_ROW_ORDER, block.block_id])
        return rng.permutation(block.num_rows)

    def step_slices(self, j: int, step: int) -> list[BlockSlice]:
        """The pieces of blocks virtual shard ``j`` contributes at ``step``, in stream order.

        Empty after the shard is exhausted; more than one piece when the step's
        range crosses a block boundary. Empty blocks never appear.
        """
        b = self.rows_per_step(j)
        starts, shard = self._starts[j], self._shards[j]
        lo, hi = step * b, min((step + 1) * b, starts[-1])
        pieces = []
        k = bisect.bisect_right(starts, lo) - 1  # the last block starting at or before lo
        while lo < hi:
            end = starts[k + 1]
            if end > lo:  # skips empty blocks
                stop = min(hi, end)
                pieces.append(BlockSlice(shard[k], lo - starts[k], stop - starts[k]))
                lo = stop
            k += 1
        return pieces

    def read_order(self, shards: Iterable[int], start_step: int = 0) -> list[BlockRef]:
        """Blocks of ``shards`` that steps ``start_step...`` need, in the order a reader first needs them.

        Ordered by (first step that needs the block, shard, position in shard),
        which is the order in which :meth:`StreamingReader.iter_epoch` walks the
        steps. Blocks entirely before ``start_step`` (and empty ones) are left
        out: resuming never reads them.
        """
        needed = []
        for j in shards:
            b, starts = self.rows_per_step(j), self._starts[j]
            offset = start_step * b
            for k, block in enumerate(self._shards[j]):
                if block.num_rows == 0 or starts[k + 1] <= offset:
                    continue
                first_step = max(start_step, starts[k] // b)
                needed.append((first_step, j, k, block))
        needed.sort(key=lambda item: item[:3])
        return [block for *_, block in needed]

    def _rows(self, shards: Iterable[int], step: int) -> list[tuple[int, int]]:
        if not 0 <= step < self.steps:
            raise IndexError(f"step {step} is outside the epoch's {self.steps} steps")
        rows = []
        for j in shards:
            for piece in self.step_slices(j, step):
                order = self.block_row_order(piece.block)[piece.start : piece.stop]
                rows.extend((piece.block.block_id, int(r)) for r in order)
        return rows

    def global_batch(self, step: int) -> list[tuple[int, int]]:
        """The ``(block_id, row_in_block)`` pairs of global step ``step``, in virtual-shard order."""
        return self._rows(range(self.num_virtual_shards), step)

    def worker_rows(self, rank: int, world: int, step: int) -> list[tuple[int, int]]:
        """The ``(block_id, row_in_block)`` pairs worker ``rank`` of ``world`` trains on at ``step``."""
        return self._rows(owned_virtual_shards(rank, world, self.num_virtual_shards), step)

    def global_rows(self, step: int) -> int:
        """Rows in global step ``step`` (``global_batch_size`` except near the end of the epoch)."""
        return sum(
            max(0, min(self.rows_per_step(j), self.shard_num_rows(j) - step * self.rows_per_step(j)))
            for j in range(self.num_virtual_shards)
        )


# --------------------------------------------------------------------------------------
# The reader


class StreamingReader:
    """One data-parallel worker's view of the store: its virtual shards, read sequentially.

    ``iter_epoch(epoch, start_step)`` yields ``(step, table)`` for every step of
    the epoch from ``start_step``. ``table`` holds this worker's rows for that
    step (:meth:`EpochPlan.worker_rows`): the columns asked for plus
    ``_block_id`` and ``_row_in_block`` (int64), concatenated over the owned
    virtual shards in increasing j. It can have 0 rows, and may be made of
    several chunks.

    Memory: the current block of each owned virtual shard (dropped once fully
    used) plus up to ``prefetch_blocks`` blocks read ahead by a background
    thread. Every block is read at most once per epoch, whole, with one
    ``read_row_group``.
    """

    def __init__(
        self,
        blocks: Sequence[BlockRef],
        columns: Optional[Sequence[str]],
        num_virtual_shards: int,
        global_batch_size: int,
        seed: int,
        rank: int,
        world: int,
        storage_options: Optional[dict[str, Any]] = None,
        prefetch_blocks: int = 3,
    ) -> None:
        _check_shape(num_virtual_shards, global_batch_size)
        if prefetch_blocks < 1:
            raise ValueError(f"prefetch_blocks must be >= 1, got {prefetch_blocks}")
        self.blocks = tuple(blocks)
        self.columns = list(columns) if columns is not None else None
        self.num_virtual_shards = num_virtual_shards
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.rank = rank
        self.world = world
        self.storage_options = storage_options
        self.prefetch_blocks = prefetch_blocks
        self.virtual_shards = owned_virtual_shards(rank, world, num_virtual_shards)
        self._empty: Optional[pa.Table] = None  # a 0-row table with the output schema, once known
        self._footers: dict[str, pq.FileMetaData] = {}  # parsed once per file (read_block)

    def plan(self, epoch: int) -> EpochPlan:
        """The (worker-independent) plan of ``epoch``."""
        return EpochPlan(self.blocks, self.num_virtual_shards, self.global_batch_size, self.seed, epoch)

    def steps_per_epoch(self, epoch: int) -> int:
        """Steps in ``epoch`` (the same on every worker and for every world size).

        A method, not a property: the deal of blocks into virtual shards changes
        every epoch and with it the longest shard, so the count can differ
        between epochs. It is cheap (no I/O), so an LR schedule can
        sum it over the planned epochs.
        """
        return self.plan(epoch).steps

    def iter_epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[int, pa.Table]]:
        """Yield ``(step, local_batch)`` for steps ``start_step, ..., steps - 1`` of ``epoch``.

        ``start_step`` is the number of steps already taken in this epoch (by any
        world size); ``start_step == steps`` yields nothing. Arguments are
        checked here, not at the first ``next()``.
        """
        plan = self.plan(epoch)
        if not 0 <= start_step <= plan.steps:
            raise ValueError(f"start_step must be in [0, {plan.steps}] for epoch {epoch}, got {start_step}")
        return self._iterate(plan, start_step)

    def _iterate(self, plan: EpochPlan, start_step: int) -> Iterator[tuple[int, pa.Table]]:
        read_order = plan.read_order(self.virtual_shards, start_step)
        prefetcher = _Prefetcher(read_order, lambda block: self._read_shuffled(plan, block), self.prefetch_blocks)
        current: dict[int, pa.Table] = {}  # virtual shard -> its block being consumed (shuffled)
        try:
            for step in range(start_step, plan.steps):
                pieces = []
                # Walk the steps exactly as EpochPlan.read_order orders them (shards in
                # increasing j, a shard's pieces in stream order), so each new block
                # needed is the next one the prefetcher hands out.
                for j in self.virtual_shards:
                    for piece in plan.step_slices(j, step):
                        if j not in current:
                            current[j] = prefetcher.next(piece.block)
                        # The block is stored shuffled: a step's piece is a zero-copy slice.
                        pieces.append(current[j].slice(piece.start, piece.stop - piece.start))
                        if piece.stop == piece.block.num_rows:
                            del current[j]  # fully used: free it before the next one arrives
                yield step, (pa.concat_tables(pieces) if pieces else self._empty_table())
        finally:
            prefetcher.close()

    def _read_shuffled(self, plan: EpochPlan, block: BlockRef) -> pa.Table:
        """Read ``block`` (on the prefetch thread), in the epoch's row order, with the provenance columns.

        One ``take`` per block, so that every step's piece of it is a slice.
        """
        table = read_block(block, self.columns, self.storage_options, self._footers)
        for name in (BLOCK_ID_COLUMN, ROW_IN_BLOCK_COLUMN):
            if name in table.column_names:
                raise ValueError(f"{block.file}: column {name!r} is reserved for the reader's provenance columns")
        rows = pa.array(plan.block_row_order(block), type=pa.int64())
        table = table.take(rows)
        table = table.append_column(BLOCK_ID_COLUMN, pa.array(np.full(len(rows), block.block_id, dtype=np.int64)))
        table = table.append_column(ROW_IN_BLOCK_COLUMN, rows)
        if self._empty is None:
            self._empty = table.slice(0, 0)
        return table

    def _empty_table(self) -> pa.Table:
        """A 0-row table with the output schema, for steps where this worker has no rows.

        Taken from a block already read, else from the first file's footer.
        """
        if self._empty is None:
            file = self.blocks[0].file
            with fsio.open_input(file, self.storage_options) as f:
                table = pq.ParquetFile(f).schema_arrow.empty_table()
            if self.columns is not None:
                table = table.select(self.columns)
            empty = pa.array([], type=pa.int64())
            self._empty = table.append_column(BLOCK_ID_COLUMN, empty).append_column(ROW_IN_BLOCK_COLUMN, empty)
        return self._empty
