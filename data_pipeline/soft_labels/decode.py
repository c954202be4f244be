"""Decoding store rows into the per-position tensors a student trains on.

Owns :func:`decode_positions`: a table read back from the store (whole shard,
or slices of several blocks) -> flat ``torch`` tensors, bf16 bit patterns
turned back into floats and sampled labels padded into a grid.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from data_pipeline.soft_labels.encode import _offsets
from data_pipeline.soft_labels.spec import StoreSpec


def _flat_values(column: pa.ChunkedArray) -> pa.Array:
    """list<X> column -> X values of all rows in order (respecting slices)."""
    return column.combine_chunks().flatten() if column.num_chunks else pa.array([], column.type.value_type)


def _leaf_values(column: pa.ChunkedArray, levels: int, dtype: Any = None) -> np.ndarray:
    """The leaf values of a ``levels``-deep list column, in row order, as one new writable array.

    One copy: each chunk's values are viewed in place (slices respected) and concatenated
    with the cast to ``dtype`` (None keeps the stored type).
    """
    parts = []
    for chunk in column.chunks:
        for _ in range(levels):
            chunk = chunk.flatten()
        parts.append(chunk.to_numpy(zero_copy_only=False))
    if not parts:  # a column with no chunks at all
        leaf = column.type
        for _ in range(levels):
            leaf = leaf.value_type
        return np.zeros(0, dtype=dtype or leaf.to_pandas_dtype())
    return np.concatenate(parts, dtype=dtype)


def decode_positions(table: pa.Table, spec: StoreSpec) -> dict[str, torch.Tensor]:
    """Flatten a store table's R rows into per-position tensors (P = total positions).

    Returns ``topk_ids`` (P, k) int64, ``topk_logits`` (P, k) float32 (bf16
    decoded), ``lse`` (P,) float32, ``row_offsets`` (R+1,) int64 (positions of
    row r are ``row_offsets[r]:row_offsets[r+1]``), and with sampled labels
    ``sampled_ids`` (P, S) int64 0-padded, ``sampled_counts`` (P, S) float32
    0-padded, ``sampled_logits`` (P, S) float32 0-padded, where S is the most
    distinct ids at any position of this table (padding has count 0, so it
    carries no weight). A store with ``spec.augmented_rows`` adds ``augmented``
    (P,) bool: the position is in a teacher-labelled augmented row.
    """
    k = spec.k
    lengths = pc.list_value_length(table.column("lse")).to_numpy(zero_copy_only=False) if table.num_rows else []
    row_offsets = torch.from_numpy(_offsets(np.asarray(lengths, dtype=np.int64)))
    num_positions = int(row_offsets[-1])

    values = _leaf_values(table.column("topk_logits"), levels=2)
    if spec.value_dtype == "bf16":
        logits = torch.from_numpy(values.view(np.int16)).view(torch.bfloat16).float()
    else:  # torch widens float16 much faster than numpy
        logits = torch.from_numpy(values).float()
    out = {
        "topk_ids": torch.from_numpy(_leaf_values(table.column("topk_ids"), levels=2, dtype=np.int64)).reshape(num_positions, k),
        "topk_logits": logits.reshape(num_positions, k),
        "lse": torch.from_numpy(_leaf_values(table.column("lse"), levels=1, dtype=np.float32)),
        "row_offsets": row_offsets,
    }
    if spec.num_sampled > 0:
        per_position = _flat_values(table.column("sampled_ids"))  # list<ID>, one entry per position
        distinct = pc.list_value_length(per_position).to_numpy(zero_copy_only=False).astype(np.int64)
        width = int(distinct.max()) if len(distinct) else 0
        # Scatter the flat entries into a (P, S) grid: entry j of position p goes to column j.
        inner = _offsets(distinct)
        position_of = np.repeat(np.arange(num_positions), distinct)
        column_of = np.arange(int(inner[-1])) - inner[position_of]
        for name, dtype in (("sampled_ids", np.int64), ("sampled_counts", np.float32), ("sampled_logits", np.float32)):
            flat = _flat_values(table.column(name)).flatten().to_numpy(zero_copy_only=False)
            grid = np.zeros((num_positions, width), dtype=dtype)
            grid[position_of, column_of] = flat
            out[name] = torch.from_numpy(grid)
    if spec.augmented_rows:  # (P,) bool: the position belongs to an augmented row (soft labels, no hard target)
        rows = table.column("augmented").to_numpy(zero_copy_only=False).astype(bool)
        out["augmented"] = torch.from_numpy(np.repeat(rows, np.asarray(lengths, dtype=np.int64)))
    return out
