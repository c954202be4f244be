"""prepare_dataset and its readers: ordering, id maps, leave-one-out split, filters, manifest, integrity."""

from __future__ import annotations

import json
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from pathlib import Path

import pytest

from data_pipeline import dataset, fsio
from data_pipeline.dataset import load_manifest, prepare_dataset, read_split, train_item_counts
from data_pipeline.ingest import DataError
from data_pipeline.config import DataConfig, SyntheticConfig

# Users a and b survive; c has only 2 interactions and is dropped, and with it item q.
# a: w@1, y@3, x@3 (tie: y came first in the file) -> w y x
# b: z@1, y@2, x@5, x@9                            -> z y x x
HAND_MADE = b"""user_id,item_id,timestamp
b,x,5
a,y,3
b,z,1
a,x,3
a,w,1
b,y,2
b,x,9
c,q,1
c,x,2
"""


@pytest.fixture
def hand_made(tmp_path):
    path = tmp_path / "log.csv"
    path.write_bytes(HAND_MADE)
    cfg = DataConfig(path=str(path), format="csv")
    out = str(tmp_path / "data")
    return cfg, out, prepare_dataset(cfg, out, seed=0)


def small_synthetic(**overrides) -> DataConfig:
    synthetic = SyntheticConfig(num_users=20, num_items=30, num_clusters=3, min_length=4, max_length=8)
    return DataConfig(format="synthetic", synthetic=synthetic, **overrides)


# --------------------------------------------------------------------------------------
# Ordering, ids, split


def test_leave_one_out_split_on_a_hand_made_example(hand_made):
    _, out, _ = hand_made
    # Dense ids in sorted raw-id order: users a=1 b=2; items w=1 x=2 y=3 z=4.
    assert read_split(out, "train").to_pydict() == {"user": [1, 2], "items": [[1], [4, 3]]}
    assert read_split(out, "valid").to_pydict() == {"user": [1, 2], "history": [[1], [4, 3]], "target": [3, 2]}
    assert read_split(out, "test").to_pydict() == {"user": [1, 2], "history": [[1, 3], [4, 3, 2]], "target": [2, 2]}


def test_id_maps(hand_made):
    _, out, _ = hand_made
    assert pq.read_table(f"{out}/item_ids.parquet").to_pydict() == {"item": [1, 2, 3, 4], "raw_id": ["w", "x", "y", "z"]}
    assert pq.read_table(f"{out}/user_ids.parquet").to_pydict() == {"user": [1, 2], "raw_id": ["a", "b"]}
    assert pq.read_table(f"{out}/item_ids.parquet").schema.field("item").type == pa.int32()


def test_split_schemas_are_int32(hand_made):
    _, out, _ = hand_made
    for split, schema in dataset.SPLIT_SCHEMAS.items():
        assert read_split(out, split).schema == schema


def test_integer_raw_ids_are_numbered_numerically(tmp_path):
    path = tmp_path / "seq.txt"
    path.write_text("10 100\n10 20\n10 3\n9 3\n9 20\n9 100\n")
    out = str(tmp_path / "data")
    manifest = prepare_dataset(DataConfig(path=str(path), format="sasrec"), out, seed=0)
    assert pq.read_table(f"{out}/item_ids.parquet").column("raw_id").to_pylist() == ["3", "20", "100"]
    assert pq.read_table(f"{out}/user_ids.parquet").column("raw_id").to_pylist() == ["9", "10"]
    assert manifest["id_order"] == {"user": "numeric", "item": "numeric"}
    # user 9 (dense 1): 3 20 100 -> 1 2 3; user 10 (dense 2): 100 20 3 -> 3 2 1
    assert read_split(out, "test").to_pydict()["history"] == [[1, 2], [3, 2]]


def test_time_order_is_a_stable_sort(tmp_path):
    # Every timestamp ties except one: ties must keep file order.
    path = tmp_path / "u.data"
    path.write_text("1\t5\t1\t7\n1\t4\t1\t7\n1\t3\t1\t1\n1\t2\t1\t7\n1\t1\t1\t7\n")
    out = str(tmp_path / "data")
    prepare_dataset(DataConfig(path=str(path), format="movielens_udata"), out, seed=0)
    test = read_split(out, "test").to_pydict()
    assert test["history"][0] + test["target"] == [3, 5, 4, 2, 1]


def test_dense_ids_cover_one_to_n():
    cfg = small_synthetic()
    out = f"memory://dataset-{uuid.uuid4().hex}"
    try:
        manifest = prepare_dataset(cfg, out, seed=0)
        test = read_split(out, "test")
        seen = set(test.column("history").combine_chunks().flatten().to_pylist()) | set(test.column("target").to_pylist())
        assert seen == set(range(1, manifest["num_items"] + 1))
        assert test.column("user").to_pylist() == list(range(1, manifest["num_users"] + 1))
    finally:
        fsio.remove_tree(out)


