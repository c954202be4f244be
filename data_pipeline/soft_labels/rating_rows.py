"""Rating stores (``run.task=rating``): encoding the teacher's rating distributions into store rows, and back.

A rating store is a soft-label store like any other (the same shards, commit records, manifest,
provenance and resume); only its rows differ (:func:`~data_pipeline.soft_labels.spec.rating_store_schema`):
R rating levels are few, so each position keeps the teacher's whole distribution as log-probabilities,
with no top-k and no log-normaliser.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from data_pipeline.soft_labels.encode import (_check_finite, _check_ids, _concat, _encode_values, _first_bad_position, _list,
                                              _offsets, _row_lengths)
from data_pipeline.soft_labels.spec import SoftLabelError, StoreSpec, rating_store_schema

# A distribution's probabilities must sum to 1 within this (log-probs stored in fp16 lose about 1e-3 each).
_NORMALISED_TOLERANCE = 2e-2


def encode_rating_rows(
    spec: StoreSpec,
    seq_index: np.ndarray,
    users: np.ndarray,
    example_start: np.ndarray,
    inputs: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    input_levels: Sequence[np.ndarray],
    target_levels: Sequence[np.ndarray],
    log_probs: Sequence[np.ndarray],
    shard_name: str,
    augmented: Optional[np.ndarray] = None,
) -> pa.Table:
    """Validate and encode R rows into a table of :func:`rating_store_schema`.

    Per row ``i`` with ``n_i`` positions: ``inputs[i]``, ``targets[i]`` (n_i,) item ids;
    ``input_levels[i]``, ``target_levels[i]`` (n_i,) rating levels in 1..num_levels;
    ``log_probs[i]`` (n_i, num_levels) the teacher's log-probabilities; ``augmented`` (R,) bool,
    required iff ``spec.augmented_rows``: the row is a teacher-labelled perturbed copy. Raises
    :class:`SoftLabelError` naming the shard and the example id of the first bad position:
    ids outside the catalog, levels outside 1..R, NaN/inf, distributions that do not sum to 1.
    """
    if not spec.num_levels:
        raise SoftLabelError(f"{shard_name}: encode_rating_rows needs a rating store's spec (num_levels > 0)")
    seq_index = np.asarray(seq_index, dtype=np.int64).reshape(-1)
    example_start = np.asarray(example_start, dtype=np.int64).reshape(-1)
    users = np.asarray(users, dtype=np.int64).reshape(-1)
    per_row = {"users": users, "example_start": example_start, "inputs": inputs, "targets": targets,
               "input_levels": input_levels, "target_levels": target_levels, "log_probs": log_probs}
    for name, values in per_row.items():
        if len(values) != len(seq_index):
            raise SoftLabelError(f"{shard_name}: {name} has {len(values)} rows but seq_index has {len(seq_index)}")
    if (augmented is not None) != spec.augmented_rows:
        raise SoftLabelError(f"{shard_name}: augmented flags {'given' if augmented is not None else 'missing'} "
                             f"but the spec has augmented_rows={spec.augmented_rows}")
    if augmented is not None:
        augmented = np.asarray(augmented, dtype=bool).reshape(-1)
        if len(augmented) != len(seq_index):
            raise SoftLabelError(f"{shard_name}: augmented has {len(augmented)} rows but seq_index has {len(seq_index)}")
    if len(seq_index) == 0:
        raise SoftLabelError(f"{shard_name}: no rows to encode")
    if np.any(np.diff(seq_index) != 1):
        raise SoftLabelError(f"{shard_name}: seq_index must be consecutive within a shard")
    n, offsets, loc = _row_lengths(shard_name, spec, seq_index, example_start, per_row,
                                   ("inputs", "input_levels", "target_levels", "log_probs"))
    R = spec.num_levels
    shapes = [np.shape(a) for a in log_probs]
    bad = [r for r, s in enumerate(shapes) if len(s) != 2 or s[1] != R]
    if bad:
        raise SoftLabelError(f"{shard_name}: log_probs of {loc.row(bad[0])} has shape {shapes[bad[0]]}, expected (n, {R})")

    flat_inputs, flat_targets = _concat(inputs, np.int64), _concat(targets, np.int64)
    flat_input_levels, flat_target_levels = _concat(input_levels, np.int64), _concat(target_levels, np.int64)
    flat_log_probs = _concat(log_probs, np.float32, (R,))
    _check_ids(flat_inputs, "inputs", spec.num_items, loc)
    _check_ids(flat_targets, "targets", spec.num_items, loc)
    _check_ids(flat_input_levels, "input_levels", R, loc)  # levels are 1..R, like ids 1..num_items
    _check_ids(flat_target_levels, "target_levels", R, loc)
    _check_finite(flat_log_probs, "log_probs", loc)
    total = np.exp(flat_log_probs.astype(np.float64)).sum(axis=1)
    first = _first_bad_position(np.abs(total - 1.0) > _NORMALISED_TOLERANCE)
    if first is not None:
        raise SoftLabelError(f"{shard_name}: log_probs of {loc.position(first)} sum to probability {total[first]:.4g}, "
                             "not 1: store log-softmax outputs (temperature 1)")
    columns = {
        "seq_index": pa.array(seq_index, pa.int64()),
        "user": pa.array(users.astype(np.int32), pa.int32()),
        "example_start": pa.array(example_start, pa.int64()),
        "inputs": _list(offsets, pa.array(flat_inputs.astype(np.int32)), shard_name),
        "targets": _list(offsets, pa.array(flat_targets.astype(np.int32)), shard_name),
        "input_levels": _list(offsets, pa.array(flat_input_levels.astype(np.uint8)), shard_name),
        "target_levels": _list(offsets, pa.array(flat_target_levels.astype(np.uint8)), shard_name),
        "log_probs": _list(offsets, pa.FixedSizeListArray.from_arrays(_encode_values(spec, flat_log_probs, loc, "log_probs"), R),
                           shard_name),
    }
    if augmented is not None:
        columns["augmented"] = pa.array(augmented, pa.bool_())
    return pa.Table.from_pydict(columns, schema=rating_store_schema(spec))


def decode_rating_positions(table: pa.Table, spec: StoreSpec) -> dict[str, torch.Tensor]:
    """A rating store table's rows as per-position tensors: ``log_probs`` (P, R) float32 and ``row_offsets`` (R+1,);
    a store with augmented rows adds ``augmented`` (P,) bool (the position is in a teacher-labelled perturbed row)."""
    lengths = pc.list_value_length(table.column("targets")).to_numpy(zero_copy_only=False) if table.num_rows else []
    row_offsets = torch.from_numpy(_offsets(np.asarray(lengths, dtype=np.int64)))
    column = table.column("log_probs").combine_chunks() if table.num_rows else None
    if column is None or len(column) == 0:
        values = np.zeros(0, np.float32)
    else:
        values = np.require(column.flatten().flatten().to_numpy(zero_copy_only=False), requirements="W")  # torch wants writable
    if spec.value_dtype == "bf16":
        log_probs = torch.from_numpy(values.view(np.int16)).view(torch.bfloat16).float()
    else:
        log_probs = torch.from_numpy(values).float()
    out = {"log_probs": log_probs.reshape(int(row_offsets[-1]), spec.num_levels), "row_offsets": row_offsets}
    if spec.augmented_rows:
        rows = table.column("augmented").to_numpy(zero_copy_only=False).astype(bool)
        out["augmented"] = torch.from_numpy(np.repeat(rows, np.asarray(lengths, dtype=np.int64)))
    return out
