"""Prepare the real MovieLens files from ../shared/data and check the published counts.

The popularity check ties the whole pipeline (ingest, time order, split, train
counts) to the reference numbers in ../shared/data/README.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_pipeline.dataset import prepare_dataset, read_split, train_item_counts
from data_pipeline.config import DataConfig

pytestmark = [pytest.mark.integration, pytest.mark.realdata]

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="module")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not available: {SHARED_DATA} does not exist")
    return SHARED_DATA


@pytest.fixture(scope="module")
def ml1m(shared_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ml-1m"))
    cfg = DataConfig(path=str(shared_data / "ml-1m" / "ml-1m.txt"), format="sasrec")
    return out, prepare_dataset(cfg, out, seed=0)


def test_ml1m_counts(ml1m):
    out, manifest = ml1m
    assert (manifest["num_users"], manifest["num_items"], manifest["num_interactions"]) == (6040, 3416, 999_611)
    assert (manifest["dropped_users"], manifest["dropped_items"]) == (0, 0)
    for split in ("valid", "test"):
        table = read_split(out, split)
        assert table.num_rows == 6040 and table.column("target").null_count == 0
        assert table.column("user").to_pylist() == list(range(1, 6041))
    assert manifest["splits"]["train"]["num_positions"] == 999_611 - 2 * 6040


def test_ml1m_popularity_matches_the_reference(ml1m):
    """Popularity by training counts, ties pessimistic, test targets (README: 0.0369/0.0180, 0.0162/0.0079)."""
    out, manifest = ml1m
    counts = train_item_counts(out, manifest["num_items"])
    test = read_split(out, "test")
    target = test.column("target").to_numpy()
    history = test.column("history").combine_chunks()
    user = np.repeat(np.arange(len(target)), history.value_lengths().to_numpy())
    item = history.flatten().to_numpy()

    target_count = counts[target]
    sorted_counts = np.sort(counts[1:])
    # Items other than the target scoring at least as high (ties count against the target).
    rank_unfiltered = len(sorted_counts) - np.searchsorted(sorted_counts, target_count, side="left") - 1
    # Seen-filtered: also remove the distinct history items (other than the target) that were counted.
    pairs = np.unique(user * (manifest["num_items"] + 1) + item)
    u, i = pairs // (manifest["num_items"] + 1), pairs % (manifest["num_items"] + 1)
    counted = (i != target[u]) & (counts[i] >= target_count[u])
    rank_filtered = rank_unfiltered - np.bincount(u[counted], minlength=len(target))

    def hr_ndcg(rank):
        hit = rank < 10
        return hit.mean(), np.where(hit, 1 / np.log2(rank + 2), 0).mean()

    assert hr_ndcg(rank_filtered) == pytest.approx((0.0369, 0.0180), abs=1e-4)
    assert hr_ndcg(rank_unfiltered) == pytest.approx((0.0162, 0.0079), abs=1e-4)


def test_ml100k_counts(shared_data, tmp_path):
    cfg = DataConfig(path=str(shared_data / "ml-100k" / "u.data"), format="movielens_udata")
    manifest = prepare_dataset(cfg, str(tmp_path), seed=0)
    assert (manifest["num_users"], manifest["num_items"], manifest["num_interactions"]) == (943, 1682, 100_000)
    assert manifest["splits"]["test"]["num_rows"] == 943
    assert manifest["splits"]["train"]["num_positions"] == 100_000 - 2 * 943
