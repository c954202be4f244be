"""The soft-label store on disk: round trips, commit records and resume, manifest, integrity."""

from __future__ import annotations

import hashlib
import json
import logging
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from data_pipeline import fsio
from data_pipeline import soft_labels as sl
from data_pipeline.soft_labels import SoftLabelError, StoreSpec

from soft_label_helpers import DATASET, OTHER_TEACHER, TEACHER, encode, make_batch, small_spec


@pytest.fixture(params=["local", "memory"])
def store_url(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "soft_labels")
    else:
        url = f"memory://soft-labels-{uuid.uuid4().hex}/store"
        yield url
        fsio.remove_tree(url)


def write_store(url: str, spec: StoreSpec, rows_per_shard=(3, 4, 2), provenance=None) -> tuple[dict, list[dict]]:
    """Write shards of consecutive sequences plus the manifest; return (manifest, records)."""
    provenance = provenance or sl.make_provenance(spec, TEACHER, DATASET)
    records, first, example = [], 0, 0
    for index, rows in enumerate(rows_per_shard):
        table = encode(make_batch(spec, rows, seed=index, first_seq=first, example_start=example))
        records.append(sl.write_shard(url, index, table, provenance, row_group_size=2))
        first, example = first + rows, example + records[-1]["positions"]
    manifest = sl.write_manifest(url, spec, provenance, records, first, example, {"seconds": 1.5})
    return manifest, records


# --------------------------------------------------------------------------------------
# Round trips


def _rounded(values: np.ndarray, dtype: str) -> torch.Tensor:
    """What a stored float32 logit reads back as: the nearest value of the storage type."""
    x = torch.from_numpy(values)
    return {"fp16": x.half().float(), "bf16": x.bfloat16().float(), "fp32": x}[dtype]


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("num_items", [50, 70_000], ids=["uint16", "int32"])
def test_round_trip(store_url, dtype, num_items):
    spec = small_spec(value_dtype=dtype, num_items=num_items)
    batch = make_batch(spec, 5, seed=3, first_seq=0, example_start=0)
    provenance = sl.make_provenance(spec, TEACHER, DATASET)
    record = sl.write_shard(store_url, 0, encode(batch), provenance, row_group_size=2)
    positions = sum(len(t) for t in batch["targets"])
    assert record["rows"] == 5 and record["positions"] == positions
    assert (record["first_seq"], record["last_seq"]) == (0, 4)
    manifest = sl.write_manifest(store_url, spec, provenance, [record], 5, positions, {})

    table = sl.read_shard(store_url, manifest, 0, verify_checksum=True)
    assert table.schema == sl.soft_label_schema(spec)
    assert table.column("seq_index").to_pylist() == list(range(5))
    assert table.column("example_start").to_pylist() == batch["example_start"].tolist()
    assert table.column("user").to_pylist() == batch["users"].tolist()
    assert table.column("inputs").to_pylist() == [a.tolist() for a in batch["inputs"]]
    assert table.column("targets").to_pylist() == [a.tolist() for a in batch["targets"]]
    # Fixed-size lists of k per position, n positions per row.
    row0 = table.column("topk_ids")[0].as_py()
    assert len(row0) == spec.max_len and all(len(p) == spec.k for p in row0)

    decoded = sl.decode_positions(table, spec)
    assert decoded["topk_ids"].dtype == torch.int64 and decoded["topk_ids"].shape == (positions, spec.k)
    assert torch.equal(decoded["topk_ids"], torch.from_numpy(np.concatenate(batch["topk_ids"])))
    assert decoded["topk_logits"].dtype == torch.float32
    assert torch.equal(decoded["topk_logits"], _rounded(np.concatenate(batch["topk_logits"]), dtype))
    assert torch.equal(decoded["lse"], torch.from_numpy(np.concatenate(batch["lse"])))
    lengths = [len(t) for t in batch["targets"]]
    assert decoded["row_offsets"].tolist() == np.concatenate([[0], np.cumsum(lengths)]).tolist()


def test_shard_file_carries_provenance_and_checksum(tmp_path):
    spec = small_spec()
    url = str(tmp_path / "store")
    provenance = sl.make_provenance(spec, TEACHER, DATASET)
    record = sl.write_shard(url, 3, encode(make_batch(spec, 4)), provenance, row_group_size=2)
    path = tmp_path / "store" / "part-00003.parquet"
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["bytes"] == path.stat().st_size
    metadata = pq.read_metadata(path).metadata
    assert json.loads(metadata[b"recdistill.soft_labels.provenance"]) == provenance
    assert json.loads((tmp_path / "store" / "part-00003.json").read_text()) == record
    assert pq.read_metadata(path).row_group(0).num_rows == 2  # row_group_size honoured


