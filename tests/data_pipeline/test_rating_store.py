"""Rating stores: the teacher's whole rating distribution per position, encoded, validated and decoded."""

import numpy as np
import pytest

from data_pipeline import soft_labels as sl


def rating_rows(lengths, num_levels=5, num_items=40, seed=0):
    """Per-row (inputs, targets, input levels, target levels, log-probs) of consistent rating sequences."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in lengths:
        items, levels = rng.integers(1, num_items + 1, n + 1), rng.integers(1, num_levels + 1, n + 1)
        logits = rng.normal(0, 2, (n, num_levels))
        log_probs = (logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))).astype(np.float32)
        rows.append((items[:-1], items[1:], levels[:-1], levels[1:], log_probs))
    return rows


def encode(spec, rows, **changes):
    columns = dict(zip(("inputs", "targets", "input_levels", "target_levels", "log_probs"), map(list, zip(*rows))))
    columns.update(changes)
    n = np.array([len(r[0]) for r in rows])
    return sl.encode_rating_rows(spec, seq_index=np.arange(len(rows)) + 7, users=np.arange(len(rows)),
                                 example_start=np.cumsum(n) - n, shard_name="part-00003.parquet", **columns)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_rating_rows_round_trip_through_the_store_schema(dtype):
    spec = sl.StoreSpec(num_items=40, k=5, value_dtype=dtype, num_sampled=0, max_len=10, num_levels=5)
    rows = rating_rows([3, 1, 6])
    table = encode(spec, rows)
    assert table.schema == sl.soft_label_schema(spec) == sl.rating_store_schema(spec)
    decoded = sl.decode_rating_positions(table.slice(1, 2), spec)  # a slice, as the reader hands out
    assert decoded["row_offsets"].tolist() == [0, 1, 7]
    expected = np.concatenate([rows[1][4], rows[2][4]])
    tolerance = {"fp32": 0, "fp16": 2e-3, "bf16": 2e-2}[dtype]
    np.testing.assert_allclose(decoded["log_probs"].numpy(), expected, atol=tolerance * 8, rtol=tolerance)
    assert table.column("target_levels").to_pylist()[2] == rows[2][3].tolist()


def test_a_rating_spec_differs_from_a_next_item_one_and_round_trips():
    spec = sl.StoreSpec(num_items=40, k=5, value_dtype="fp16", num_sampled=0, max_len=10, num_levels=5)
    assert spec.task == "rating" and spec.to_dict()["num_levels"] == 5
    assert sl.StoreSpec.from_dict(spec.to_dict()) == spec
    plain = sl.StoreSpec(num_items=40, k=5, value_dtype="fp16", num_sampled=0, max_len=10)
    assert plain.task == "next_item" and "num_levels" not in plain.to_dict()  # older stores' provenance unchanged
    with pytest.raises(sl.SoftLabelError, match="k must equal num_levels"):
        sl.StoreSpec(num_items=40, k=16, value_dtype="fp16", num_sampled=0, max_len=10, num_levels=5)


def test_bad_rating_rows_are_refused_naming_the_example():
    spec = sl.StoreSpec(num_items=40, k=5, value_dtype="fp32", num_sampled=0, max_len=10, num_levels=5)
    rows = rating_rows([3, 2])
    levels = [r[3].copy() for r in rows]
    levels[1][1] = 6  # a level outside 1..5
    with pytest.raises(sl.SoftLabelError, match=r"part-00003.parquet: target_levels of example 4 .*holds id 6, outside 1..5"):
        encode(spec, rows, target_levels=levels)
    unnormalised = [r[4].copy() for r in rows]
    unnormalised[0][2] += 1.0  # raw logits, not log-probabilities
    with pytest.raises(sl.SoftLabelError, match=r"log_probs of example 2 .*not 1"):
        encode(spec, rows, log_probs=unnormalised)
    broken = [r[4].copy() for r in rows]
    broken[1][0, 3] = np.nan
    with pytest.raises(sl.SoftLabelError, match=r"log_probs of example 3 .*NaN"):
        encode(spec, rows, log_probs=broken)


def test_a_rating_store_with_augmented_rows_marks_their_positions_and_requires_the_flags():
    spec = sl.StoreSpec(num_items=40, k=5, value_dtype="fp16", num_sampled=0, max_len=10, num_levels=5, augmented_rows=True)
    assert sl.StoreSpec.from_dict(spec.to_dict()) == spec and spec.to_dict()["augmented_rows"] is True
    rows = rating_rows([3, 1, 2])
    table = encode(spec, rows, augmented=np.array([False, True, True]))
    assert table.schema == sl.rating_store_schema(spec) and "augmented" in table.schema.names
    decoded = sl.decode_rating_positions(table, spec)
    assert decoded["augmented"].tolist() == [False] * 3 + [True] * 3
    assert sl.decode_rating_positions(table.slice(2, 1), spec)["augmented"].tolist() == [True, True]
    with pytest.raises(sl.SoftLabelError, match="augmented flags missing but the spec has augmented_rows=True"):
        encode(spec, rows)
    plain = sl.StoreSpec(num_items=40, k=5, value_dtype="fp16", num_sampled=0, max_len=10, num_levels=5)
    with pytest.raises(sl.SoftLabelError, match="augmented flags given"):
        encode(plain, rows, augmented=np.zeros(3, bool))
    with pytest.raises(sl.SoftLabelError, match="augmented has 2 rows"):
        encode(spec, rows, augmented=np.zeros(2, bool))
