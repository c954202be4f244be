"""Prepared datasets for the rating task: levels, split columns aligned with the items, refusals with the fix."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from data_pipeline.config import DataConfig, SyntheticConfig
from data_pipeline.dataset import prepare_dataset, read_split
from data_pipeline.ingest import DataError
from data_pipeline.ratings import rating_levels


def udata(path, rows):
    path.write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))
    return DataConfig(path=str(path), format="movielens_udata")


def test_levels_number_the_distinct_values_in_order():
    values, levels = rating_levels(pa.array([4.0, 1.0, 5.0, 4.0, 2.5]), "x", "csv")
    assert values == [1.0, 2.5, 4.0, 5.0] and levels.tolist() == [3, 1, 4, 3, 2]


def test_rating_splits_keep_each_items_rating_in_time_order(tmp_path):
    # User 1 rates items 10, 20, 30, 40 at times 4, 1, 3, 2 -> time order 20, 40, 30, 10.
    rows = [(1, 10, 5, 4), (1, 20, 1, 1), (1, 30, 3, 3), (1, 40, 2, 2), (2, 10, 4, 1), (2, 20, 4, 2), (2, 30, 2, 3)]
    manifest = prepare_dataset(udata(tmp_path / "u.data", rows), str(tmp_path / "out"), seed=0, task="rating")
    assert manifest["task"] == "rating" and manifest["rating_values"] == [1.0, 2.0, 3.0, 4.0, 5.0]
    item = {10: 1, 20: 2, 30: 3, 40: 4}  # dense ids: numeric order
    train, valid, test = (read_split(str(tmp_path / "out"), s) for s in ("train", "valid", "test"))
    assert train.column("items").to_pylist() == [[item[20], item[40]], [item[10]]]
    assert train.column("levels").to_pylist() == [[1, 2], [4]]
    assert valid.column("target").to_pylist() == [item[30], item[20]] and valid.column("target_level").to_pylist() == [3, 4]
    assert test.column("history_levels").to_pylist() == [[1, 2, 3], [4, 4]]
    assert test.column("target_level").to_pylist() == [5, 2]
    # Same items with other ratings: another dataset.
    other = prepare_dataset(udata(tmp_path / "v.data", [(u, i, 6 - r if r != 3 else 3, t) for u, i, r, t in rows]),
                            str(tmp_path / "other"), seed=0, task="rating")
    plain = prepare_dataset(udata(tmp_path / "u.data", rows), str(tmp_path / "plain"), seed=0)
    assert len({manifest["fingerprint"], other["fingerprint"], plain["fingerprint"]}) == 3
    assert "levels" not in read_split(str(tmp_path / "plain"), "train").column_names and plain["task"] == "next_item"


def test_data_without_ratings_is_refused_with_the_fix(tmp_path):
    (tmp_path / "seq.txt").write_text("1 1\n1 2\n1 3\n2 1\n2 2\n2 3\n")
    with pytest.raises(DataError, match="the rating task needs ratings, and this data \\(sasrec\\) has none; use a format"):
        prepare_dataset(DataConfig(path=str(tmp_path / "seq.txt"), format="sasrec"), str(tmp_path / "out"), seed=0, task="rating")
    assert not (tmp_path / "out").exists()  # refused before anything was written
    (tmp_path / "log.csv").write_text("user_id,item_id,timestamp,stars\n1,a,1,5\n1,b,2,\n1,c,3,4\n")
    cfg = DataConfig(path=str(tmp_path / "log.csv"), format="csv", columns={"rating": "stars"})
    with pytest.raises(DataError, match="1 interactions have no rating \\(the first is row 2\\)"):
        prepare_dataset(cfg, str(tmp_path / "out2"), seed=0, task="rating")


def test_the_synthetic_rated_log_rewards_knowing_the_users_taste(tmp_path):
    cfg = DataConfig(synthetic=SyntheticConfig(num_users=600, num_items=80, num_clusters=8))
    manifest = prepare_dataset(cfg, str(tmp_path / "out"), seed=0, task="rating")
    assert manifest["rating_values"] == [1.0, 2.0, 3.0, 4.0, 5.0]
    test = read_split(str(tmp_path / "out"), "test")
    target = np.array(test.column("target_level").to_pylist(), dtype=float)
    user_mean = np.array([np.mean(h) for h in test.column("history_levels").to_pylist()])
    rmse_global = np.sqrt(np.mean((target - target.mean()) ** 2))
    rmse_user = np.sqrt(np.mean((target - user_mean) ** 2))
    assert rmse_user < rmse_global  # a user's own ratings say something about their next one
    assert len(set(target.tolist())) == 5
