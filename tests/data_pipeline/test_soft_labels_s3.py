"""The soft-label store against a real S3 API (a moto server on loopback, see the ``s3_server`` fixture)."""

from __future__ import annotations

import uuid

import pytest

from data_pipeline import fsio
from data_pipeline import soft_labels as sl
from data_pipeline.soft_labels import SoftLabelError, StoreSpec

from soft_label_helpers import DATASET, OTHER_TEACHER, TEACHER, encode, make_batch

pytestmark = pytest.mark.integration


@pytest.fixture
def s3_store(s3_server):
    """(store URL under a fresh prefix of the test bucket, storage_options)."""
    return f"s3://{s3_server['bucket']}/soft-labels-{uuid.uuid4().hex}", s3_server["storage_options"]


def test_store_on_s3_round_trip_resume_and_damage(s3_store):
    url, storage = s3_store
    spec = StoreSpec(num_items=3416, k=8, value_dtype="bf16", num_sampled=4, max_len=5)
    provenance = sl.make_provenance(spec, TEACHER, DATASET)
    batches = [make_batch(spec, 3, seed=0, first_seq=0), make_batch(spec, 2, seed=1, first_seq=3)]
    batches[1]["example_start"] += sum(len(t) for t in batches[0]["targets"])

    assert sl.committed_shards(url, provenance, storage) == {}
    first = sl.write_shard(url, 0, encode(batches[0]), provenance, row_group_size=2, storage_options=storage)
    # A resumed run sees shard 0 as done, and a run with another teacher does not.
    assert sorted(sl.committed_shards(url, provenance, storage)) == [0]
    assert sl.committed_shards(url, sl.make_provenance(spec, OTHER_TEACHER, DATASET), storage) == {}
    second = sl.write_shard(url, 1, encode(batches[1]), provenance, row_group_size=2, storage_options=storage)
    records = sl.committed_shards(url, provenance, storage)
    assert records == {0: first, 1: second}

    positions = first["positions"] + second["positions"]
    with pytest.raises(SoftLabelError, match="no shard holds seq_index 5..5"):
        sl.write_manifest(url, spec, provenance, [first, second], 6, positions, {}, storage_options=storage)
    manifest = sl.write_manifest(
        url, spec, provenance, [first, second], 5, positions, {"where": "s3"}, storage_options=storage
    )
    expected = dict(expect_teacher=TEACHER, expect_dataset=DATASET, expect_num_items=3416)
    assert sl.load_store_manifest(url, storage, **expected) == manifest
    assert sl.verify_store(url, storage)["num_positions"] == positions

    table = sl.read_shard(url, manifest, 1, storage, verify_checksum=True)
    decoded = sl.decode_positions(table, spec)
    assert decoded["sampled_counts"].sum(dim=1).eq(4).all()
    assert decoded["topk_ids"].shape == (second["positions"], 8)

    # Truncate shard 1 in place (one PUT of fewer bytes): both readers name it.
    shard = fsio.join(url, "part-00001.parquet")
    fs, path = fsio.get_fs(shard, storage)
    fs.pipe_file(path, fs.cat_file(path)[:100])
    with pytest.raises(SoftLabelError, match=r"has 100 bytes, the manifest says") as info:
        sl.read_shard(url, manifest, 1, storage)
    assert str(info.value).startswith(shard)
    with pytest.raises(SoftLabelError, match="1 of 2 shards are bad") as info:
        sl.verify_store(url, storage)
    assert "part-00001.parquet" in str(info.value) and "part-00000.parquet" not in str(info.value)
    # ...and a resumed run would rewrite it.
    assert sorted(sl.committed_shards(url, provenance, storage)) == [0]

    fsio.remove_file(shard, storage)
    with pytest.raises(SoftLabelError, match="shard listed in the manifest is missing"):
        sl.read_shard(url, manifest, 1, storage)


def test_missing_manifest_on_s3(s3_store):
    url, storage = s3_store
    with pytest.raises(SoftLabelError, match=r"holds no soft labels: manifest\.json is missing"):
        sl.load_store_manifest(url, storage)