def test_sampled_round_trip(store_url):
    spec = small_spec(num_sampled=12, value_dtype="bf16")
    batch = make_batch(spec, 4, seed=5)
    provenance = sl.make_provenance(spec, TEACHER, DATASET)
    record = sl.write_shard(store_url, 0, encode(batch), provenance, row_group_size=16)
    manifest = sl.write_manifest(store_url, spec, provenance, [record], 4, record["positions"], {})
    decoded = sl.decode_positions(sl.read_shard(store_url, manifest, 0, verify_checksum=True), spec)

    ids, counts, logits = (decoded[f"sampled_{name}"] for name in ("ids", "counts", "logits"))
    full = batch["full_logits"]
    # Per-position arrays in store order: flat[j][p] is (ids, counts, logits)[j] of position p.
    flat = [[x for row in batch["sampled"] for x in row[j]] for j in range(3)]
    assert ids.shape == counts.shape == logits.shape
    assert ids.shape[1] == max(len(a) for a in flat[0])
    for p in range(ids.shape[0]):
        d = len(flat[0][p])
        assert ids[p, :d].tolist() == flat[0][p].tolist() and not ids[p, d:].any()
        assert counts[p, :d].tolist() == flat[1][p].tolist() and not counts[p, d:].any()
        assert counts[p].sum() == spec.num_sampled
        # Raw logits of the drawn ids (float32, never rounded to the top-k dtype).
        assert torch.equal(logits[p, :d], full[p, ids[p, :d]])
    assert ids.dtype == torch.int64 and counts.dtype == torch.float32 and logits.dtype == torch.float32


# --------------------------------------------------------------------------------------
# Commit records and resume


def test_committed_shards_keeps_only_intact_shards_of_this_provenance(store_url, caplog):
    spec = small_spec()
    provenance = sl.make_provenance(spec, TEACHER, DATASET)
    other = sl.make_provenance(spec, OTHER_TEACHER, DATASET)
    for index in range(4):
        table = encode(make_batch(spec, 2, seed=index, first_seq=2 * index))
        sl.write_shard(store_url, index, table, other if index == 3 else provenance, row_group_size=8)
    fsio.remove_file(fsio.join(store_url, "part-00001.parquet"))  # crashed between... or deleted by hand
    fs, path = fsio.get_fs(fsio.join(store_url, "part-00002.parquet"))
    fs.pipe_file(path, fs.cat_file(path)[:-10])  # truncated
    fsio.atomic_write_bytes(fsio.join(store_url, "part-00004.json"), b"{not json")

    with caplog.at_level(logging.INFO, logger="data_pipeline.soft_labels"):
        done = sl.committed_shards(store_url, provenance)
    assert sorted(done) == [0]
    assert done[0]["provenance"] == provenance
    log = caplog.text
    assert "part-00003.json" in log and f"teacher_fingerprint {OTHER_TEACHER[:12]}" in log
    assert "part-00001.json: shard file is missing" in log
    assert "part-00002.json: shard file has" in log
    assert "part-00004.json: unreadable commit record" in log
    # Seen from the other teacher, only its own shard counts.
    assert sorted(sl.committed_shards(store_url, other)) == [3]


def test_rewriting_a_shard_replaces_its_record(store_url):
    spec = small_spec()
    old, new = (sl.make_provenance(spec, t, DATASET) for t in (OTHER_TEACHER, TEACHER))
    sl.write_shard(store_url, 0, encode(make_batch(spec, 2, seed=1)), old, row_group_size=8)
    record = sl.write_shard(store_url, 0, encode(make_batch(spec, 3, seed=2)), new, row_group_size=8)
    assert fsio.read_json(fsio.join(store_url, "part-00000.json")) == record
    assert sl.committed_shards(store_url, old) == {} and sl.committed_shards(store_url, new) == {0: record}


def test_remove_manifest_uncommits_the_store(store_url):
    write_store(store_url, small_spec(), rows_per_shard=(2,))
    sl.remove_manifest(store_url)
    with pytest.raises(SoftLabelError, match="manifest.json is missing"):
        sl.verify_store(store_url)
    sl.remove_manifest(store_url)  # idempotent