# --------------------------------------------------------------------------------------
# Filters


def test_filters_iterate_until_stable(tmp_path):
    # Round 1 drops items 5 and 6 (seen once), which leaves user 3 with one item, so 3 goes;
    # round 2 then finds item 4 seen once and drops it; round 3 changes nothing.
    path = tmp_path / "seq.txt"
    path.write_text("1 1\n1 2\n1 3\n2 1\n2 2\n2 3\n2 4\n3 4\n3 5\n3 6\n")
    out = str(tmp_path / "data")
    cfg = DataConfig(path=str(path), format="sasrec", min_item_interactions=2)
    manifest = prepare_dataset(cfg, out, seed=0)
    assert (manifest["num_users"], manifest["num_items"], manifest["num_interactions"]) == (2, 3, 6)
    assert (manifest["dropped_users"], manifest["dropped_items"]) == (1, 3)
    assert manifest["filters"] == {"min_user_interactions": 3, "min_item_interactions": 2, "min_rating": None, "rounds": 3}


def test_nothing_left_after_filters_is_an_error_and_writes_no_manifest(tmp_path):
    path = tmp_path / "seq.txt"
    path.write_text("1 1\n1 2\n2 1\n")
    out = tmp_path / "data"
    with pytest.raises(DataError, match="no users left"):
        prepare_dataset(DataConfig(path=str(path), format="sasrec"), str(out), seed=0)
    assert not (out / "manifest.json").exists()


# --------------------------------------------------------------------------------------
# Manifest and shards


def test_manifest_contents(hand_made):
    cfg, out, manifest = hand_made
    with open(f"{out}/manifest.json") as f:
        assert json.load(f) == manifest
    assert manifest["schema_version"] == 1 and manifest["kind"] == "recdistill.dataset"
    assert manifest["source"] == cfg.path and manifest["format"] == "csv"
    assert (manifest["num_users"], manifest["num_items"], manifest["num_interactions"]) == (2, 4, 7)
    assert (manifest["dropped_users"], manifest["dropped_items"]) == (1, 1)
    assert len(manifest["fingerprint"]) == 64
    assert manifest["created_by"].startswith("recdistill ")
    # 2 and 1 training items: one history of >= 2 items (a training sequence); row groups of 64 (no plan's rule given).
    train = dict(manifest["splits"]["train"])
    assert train.pop("bytes") == [(Path(out) / "train" / "part-00000.parquet").stat().st_size]
    assert train == {"files": ["train/part-00000.parquet"], "rows": [2], "num_rows": 2, "num_positions": 3,
                     "row_group_size": 64, "num_sequences": 1}
    assert manifest["splits"]["valid"]["num_rows"] == 2
    assert manifest["splits"]["test"]["num_positions"] == 5
    assert load_manifest(out) == manifest


def test_fingerprint_depends_on_content_only(tmp_path, hand_made):
    cfg, _, manifest = hand_made
    again = prepare_dataset(cfg, str(tmp_path / "again"), seed=123)
    assert again["fingerprint"] == manifest["fingerprint"]

    changed = tmp_path / "changed.csv"
    changed.write_bytes(HAND_MADE.replace(b"a,w,1", b"a,w,4"))  # w moves after y and x
    other = prepare_dataset(cfg.model_copy(update={"path": str(changed)}), str(tmp_path / "changed"), seed=0)
    assert other["fingerprint"] != manifest["fingerprint"]


def test_shards_and_row_groups(tmp_path):
    out = str(tmp_path / "data")
    manifest = prepare_dataset(small_synthetic(rows_per_shard=7, row_group_size=3), out, seed=0)
    for split in dataset.SPLITS:
        entry = manifest["splits"][split]
        assert entry["files"] == [f"{split}/part-{i:05d}.parquet" for i in range(3)]
        assert entry["rows"] == [7, 7, 6] and entry["num_rows"] == 20
        assert pq.ParquetFile(f"{out}/{entry['files'][0]}").metadata.num_row_groups == 3
        assert read_split(out, split).column("user").to_pylist() == list(range(1, 21))
    train = read_split(out, "train")
    assert manifest["splits"]["train"]["num_positions"] == manifest["num_interactions"] - 2 * 20
    assert sum(len(x) for x in train.column("items").to_pylist()) == manifest["splits"]["train"]["num_positions"]

    # Preparing again with fewer shards leaves no stale shard behind.
    prepare_dataset(small_synthetic(), out, seed=0)
    assert sorted(p.name for p in (tmp_path / "data" / "train").iterdir()) == ["part-00000.parquet"]


