"""Read-ahead on a background thread: the next items are prepared while the current one is used.

Owns :func:`prefetch_iter` / :class:`PrefetchIterator` (run any iterable a
bounded number of items ahead on a daemon thread, in order, errors re-raised
in the consumer, stopped on close) and ``_Prefetcher``, the block read-ahead of
:class:`data_pipeline.streaming.StreamingReader`, with :class:`BlockReadError`.
:mod:`data_pipeline.streaming` re-exports the public names.
"""

from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import pyarrow as pa

if TYPE_CHECKING:  # annotations only: streaming imports this module
    from data_pipeline.streaming import BlockRef

__all__ = ["BlockReadError", "PrefetchIterator", "prefetch_iter"]

# How often a producer blocked on a full queue checks whether the consumer stopped.
_POLL_S = 0.05


class BlockReadError(RuntimeError):
    """Reading a block failed (raised in the consumer; the original error is ``__cause__``)."""


class _Done:
    """End-of-stream marker for :func:`prefetch_iter`."""


def prefetch_iter(items: Iterable[Any], depth: int, name: str = "batch-prefetch") -> "PrefetchIterator":
    """Run ``items`` (e.g. read + decode into tensors) on a background thread, ``depth`` items ahead.

    The thread starts at once, so an iterator made before it is needed (the next epoch's,
    made before validation) has its first items ready when the loop reaches them. The
    training step then overlaps the next batch's preparation (the GIL is released by
    Arrow, numpy and torch kernels). Order is preserved; an exception from ``items`` is
    re-raised in the consumer at the point it occurred; :meth:`PrefetchIterator.close`
    (also called at the end, on an error, and when the iterator is collected) stops the
    producer and closes ``items``. Read-ahead is bounded: ``depth`` items queued plus one
    being produced.
    """
    return PrefetchIterator(items, depth, name)


class PrefetchIterator:
    """The iterator :func:`prefetch_iter` returns; see there."""

    def __init__(self, items: Iterable[Any], depth: int, name: str = "batch-prefetch") -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._out: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._closed = False
        # The thread must not hold a reference to self: collecting an abandoned iterator closes it.
        self._thread = threading.Thread(target=_produce, args=(iter(items), self._out, self._stop), name=name, daemon=True)
        self._thread.start()

    def __iter__(self) -> "PrefetchIterator":
        return self

    def __next__(self) -> Any:
        if self._closed:
            raise StopIteration
        ok, item = self._out.get()
        if not ok:
            self.close()
            raise item
        if item is _Done:
            self.close()
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop the producer (it closes ``items``) and drop what it read ahead. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        # A producer waiting for queue space sees the flag within _POLL_S; an item in progress
        # finishes first. Don't wait forever on a stalled remote read (the daemon thread exits
        # by itself once the read returns). Draining after the join keeps a late put from
        # getting space and the producer from reading one more item.
        self._thread.join(timeout=10.0)
        while True:  # free prefetched items now rather than when the iterator is collected
            try:
                self._out.get_nowait()
            except queue.Empty:
                break

    def __del__(self) -> None:
        if hasattr(self, "_thread"):
            self.close()


def _produce(iterator: Iterator[Any], out: queue.Queue, stop: threading.Event) -> None:
    """The producer thread of :class:`PrefetchIterator`."""

    def put(item: Any) -> bool:
        # A timed put, so that a producer waiting on a full queue notices the consumer stopped.
        while not stop.is_set():
            try:
                out.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                pass
        return False

    try:
        for item in iterator:
            if not put((True, item)) or stop.is_set():
                return
        put((True, _Done))
    except BaseException as exc:  # handed to the consumer
        put((False, exc))
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()  # in this thread, the one that ran it: e.g. the reader's finally


class _Prefetcher:
    """Reads ``blocks`` in order on a background thread (:func:`prefetch_iter`), at most ``depth`` ahead.

    :meth:`next` hands them out in the same order; a read error is re-raised
    there as :class:`BlockReadError` naming the block, and nothing after it is read.
    :meth:`close` stops the thread (also when the consumer stops early).
    """

    def __init__(self, blocks: list[BlockRef], read: Callable[[BlockRef], pa.Table], depth: int) -> None:
        def reads() -> Iterator[tuple[BlockRef, Any]]:
            for block in blocks:
                try:
                    table: pa.Table | Exception = read(block)
                except Exception as exc:  # handed to the consumer with its block, who re-raises it
                    yield block, exc
                    return
                yield block, table

        self._items = prefetch_iter(reads(), depth, name="streaming-prefetch")

    def next(self, expected: BlockRef) -> pa.Table:
        block, result = next(self._items)
        if isinstance(result, Exception):
            raise BlockReadError(
                f"prefetch failed reading row group {block.row_group} of {block.file}: "
                f"{type(result).__name__}: {result}"
            ) from result
        if block != expected:  # the reader and the plan disagree on the read order: a bug here, not bad data
            raise RuntimeError(f"internal error: expected block {expected}, the prefetcher read {block}")
        return result

    def close(self) -> None:
        self._items.close()