def test_committed_shards_logs_every_differing_provenance_key(tmp_path, caplog):
    spec = small_spec()
    mine = {**sl.make_provenance(spec, TEACHER, DATASET), "seed": 2}
    sl.write_shard(str(tmp_path), 0, encode(make_batch(spec, 2)), {**mine, "seed": 1}, row_group_size=8)
    with caplog.at_level(logging.INFO, logger="data_pipeline.soft_labels"):
        assert sl.committed_shards(str(tmp_path), mine) == {}
    assert "made with another seed 1 (this run: 2)" in caplog.text


def test_shard_encoding(tmp_path):
    # zstd everywhere; floats (and bf16 bit patterns) byte-stream-split, ids dictionary-encoded.
    spec = small_spec(value_dtype="bf16", num_sampled=3)
    sl.write_shard(str(tmp_path), 0, encode(make_batch(spec, 3)), sl.make_provenance(spec, TEACHER, DATASET), 8)
    row_group = pq.read_metadata(tmp_path / "part-00000.parquet").row_group(0)
    columns = {row_group.column(i).path_in_schema: row_group.column(i) for i in range(row_group.num_columns)}
    assert {c.compression for c in columns.values()} == {"ZSTD"}
    split = ("topk_logits.list.element.list.element", "lse.list.element", "sampled_logits.list.element.list.element")
    for path in split:
        assert "BYTE_STREAM_SPLIT" in columns[path].encodings, path
    assert "RLE_DICTIONARY" in columns["topk_ids.list.element.list.element"].encodings


def test_committed_shards_of_an_empty_store(store_url):
    assert sl.committed_shards(store_url, sl.make_provenance(small_spec(), TEACHER, DATASET)) == {}


# --------------------------------------------------------------------------------------
# Manifest


def _record(index, first, last, provenance, positions=10):
    return {"index": index, "file": sl.shard_name(index), "rows": last - first + 1, "positions": positions,
            "bytes": 100, "sha256": "0" * 64, "first_seq": first, "last_seq": last, "provenance": provenance}


@pytest.mark.parametrize(
    "ranges, num_sequences, message",
    [
        ([(0, 9), (12, 19)], 20, r"no shard holds seq_index 10\.\.11 \(hole before part-00001\.parquet\)"),
        ([(0, 9), (5, 19)], 20, r"part-00001\.parquet \(seq_index 5\.\.19\) overlaps"),
        ([(0, 9), (0, 9)], 10, r"overlaps"),
        ([(0, 9), (10, 19)], 25, r"no shard holds seq_index 20\.\.24"),
        ([(0, 9), (10, 19)], 15, r"shards hold seq_index up to 19, but num_sequences=15"),
        ([(3, 9)], 10, r"no shard holds seq_index 0\.\.2"),
    ],
)
def test_manifest_rejects_holes_and_overlaps(store_url, ranges, num_sequences, message):
    spec = small_spec()
    provenance = sl.make_provenance(spec, TEACHER, DATASET)
    records = [_record(i, a, b, provenance) for i, (a, b) in enumerate(ranges)]
    with pytest.raises(SoftLabelError, match=message):
        sl.write_manifest(store_url, spec, provenance, records, num_sequences, 10 * len(records), {})
    assert not fsio.exists(fsio.join(store_url, "manifest.json"))


def test_manifest_rejects_foreign_records_and_wrong_totals(store_url):
    spec = small_spec()
    provenance = sl.make_provenance(spec, TEACHER, DATASET)
    good = [_record(0, 0, 9, provenance), _record(1, 10, 19, provenance)]
    with pytest.raises(SoftLabelError, match="shards hold 20 positions, expected num_positions=21"):
        sl.write_manifest(store_url, spec, provenance, good, 20, 21, {})
    foreign = [good[0], _record(1, 10, 19, sl.make_provenance(spec, OTHER_TEACHER, DATASET))]
    with pytest.raises(SoftLabelError, match="part-00001.parquet has another provenance"):
        sl.write_manifest(store_url, spec, provenance, foreign, 20, 20, {})
    with pytest.raises(SoftLabelError, match="shard index listed twice: part-00000.parquet"):
        sl.write_manifest(store_url, spec, provenance, [good[0], _record(0, 10, 19, provenance)], 20, 20, {})
    assert not fsio.exists(fsio.join(store_url, "manifest.json"))


