"""The soft-label store in memory: spec and schema, encode validation, decode, sampling (no files)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from data_pipeline import soft_labels as sl
from data_pipeline.soft_labels import SoftLabelError, StoreSpec

from soft_label_helpers import encode, make_batch, small_spec


# --------------------------------------------------------------------------------------
# Spec and schema


def test_spec_picks_the_id_type_and_round_trips():
    assert small_spec(num_items=65535).id_dtype == "uint16"
    assert small_spec(num_items=65536).id_dtype == "int32"
    spec = small_spec(value_dtype="bf16", num_sampled=8)
    assert StoreSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(SoftLabelError, match="k must be in 1..num_items"):
        small_spec(k=51)
    with pytest.raises(SoftLabelError, match="value_dtype"):
        small_spec(value_dtype="fp8")


def test_augmented_rows_round_trip_and_carry_no_hard_target():
    plain = small_spec()
    spec = StoreSpec(**{**plain.to_dict(), "augmented_rows": True})
    # A plain store's spec reads as before the option existed (its provenance, its shards, stay valid).
    assert "augmented_rows" not in plain.to_dict() and StoreSpec.from_dict(plain.to_dict()) == plain
    assert StoreSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert "augmented" in sl.soft_label_schema(spec).names and "augmented" not in sl.soft_label_schema(plain).names
    batch = make_batch(spec, 4, lengths=[3, 2, 4, 1])
    augmented = np.array([False, False, True, True])
    batch["targets"] = [t if not a else np.zeros_like(t) for t, a in zip(batch["targets"], augmented)]
    table = encode({**batch, "augmented": augmented})
    assert table.column("augmented").to_pylist() == [False, False, True, True]
    decoded = sl.decode_positions(table, spec)
    assert decoded["augmented"].tolist() == [False] * 5 + [True] * 5
    with pytest.raises(SoftLabelError, match=r"targets of example \d+ \(seq_index 2, position 0\) are not 0, but its row is augmented"):
        bad = [t if i != 2 else np.ones_like(t) for i, t in enumerate(batch["targets"])]
        encode({**batch, "targets": bad, "augmented": augmented})
    with pytest.raises(SoftLabelError, match="targets of .* holds id 0"):  # a real row still needs real targets
        encode({**batch, "augmented": np.array([False, False, False, True])})
    with pytest.raises(SoftLabelError, match="augmented flags missing but the spec has augmented_rows=True"):
        encode(batch)
    with pytest.raises(SoftLabelError, match="augmented flags given but the spec has augmented_rows=False"):
        encode({**batch, "spec": plain, "augmented": augmented})


@pytest.mark.parametrize(
    "dtype, num_items, id_type, value_type",
    [
        ("fp16", 50, pa.uint16(), pa.float16()),
        ("bf16", 50, pa.uint16(), pa.uint16()),  # bfloat16 bit patterns
        ("fp32", 70_000, pa.int32(), pa.float32()),
    ],
)
def test_schema(dtype, num_items, id_type, value_type):
    schema = sl.soft_label_schema(small_spec(value_dtype=dtype, num_items=num_items))
    assert schema.field("topk_ids").type == pa.list_(pa.list_(id_type, 4))
    assert schema.field("topk_logits").type == pa.list_(pa.list_(value_type, 4))
    assert schema.field("lse").type == pa.list_(pa.float32())
    assert "sampled_ids" not in schema.names
    sampled = sl.soft_label_schema(small_spec(num_sampled=5, num_items=num_items))
    assert sampled.field("sampled_ids").type == pa.list_(pa.list_(id_type))
    assert sampled.field("sampled_counts").type == pa.list_(pa.list_(pa.uint16()))
    assert sampled.field("sampled_logits").type == pa.list_(pa.list_(pa.float32()))


def test_names():
    assert sl.shard_name(7) == "part-00007.parquet"
    assert sl.record_name(7) == "part-00007.json"


# --------------------------------------------------------------------------------------
# Decode and sampling


def test_decode_positions_of_a_slice():
    spec = small_spec(num_sampled=3)
    batch = make_batch(spec, 5, seed=1)
    table = encode(batch)
    whole = sl.decode_positions(table, spec)
    part = sl.decode_positions(table.slice(2, 2), spec)
    lo, hi = whole["row_offsets"][2].item(), whole["row_offsets"][4].item()
    assert part["row_offsets"].tolist() == (whole["row_offsets"][2:5] - lo).tolist()
    for key in ("topk_ids", "topk_logits", "lse"):
        assert torch.equal(part[key], whole[key][lo:hi])
    width = part["sampled_ids"].shape[1]
    assert torch.equal(part["sampled_ids"], whole["sampled_ids"][lo:hi, :width])


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_decode_positions_of_several_sliced_chunks_and_of_no_chunks(dtype):
    """A reader's step table is slices of several blocks: decoding it equals decoding the rows combined."""
    spec = small_spec(value_dtype=dtype)
    table = encode(make_batch(spec, 6, seed=2))
    pieces = pa.concat_tables([table.slice(4, 2), table.slice(0, 0), table.slice(1, 2)])
    assert pieces.column("topk_ids").num_chunks == 3
    got, want = sl.decode_positions(pieces, spec), sl.decode_positions(pieces.combine_chunks(), spec)
    assert got.keys() == want.keys()
    for key in got:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    empty = sl.decode_positions(pa.Table.from_batches([], table.schema), spec)  # a column with no chunks
    assert empty["topk_ids"].shape == (0, spec.k) and empty["topk_ids"].dtype == torch.int64
    assert empty["topk_logits"].shape == (0, spec.k) and empty["topk_logits"].dtype == torch.float32
    assert empty["lse"].shape == (0,) and empty["row_offsets"].tolist() == [0]


