"""The synthetic generator: deterministic, well-formed, and rewarding a sequence model."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.ingest import INTERACTIONS_SCHEMA
from data_pipeline.synthetic import generate_interactions
from data_pipeline.config import SyntheticConfig

SMALL = SyntheticConfig(num_users=300, num_items=120, num_clusters=6, min_length=5, max_length=15)


def sequences(table) -> list[list[int]]:
    users = np.asarray(table.column("user").to_pylist(), dtype=np.int64)
    items = np.asarray(table.column("item").to_pylist(), dtype=np.int64)
    bounds = np.flatnonzero(np.diff(users)) + 1
    return [s.tolist() for s in np.split(items, bounds)]


def test_same_seed_same_table_different_seed_different_table():
    a = generate_interactions(SMALL, seed=1)
    assert a.equals(generate_interactions(SMALL, seed=1))
    assert not a.equals(generate_interactions(SMALL, seed=2))


def test_shape_ids_lengths_and_time():
    table = generate_interactions(SMALL, seed=0)
    assert table.schema == INTERACTIONS_SCHEMA
    assert table.column("rating").null_count == table.num_rows

    users = np.asarray(table.column("user").to_pylist(), dtype=np.int64)
    assert np.all(np.diff(users) >= 0), "rows are grouped by user"
    assert set(users.tolist()) == set(range(1, SMALL.num_users + 1))
    lengths = np.bincount(users)[1:]
    assert lengths.min() >= SMALL.min_length and lengths.max() <= SMALL.max_length

    items = np.asarray(table.column("item").to_pylist(), dtype=np.int64)
    assert items.min() >= 1 and items.max() <= SMALL.num_items
    # timestamp = position in the user's sequence
    expected = np.concatenate([np.arange(n) for n in lengths])
    assert np.array_equal(table.column("timestamp").to_numpy(), expected)


def test_users_rarely_repeat_items():
    seqs = sequences(generate_interactions(SMALL, seed=0))
    repeats = sum(len(s) - len(set(s)) for s in seqs)
    assert repeats / sum(map(len, seqs)) < 0.02


def test_single_cluster_and_equal_lengths_work():
    cfg = SyntheticConfig(num_users=10, num_items=5, num_clusters=1, min_length=4, max_length=4)
    table = generate_interactions(cfg, seed=3)
    assert table.num_rows == 40


def hit_rate_at_10(scores_for, seqs: list[list[int]], num_items: int) -> float:
    """Leave-last-out HR@10 with already-seen items removed from the ranking."""
    hits = 0
    for s in seqs:
        history, target = s[:-1], s[-1]
        scores = scores_for(history).astype(np.float64).copy()
        scores[0] = -np.inf
        scores[history] = -np.inf
        hits += target in np.argpartition(-scores, 10)[:10]
    return hits / len(seqs)


def test_last_item_model_clearly_beats_popularity():
    """The point of the generator: the next item depends on the last one."""
    cfg = SyntheticConfig()  # the default size used by tiny end-to-end runs
    seqs = sequences(generate_interactions(cfg, seed=0))
    n = cfg.num_items + 1
    popularity = np.zeros(n)
    transitions = np.zeros((n, n))
    for s in seqs:
        train = np.asarray(s[:-1])
        np.add.at(popularity, train, 1)
        np.add.at(transitions, (train[:-1], train[1:]), 1)

    pop = hit_rate_at_10(lambda h: popularity, seqs, n)
    markov = hit_rate_at_10(lambda h: transitions[h[-1]] + 1e-3 * popularity, seqs, n)
    assert markov > 1.5 * pop and markov - pop > 0.15, (markov, pop)


@pytest.mark.parametrize("bad", [dict(num_clusters=50, num_items=10), dict(min_length=10, max_length=5)])
def test_config_rejects_impossible_shapes(bad):
    with pytest.raises(ValueError):
        SyntheticConfig(**bad)