def test_manifest_contents(store_url):
    spec = small_spec(num_sampled=3)
    manifest, records = write_store(store_url, spec)
    assert sl.load_store_manifest(store_url) == manifest
    assert manifest["kind"] == "recdistill.soft_labels" and manifest["schema_version"] == sl.SCHEMA_VERSION
    assert (manifest["teacher_fingerprint"], manifest["dataset_fingerprint"]) == (TEACHER, DATASET)
    assert [manifest[key] for key in ("num_items", "k", "value_dtype", "id_dtype")] == [50, 4, "fp16", "uint16"]
    assert manifest["num_sampled"] == 3 and manifest["max_len"] == 6
    assert manifest["temperature_applied_at_training_time"] is True
    assert manifest["num_sequences"] == 9 and manifest["num_shards"] == 3
    assert manifest["num_positions"] == sum(r["positions"] for r in records)
    assert manifest["total_bytes"] == sum(r["bytes"] for r in records)
    assert [s["file"] for s in manifest["shards"]] == [r["file"] for r in records]
    assert set(manifest["shards"][0]) == {
        "index", "file", "rows", "positions", "bytes", "sha256", "first_seq", "last_seq"
    }
    assert manifest["extra"] == {"seconds": 1.5}
    assert manifest["provenance"] == sl.make_provenance(spec, TEACHER, DATASET)
    assert sl.bytes_per_position(manifest) == manifest["total_bytes"] / manifest["num_positions"]
    assert sl.raw_floor_bytes(spec) == 4 * (2 + 2)
    assert sl.raw_floor_bytes(small_spec(num_items=70_000)) == 4 * (4 + 2)

    text = sl.format_manifest(manifest)
    for fragment in (TEACHER[:12], DATASET[:12], "k=4", "fp16", "uint16", "3 draws", "shards:     3",
                     f"positions:  {manifest['num_positions']}", "bytes/position", "seconds: 1.5"):
        assert fragment in text
    assert TEACHER[:13] not in text


def test_load_store_manifest_errors(store_url):
    with pytest.raises(SoftLabelError, match=r"holds no soft labels: manifest\.json is missing"):
        sl.load_store_manifest(store_url)
    write_store(store_url, small_spec(), rows_per_shard=(2,))
    assert sl.load_store_manifest(store_url, expect_teacher=TEACHER, expect_dataset=DATASET, expect_num_items=50)

    with pytest.raises(SoftLabelError) as info:
        sl.load_store_manifest(store_url, expect_teacher=OTHER_TEACHER)
    assert f"made by teacher {TEACHER[:12]}… but this run's teacher is {OTHER_TEACHER[:12]}…" in str(info.value)
    with pytest.raises(SoftLabelError) as info:
        sl.load_store_manifest(store_url, expect_dataset="d4" * 32)
    assert f"dataset {DATASET[:12]}…" in str(info.value) and "d4d4d4d4d4d4…" in str(info.value)
    with pytest.raises(SoftLabelError, match="made by catalog size 50 but this run's catalog size is 51"):
        sl.load_store_manifest(store_url, expect_num_items=51)

    url = fsio.join(store_url, "manifest.json")
    manifest = fsio.read_json(url)
    fsio.write_json_atomic(url, {**manifest, "schema_version": 99})
    with pytest.raises(SoftLabelError, match="schema_version 99 is not supported"):
        sl.load_store_manifest(store_url)
    fsio.write_json_atomic(url, {**manifest, "kind": "recdistill.dataset"})
    with pytest.raises(SoftLabelError, match="kind is 'recdistill.dataset'"):
        sl.load_store_manifest(store_url)


# --------------------------------------------------------------------------------------
# Integrity