def test_synthetic_manifest_records_seed_and_memory_urls_work():
    out = f"memory://dataset-{uuid.uuid4().hex}/run"
    try:
        manifest = prepare_dataset(small_synthetic(), out, seed=5)
        assert manifest["source"] == "synthetic" and manifest["seed"] == 5
        assert manifest["synthetic"]["num_users"] == 20
        assert load_manifest(out)["fingerprint"] == manifest["fingerprint"]
        assert read_split(out, "valid").num_rows == 20
    finally:
        fsio.remove_tree(out)


def test_failure_midway_leaves_no_manifest(tmp_path, monkeypatch):
    out = str(tmp_path / "data")
    cfg = small_synthetic()
    prepare_dataset(cfg, out, seed=0)  # an older, complete dataset in the same place
    real_write = fsio.write_parquet_atomic

    def failing_write(url, table, *args, **kwargs):
        if "/test/" in url:
            raise OSError("injected: disk full")
        real_write(url, table, *args, **kwargs)

    monkeypatch.setattr(fsio, "write_parquet_atomic", failing_write)
    with pytest.raises(OSError, match="injected"):
        prepare_dataset(cfg, out, seed=1)
    assert not (tmp_path / "data" / "manifest.json").exists()
    with pytest.raises(DataError, match="manifest.json is missing"):
        load_manifest(out)


def test_train_item_counts(hand_made):
    _, out, manifest = hand_made
    counts = train_item_counts(out, manifest["num_items"])
    assert counts.tolist() == [0, 1, 0, 1, 1]  # train: a=[w], b=[z, y]
    assert counts.shape == (manifest["num_items"] + 1,)


# --------------------------------------------------------------------------------------
# Readers refuse what they cannot trust


def test_load_manifest_errors_name_the_url(tmp_path, hand_made):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(DataError, match="nowhere.*not a prepared dataset"):
        load_manifest(missing)

    _, out, manifest = hand_made
    for change, fragment in (({"kind": "something.else"}, "kind"), ({"schema_version": 99}, "schema_version 99")):
        fsio.write_json_atomic(f"{out}/manifest.json", {**manifest, **change})
        with pytest.raises(DataError, match=fragment) as err:
            load_manifest(out)
        assert out in str(err.value)


def test_read_split_detects_missing_truncated_and_wrong_shards(tmp_path):
    out = tmp_path / "data"
    prepare_dataset(small_synthetic(rows_per_shard=7), str(out), seed=0)
    shard = out / "valid" / "part-00001.parquet"

    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"part-00001.parquet: shard has \d+ bytes, the manifest says \d+ \(truncated"):
        read_split(str(out), "valid")

    flipped = bytearray(data)
    column = pq.read_metadata(pa.BufferReader(data)).row_group(0).column(1)
    flipped[column.data_page_offset + column.total_compressed_size // 2] ^= 0x01  # same size: only the page CRC can tell
    shard.write_bytes(bytes(flipped))
    with pytest.raises(DataError, match="part-00001.parquet.*unreadable"):
        read_split(str(out), "valid")

    manifest = load_manifest(str(out))
    del manifest["splits"]["valid"]["bytes"]  # a dataset prepared before sizes were recorded: rows still checked
    pq.write_table(pq.read_table(out / "valid" / "part-00002.parquet"), shard)  # 6 rows where 7 belong
    with pytest.raises(DataError, match="part-00001.parquet: shard has 6 rows, the manifest says 7"):
        read_split(str(out), "valid", manifest=manifest)

    shard.unlink()
    with pytest.raises(DataError, match="part-00001.parquet.*missing"):
        read_split(str(out), "valid")

    assert read_split(str(out), "test").num_rows == 20  # other splits are unaffected
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        read_split(str(out), "dev")


def test_fsio_join_and_remove_tree_tolerate_edge_cases(tmp_path):
    assert fsio.join("memory://", "a", "b") == "memory://a/b"
    assert fsio.join("s3://bucket/run/", "/train", "x.parquet") == "s3://bucket/run/train/x.parquet"
    assert fsio.join("/tmp/x") == "/tmp/x"
    fsio.remove_tree(str(tmp_path / "absent"))
    fsio.remove_file(str(tmp_path / "absent.json"))
    fsio.remove_file(f"memory://absent-{uuid.uuid4().hex}/x.json")
    url = f"memory://fsio-{uuid.uuid4().hex}/obj.bin"
    fsio.atomic_write_bytes(url, b"abc")
    assert fsspec.open(url, "rb").open().read() == b"abc"
    fsio.remove_tree(url.rsplit("/", 1)[0])
    assert not fsio.exists(url)


def test_local_atomic_write_leaves_no_temp_files(tmp_path):
    fsio.atomic_write_bytes(str(tmp_path / "sub" / "f.bin"), b"x")
    fsio.write_json_atomic(str(tmp_path / "sub" / "m.json"), {"a": 1})
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["f.bin", "m.json"]
    assert fsio.read_json(str(tmp_path / "sub" / "m.json")) == {"a": 1}
