"""prefetch_iter / PrefetchIterator (data_pipeline.prefetch): the background thread that prepares the next batches.

The tests import them from data_pipeline.streaming, the path the trainer and the benchmarks use (re-exported there).
"""

from __future__ import annotations

import pytest


def test_prefetch_iter_preserves_order_and_ends():
    from data_pipeline.streaming import prefetch_iter

    assert list(prefetch_iter(iter(range(100)), depth=3)) == list(range(100))
    assert list(prefetch_iter([], depth=1)) == []


def test_prefetch_iter_reraises_the_producers_error_after_the_items_before_it():
    from data_pipeline.streaming import prefetch_iter

    def items():
        yield 1
        yield 2
        raise OSError("shard part-00003.parquet: truncated")

    got = []
    with pytest.raises(OSError, match="part-00003"):
        for x in prefetch_iter(items(), depth=2):
            got.append(x)
    assert got == [1, 2]


def test_prefetch_iter_stops_and_closes_the_source_when_the_consumer_stops():
    import threading

    from data_pipeline.streaming import prefetch_iter

    closed = threading.Event()
    produced = []

    def items():
        try:
            for i in range(10_000):
                produced.append(i)
                yield i
        finally:
            closed.set()

    it = prefetch_iter(items(), depth=2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()
    assert closed.wait(5), "the source generator was not closed"
    assert len(produced) < 10  # bounded read-ahead: it stopped, it did not drain the source
    assert list(it) == []  # closed: nothing more
    with pytest.raises(ValueError, match="depth"):
        next(prefetch_iter([1], depth=0))


def test_prefetch_iter_starts_producing_before_the_first_next():
    """The next epoch's iterator is made before validation: its first items must be ready by then."""
    import threading

    from data_pipeline.streaming import prefetch_iter

    produced = threading.Event()

    def items():
        produced.set()
        yield "first"

    it = prefetch_iter(items(), depth=1)
    assert produced.wait(5), "nothing was produced until next() was called"
    assert list(it) == ["first"]


def test_an_abandoned_prefetch_iterator_is_closed_when_collected():
    import gc
    import threading

    from data_pipeline.streaming import prefetch_iter

    closed = threading.Event()

    def items():
        try:
            yield from range(10_000)
        finally:
            closed.set()

    it = prefetch_iter(items(), depth=2)
    next(it)
    del it
    gc.collect()
    assert closed.wait(5), "the producer kept running after its iterator was dropped"