def _truncate(url):
    fs, path = fsio.get_fs(url)
    fs.pipe_file(path, fs.cat_file(path)[: fs.size(path) // 2])


def _flip(url):
    fs, path = fsio.get_fs(url)
    data = bytearray(fs.cat_file(path))
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    fs.pipe_file(path, bytes(data))


def _remove(url):
    fsio.remove_file(url)


@pytest.mark.parametrize(
    "damage, message",
    [
        (_truncate, r"has \d+ bytes, the manifest says \d+"),
        (_flip, r"sha256 is .*, the manifest says"),
        (_remove, "missing"),
    ],
)
def test_damaged_shards_are_detected(store_url, damage, message):
    spec = small_spec()
    manifest, _ = write_store(store_url, spec)
    assert sl.verify_store(store_url)["num_shards"] == 3
    bad = fsio.join(store_url, "part-00001.parquet")
    damage(bad)

    with pytest.raises(SoftLabelError, match=message) as info:
        sl.read_shard(store_url, manifest, 1, verify_checksum=True)
    assert str(info.value).startswith(bad)
    assert sl.read_shard(store_url, manifest, 0).num_rows == 3  # the others still read

    with pytest.raises(SoftLabelError, match=message) as info:
        sl.verify_store(store_url)
    assert "1 of 3 shards are bad" in str(info.value) and bad in str(info.value)
    assert "part-00000" not in str(info.value) and "part-00002" not in str(info.value)


def test_verify_store_lists_every_bad_shard(store_url):
    manifest, _ = write_store(store_url, small_spec())
    _truncate(fsio.join(store_url, "part-00000.parquet"))
    _flip(fsio.join(store_url, "part-00002.parquet"))
    with pytest.raises(SoftLabelError) as info:
        sl.verify_store(store_url)
    text = str(info.value)
    assert "2 of 3 shards are bad" in text and "part-00000.parquet" in text and "part-00002.parquet" in text
    summary_manifest = sl.load_store_manifest(store_url)
    assert summary_manifest == manifest


def test_read_shard_checks_rows_and_unknown_index(store_url):
    manifest, _ = write_store(store_url, small_spec(), rows_per_shard=(2, 3))
    with pytest.raises(SoftLabelError, match=r"part-00007\.parquet: shard 7 is not in the manifest"):
        sl.read_shard(store_url, manifest, 7)
    wrong = json.loads(json.dumps(manifest))
    wrong["shards"][1]["rows"] = 4
    with pytest.raises(SoftLabelError, match=r"part-00001\.parquet: shard has 3 rows, the manifest says 4"):
        sl.read_shard(store_url, wrong, 1)
    # A same-size, valid Parquet file that is not Parquet at all: unreadable, named.
    fs, path = fsio.get_fs(fsio.join(store_url, "part-00000.parquet"))
    fs.pipe_file(path, b"x" * manifest["shards"][0]["bytes"])
    with pytest.raises(SoftLabelError, match=r"part-00000\.parquet: shard is unreadable"):
        sl.read_shard(store_url, manifest, 0)


def test_write_shard_rejects_a_table_of_another_spec(tmp_path):
    table = encode(make_batch(small_spec(), 2))
    provenance = sl.make_provenance(small_spec(k=5), TEACHER, DATASET)
    with pytest.raises(SoftLabelError, match="part-00000.parquet: table schema does not match"):
        sl.write_shard(str(tmp_path), 0, table, provenance, row_group_size=8)
    assert not list(tmp_path.iterdir())


def test_store_layout_leaves_no_temporary_files(store_url):
    write_store(store_url, small_spec(), rows_per_shard=(2, 2))
    fs, root = fsio.get_fs(store_url)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
    assert names == ["manifest.json", "part-00000.json", "part-00000.parquet", "part-00001.json", "part-00001.parquet"]


def test_listing_refuses_a_shard_of_another_teacher_a_truncated_and_a_missing_one(tmp_path):
    from data_pipeline.streaming import StreamError, list_blocks

    spec = small_spec()
    url, other_url = str(tmp_path / "store"), str(tmp_path / "other")
    manifest, records = write_store(url, spec)
    write_store(other_url, spec, provenance=sl.make_provenance(spec, OTHER_TEACHER, DATASET))
    files = [fsio.join(url, r["file"]) for r in records]
    rows, sizes = [r["rows"] for r in records], [r["bytes"] for r in records]

    def check(file, footer):
        sl.check_shard_provenance(file, footer.metadata, manifest)

    assert sum(b.num_rows for b in list_blocks(files, None, rows, sizes, check)) == sum(rows)
    victim = tmp_path / "store" / records[1]["file"]
    victim.write_bytes((tmp_path / "other" / records[1]["file"]).read_bytes())  # same rows, another teacher
    with pytest.raises(SoftLabelError, match=f"{records[1]['file']}: shard was made with teacher_fingerprint"):
        list_blocks(files, None, rows, None, check)  # by its own provenance, even where sizes happen to agree
    data = victim.read_bytes()
    victim.write_bytes(data[:-10])
    with pytest.raises(StreamError, match=rf"{records[1]['file']}: {len(data) - 10} bytes, the manifest says {sizes[1]}"):
        list_blocks(files, None, rows, sizes, check)
    with pytest.raises(StreamError, match=f"{records[1]['file']}: not a readable Parquet file"):
        list_blocks(files, None, rows, None, check)
    victim.unlink()
    with pytest.raises(StreamError, match=f"{records[1]['file']}: listed in the manifest but missing"):
        list_blocks(files, None, rows, sizes, check)