def test_sample_soft_labels():
    logits = torch.tensor([[50.0, 3.0, 0.0, -20.0], [1e9, 0.0, 0.0, 0.0]])  # column 0 is padding, never drawn
    ids, counts, values = sl.sample_soft_labels(logits, 200, torch.Generator().manual_seed(0))
    again = sl.sample_soft_labels(logits, 200, torch.Generator().manual_seed(0))
    assert all(np.array_equal(a, b) for x, y in zip((ids, counts, values), again) for a, b in zip(x, y))
    assert len(ids) == 2
    for p in range(2):
        assert ids[p].min() >= 1 and np.all(np.diff(ids[p]) > 0)  # distinct, increasing
        assert counts[p].sum() == 200
        assert np.array_equal(values[p], logits[p, ids[p]].numpy())
    # exp(3) / (exp(3) + 1 + exp(-20)): item 1 takes ~95% of the draws, item 3 essentially none.
    assert 170 < dict(zip(ids[0], counts[0]))[1] < 200
    assert set(ids[1]) == {1, 2, 3}


# --------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("column", ["topk_logits", "lse"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_name_the_example(column, bad):
    spec = small_spec()
    batch = make_batch(spec, 3, seed=2, first_seq=10, example_start=1000, lengths=[6, 4, 3])
    if column == "lse":
        batch["lse"][1][2] = bad
    else:
        batch["topk_logits"][1][2, -1] = bad  # last column: still sorted for -inf
    expected = batch["example_start"][1] + 2
    where = rf"part-00000\.parquet: {column} of example {expected} \(seq_index 11, position 2\)"
    with pytest.raises(SoftLabelError, match=where):
        encode(batch)


def test_non_finite_sampled_logits_name_the_example():
    spec = small_spec(num_sampled=4)
    batch = make_batch(spec, 2, seed=4, example_start=70, lengths=[3, 2])
    batch["sampled"][1][2][0][0] = np.nan  # row 1, position 0, first drawn id
    with pytest.raises(SoftLabelError, match=rf"sampled_logits of example {batch['example_start'][1]} "):
        encode(batch)


def _bad_k(b):
    b["topk_ids"][1] = b["topk_ids"][1][:, :-1]


def _bad_id_zero(b):
    b["topk_ids"][1][0, 1] = 0


def _bad_id_large(b):
    b["topk_ids"][0][1, 0] = 51


def _unsorted(b):
    b["topk_logits"][0][0] = b["topk_logits"][0][0][::-1].copy()


def _gap(b):
    b["seq_index"] = np.array([0, 1, 3])


def _overflow(b):
    b["topk_logits"][0][0, 0] = 1e6
    b["lse"][0][0] = 1e6 + 1


def _length(b):
    b["lse"][2] = b["lse"][2][:-1]


def _bad_target(b):
    b["targets"][2][0] = 0


def _low_lse(b):
    b["lse"][1][3] = b["topk_logits"][1][3, 0] - 1


@pytest.mark.parametrize(
    "damage, message",
    [
        (_bad_k, r"topk_ids of row 1 .* expected \(n, k=4\)"),
        (_bad_id_zero, r"topk_ids of example \d+ .* holds id 0, outside 1\.\.50"),
        (_bad_id_large, r"topk_ids of example 1 \(seq_index 0, position 1\) holds id 51"),
        (_unsorted, r"topk_logits of example 0 .* not sorted"),
        (_gap, r"seq_index must be consecutive"),
        (_overflow, r"overflow fp16"),
        (_length, r"lse of row 2 .* positions"),
        (_bad_target, r"targets of example \d+ .* holds id 0"),
        (_low_lse, r"lse of example 9 \(seq_index 1, position 3\) is .* below the top logit"),
    ],
)
def test_encode_rejects_bad_input(damage, message):
    batch = make_batch(small_spec(), 3, seed=6, lengths=[6, 4, 3])
    damage(batch)
    with pytest.raises(SoftLabelError, match=message) as info:
        encode(batch)
    assert "part-00000.parquet" in str(info.value)


def test_sampled_counts_must_add_up():
    spec = small_spec(num_sampled=4)
    batch = make_batch(spec, 2, seed=4)
    batch["sampled"][0][1][0][0] += 1
    with pytest.raises(SoftLabelError, match=r"sampled_counts of example 0 .* sum to 5"):
        encode(batch)
    batch = make_batch(small_spec(num_sampled=4), 2)
    batch["sampled"] = None
    with pytest.raises(SoftLabelError, match="sampled soft labels missing"):
        encode(batch)
