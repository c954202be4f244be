"""A seeded synthetic interaction log with learnable sequential structure.

Used by tests and tiny end-to-end runs, where it must reward a sequence model:
a ranking by popularity should be clearly worse than a model that looks at the
last item. The generative story:

* Item popularity follows a Zipf law: the item of popularity rank ``r`` has
  weight ``r ** -zipf_exponent``. Ranks are shuffled over item ids, so the id
  says nothing about popularity.
* Items are split at random into ``num_clusters`` clusters of (nearly) equal
  size. The clusters form one random cycle, which gives each cluster a
  *preferred successor*.
* A user's first item is drawn by global popularity. Each next item:
  with probability ``transition_prob`` it follows the cluster chain (the
  successor of the last item's cluster with probability ``successor_prob``,
  else the same cluster) and is drawn within that cluster by popularity;
  otherwise it is a globally popular item.
* A user re-draws (a few times) an item already consumed, so histories rarely
  repeat items, as in the MovieLens data.

All users advance one step at a time together, so generation is vectorised
over users and takes milliseconds for the default size.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from data_pipeline.config import SyntheticConfig
from data_pipeline.ingest import INTERACTIONS_SCHEMA
from data_pipeline.ratings import synthetic_ratings

# How often an already-consumed item is re-drawn before the repeat is accepted.
_REDRAWS = 8


class _World:
    """The hidden structure: item popularity and clusters, and samplers over them."""

    def __init__(self, cfg: SyntheticConfig, rng: np.random.Generator):
        n = cfg.num_items
        rank = rng.permutation(n) + 1  # popularity rank of item index i (0-based item index)
        self.weight = rank.astype(np.float64) ** -cfg.zipf_exponent
        self.cluster = np.empty(n, dtype=np.int64)
        self.cluster[rng.permutation(n)] = np.arange(n) % cfg.num_clusters

        order = rng.permutation(cfg.num_clusters)
        self.successor = np.empty(cfg.num_clusters, dtype=np.int64)
        self.successor[order] = np.roll(order, -1)

        self.global_cdf = np.cumsum(self.weight) / self.weight.sum()
        # Items grouped by cluster, with one cumulative distribution per cluster
        # laid end to end: cluster c's CDF runs from c to c+1. A draw within
        # cluster c is then a single searchsorted for c + u, for all users at once.
        self.by_cluster = np.argsort(self.cluster, kind="stable")
        cdf = np.empty(n, dtype=np.float64)
        clusters = self.cluster[self.by_cluster]
        weights = self.weight[self.by_cluster]
        for c in range(cfg.num_clusters):
            sel = clusters == c
            cdf[sel] = c + np.cumsum(weights[sel]) / weights[sel].sum()
        self.cluster_cdf = cdf

    def popular(self, rng: np.random.Generator, size: int) -> np.ndarray:
        index = np.searchsorted(self.global_cdf, rng.random(size), side="right")
        return np.minimum(index, len(self.global_cdf) - 1)

    def within(self, rng: np.random.Generator, clusters: np.ndarray) -> np.ndarray:
        index = np.searchsorted(self.cluster_cdf, clusters + rng.random(len(clusters)), side="right")
        return self.by_cluster[np.minimum(index, len(self.cluster_cdf) - 1)]


def generate_interactions(cfg: SyntheticConfig, seed: int, with_ratings: bool = False) -> pa.Table:
    """Generate a log with the columns of ``read_interactions``; the same ``(cfg, seed)`` gives the same table.

    Raw ids are decimal strings: users ``"1".."num_users"``, items ``"1".."num_items"``
    (items never drawn do not appear). ``timestamp`` is the position in the
    user's sequence; ``rating`` is null, or with ``with_ratings`` 1..5 stars
    (:func:`data_pipeline.ratings.synthetic_ratings`). Rows are grouped by user, in time order.
    """
    rng = np.random.default_rng(seed)
    world = _World(cfg, rng)
    num_users = cfg.num_users
    lengths = rng.integers(cfg.min_length, cfg.max_length + 1, size=num_users)
    seqs = np.zeros((num_users, cfg.max_length), dtype=np.int64)

    for t in range(cfg.max_length):
        active = np.flatnonzero(lengths > t)
        if t == 0:
            seqs[active, 0] = world.popular(rng, len(active))
            continue
        current = world.cluster[seqs[active, t - 1]]
        follow = rng.random(len(active)) < cfg.transition_prob
        to_successor = rng.random(len(active)) < cfg.successor_prob
        target = np.where(to_successor, world.successor[current], current)

        def draw(rows: np.ndarray) -> np.ndarray:
            """Next item for the users at positions ``rows`` of ``active`` (keeping their branch)."""
            items = world.popular(rng, len(rows))
            chain = follow[rows]
            items[chain] = world.within(rng, target[rows][chain])
            return items

        rows = np.arange(len(active))
        items = draw(rows)
        for _ in range(_REDRAWS):
            repeated = (seqs[active, :t] == items[:, None]).any(axis=1)
            if not repeated.any():
                break
            items[repeated] = draw(rows[repeated])
        seqs[active, t] = items

    user_index = np.repeat(np.arange(num_users), lengths)
    starts = np.cumsum(lengths) - lengths
    position = np.arange(int(lengths.sum())) - np.repeat(starts, lengths)
    items = seqs[user_index, position]
    return pa.Table.from_arrays(
        [
            pa.array((user_index + 1).astype(str)),
            pa.array((items + 1).astype(str)),
            pa.array(position.astype(np.int64)),
            pa.array(synthetic_ratings(user_index, items, world.cluster[items], seed)) if with_ratings
            else pa.nulls(len(items), pa.float64()),
        ],
        schema=INTERACTIONS_SCHEMA,
    )
