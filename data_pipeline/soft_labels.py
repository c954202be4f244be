"""The soft-label store: the teacher's outputs at every training position, written once, read by students.

The teacher (a causal next-item Transformer) runs once over every training
sequence. At every position ``t`` it produces logits over the catalog (ids
``1..num_items``; 0 is padding). Per position the store keeps:

* the top-``k`` item ids and their raw logits, sorted by logit, descending;
* ``lse`` = logsumexp over the full catalog, so a student can turn stored
  logits into exact teacher log-probabilities (``logit - lse``) and knows the
  tail mass ``1 - sum(exp(topk - lse))`` that the top-k leaves out;
* optionally, sampled soft labels: ``num_sampled`` draws with replacement from
  the teacher's softmax at temperature 1, kept as distinct ids, how often each
  was drawn, and their raw logits (the logits give importance weights when the
  student distils at another temperature). Temperature is applied at training
  time and never baked into the store.

One ROW is one training sequence, because the teacher and the student both
process a sequence in one forward pass; per-position values are list columns
of length ``n`` (the row's number of positions). Layout under ``store_url``
(any fsspec URL)::

    part-00000.parquet   rows of soft_label_schema(spec); provenance in the key-value metadata
    part-00000.json      commit record of that shard, written after it (see write_shard)
    ...
    manifest.json        written LAST: the commit point of the whole store

A shard counts as done only once its commit record exists, and a store only
once its manifest exists, so an interrupted precompute resumes from its commit
records (:func:`committed_shards`) and readers never see a half-made store.
Readers trust shards only through the manifest, which records each shard's
size and sha256 (:func:`read_shard`, :func:`verify_store`).

Ids are stored as ``uint16`` when the catalog fits (``num_items <= 65535``),
else ``int32``. Logits are stored as ``float16`` (fp16), ``float32`` (fp32), or
for bf16 as the raw bfloat16 bit pattern in ``uint16`` (Arrow has no bfloat16;
:func:`decode_positions` turns it back with ``torch.Tensor.view(torch.bfloat16)``).
``lse`` and sampled logits are always ``float32``: ``lse`` is one value per
position and needs the precision, since every probability is computed against it.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import logging
import math
import re
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from data_pipeline import fsio

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
KIND = "recdistill.soft_labels"
MANIFEST = "manifest.json"
# Key of the provenance JSON in each Parquet file's key-value metadata.
PROVENANCE_KEY = b"recdistill.soft_labels.provenance"
VALUE_DTYPES = ("fp16", "bf16", "fp32")
# Parquet encoding of the shards, chosen by measurement on the ML-1M teacher (600 training sequences, 67k
# positions, k=64, 3416 items so uint16 ids, fp16 logits). Bytes per position, all columns included (inputs,
# targets, lse...); the raw floor of k ids + k fp16 values alone is 256:
#   pyarrow defaults (dictionary everywhere), uncompressed            212.4
#   pyarrow defaults, snappy                                          202.8
#   pyarrow defaults, zstd level 3                                    191.3
#   BYTE_STREAM_SPLIT for float columns, dictionary otherwise, zstd 3 167.2   <- chosen (242.1 uncompressed;
#                                                                            zstd 9 is no smaller, only slower)
#   of which topk_ids ~90, topk_logits ~70, lse ~3, inputs + targets ~3.5. (bf16 logits: ~133; fp32: ~260.)
# Dictionary encoding packs the ids into ~12 bits (3416 distinct values); splitting each float's bytes into
# separate streams lets zstd squeeze the repetitive sign/exponent bytes, which dictionary encoding cannot.
COMPRESSION = "zstd"
COMPRESSION_LEVEL = 3
# Parquet BYTE_STREAM_SPLIT covers float16 (FIXED_LEN_BYTE_ARRAY) and int32 only from Arrow 16 on (GH-39978);
# older pyarrow splits just float32 columns (and cannot read files whose fp16/bf16 logits are split).
_SPLIT_ANY_WIDTH = int(pa.__version__.split(".")[0]) >= 16
PROVENANCE_FIELDS = ("teacher_fingerprint", "dataset_fingerprint", "schema_version", "spec")

_SHARD_RE = re.compile(r"part-(\d{5,})\.json$")


class SoftLabelError(ValueError):
    """A problem with soft labels; the message names the shard file, example id or key at fault."""


def _version() -> str:
    try:
        return metadata.version("recdistill")
    except metadata.PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------------------
# Spec and schema


@dataclass(frozen=True)
class StoreSpec:
    """What a store holds; everything needed to build its schema and decode it.

    ``num_items``: catalog size (ids 1..num_items). ``k``: top-k entries per
    position. ``value_dtype``: "fp16" | "bf16" | "fp32" for the top-k logits.
    ``num_sampled``: draws per position for sampled soft labels (0 = none).
    ``max_len``: the teacher's maximum sequence length (positions per row <= max_len).
    """

    num_items: int
    k: int
    value_dtype: str
    num_sampled: int
    max_len: int

    def __post_init__(self) -> None:
        if self.num_items < 1:
            raise SoftLabelError(f"num_items must be >= 1, got {self.num_items}")
        if not 1 <= self.k <= self.num_items:
            raise SoftLabelError(f"k must be in 1..num_items ({self.num_items}), got {self.k}")
        if self.value_dtype not in VALUE_DTYPES:
            raise SoftLabelError(f"value_dtype must be one of {', '.join(VALUE_DTYPES)}, got {self.value_dtype!r}")
        # Draw counts are stored as uint16, so one item can be drawn at most 65535 times.
        if not 0 <= self.num_sampled <= np.iinfo(np.uint16).max:
            raise SoftLabelError(f"num_sampled must be in 0..65535, got {self.num_sampled}")
        if self.max_len < 1:
            raise SoftLabelError(f"max_len must be >= 1, got {self.max_len}")

    @property
    def id_dtype(self) -> str:
        """"uint16" when every id 0..num_items fits in 16 bits, else "int32"."""
        return "uint16" if self.num_items <= np.iinfo(np.uint16).max else "int32"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StoreSpec":
        names = ("num_items", "k", "value_dtype", "num_sampled", "max_len")
        missing = [n for n in names if n not in d]
        if missing:
            raise SoftLabelError(f"store spec lacks {', '.join(missing)}: {d!r}")
        return cls(**{n: d[n] for n in names})

    @classmethod
    def from_config(cls, precompute: Any, num_items: int, max_len: int) -> "StoreSpec":
        """From a :class:`distill.config.PrecomputeConfig` plus the catalog size and the teacher's max_len."""
        return cls(num_items, precompute.k, precompute.dtype, precompute.num_sampled, max_len)


def _id_arrow_type(spec: StoreSpec) -> pa.DataType:
    return pa.uint16() if spec.id_dtype == "uint16" else pa.int32()


def _value_arrow_type(spec: StoreSpec) -> pa.DataType:
    # bf16 travels as its bit pattern: Arrow and Parquet have no bfloat16 type.
    return {"fp16": pa.float16(), "fp32": pa.float32(), "bf16": pa.uint16()}[spec.value_dtype]


def soft_label_schema(spec: StoreSpec) -> pa.Schema:
    """The Arrow schema of one store row (one training sequence with ``n`` positions).

    ============== ==================================== =========================================
    column         type                                 per row
    ============== ==================================== =========================================
    seq_index      int64                                index in the global sequence order
    user           int32                                dense user id
    example_start  int64                                example id of position 0 (then +1 each)
    inputs         list<int32>                          (n,) input item ids, oldest first
    targets        list<int32>                          (n,) next item at each position
    topk_ids       list<fixed_size_list<ID, k>>         (n, k) ids, by logit descending
    topk_logits    list<fixed_size_list<VAL, k>>        (n, k) raw logits
    lse            list<float32>                        (n,) logsumexp over the whole catalog
    sampled_ids    list<list<ID>>        (sampled only) (n, distinct_t) distinct drawn ids
    sampled_counts list<list<uint16>>    (sampled only) (n, distinct_t) draws of each id
    sampled_logits list<list<float32>>   (sampled only) (n, distinct_t) raw logits of those ids
    ============== ==================================== =========================================

    ID is uint16 or int32 (``spec.id_dtype``); VAL is float16, float32, or uint16
    holding bfloat16 bits (``spec.value_dtype``).
    """
    ids = _id_arrow_type(spec)
    fields = [
        ("seq_index", pa.int64()),
        ("user", pa.int32()),
        ("example_start", pa.int64()),
        ("inputs", pa.list_(pa.int32())),
        ("targets", pa.list_(pa.int32())),
        ("topk_ids", pa.list_(pa.list_(ids, spec.k))),
        ("topk_logits", pa.list_(pa.list_(_value_arrow_type(spec), spec.k))),
        ("lse", pa.list_(pa.float32())),
    ]
    if spec.num_sampled > 0:
        fields += [
            ("sampled_ids", pa.list_(pa.list_(ids))),
            ("sampled_counts", pa.list_(pa.list_(pa.uint16()))),
            ("sampled_logits", pa.list_(pa.list_(pa.float32()))),
        ]
    return pa.schema(fields)


def make_provenance(spec: StoreSpec, teacher_fingerprint: str, dataset_fingerprint: str) -> dict[str, Any]:
    """The provenance a store's shards and manifest carry: which teacher, which dataset, which layout."""
    return {
        "teacher_fingerprint": teacher_fingerprint,
        "dataset_fingerprint": dataset_fingerprint,
        "schema_version": SCHEMA_VERSION,
        "spec": spec.to_dict(),
    }


def _check_provenance(provenance: dict[str, Any], where: str) -> StoreSpec:
    missing = [key for key in PROVENANCE_FIELDS if key not in provenance]
    if missing:
        raise SoftLabelError(f"{where}: provenance lacks {', '.join(missing)} (use make_provenance)")
    return StoreSpec.from_dict(provenance["spec"])


def shard_name(index: int) -> str:
    """File name of shard ``index``: ``shard_name(7) == "part-00007.parquet"``."""
    return f"part-{index:05d}.parquet"


def record_name(index: int) -> str:
    """File name of shard ``index``'s commit record: ``record_name(7) == "part-00007.json"``."""
    return f"part-{index:05d}.json"


# --------------------------------------------------------------------------------------
# Encode


def _lengths(arrays: Sequence[Any]) -> np.ndarray:
    # map(len) iterates in C; this is per row (or per position for sampled lists), not a Python-level loop body.
    return np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))


def _offsets(lengths: np.ndarray) -> np.ndarray:
    """(n,) lengths -> (n+1,) int64 offsets starting at 0."""
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _concat(arrays: Sequence[np.ndarray], dtype: Any, tail_shape: tuple[int, ...] = ()) -> np.ndarray:
    """Concatenate along axis 0 (one C call, whatever the number of arrays) and cast."""
    if len(arrays) == 0:
        return np.zeros((0, *tail_shape), dtype=dtype)
    return np.concatenate(arrays).astype(dtype, copy=False)


class _Locator:
    """Names a flat position for error messages: its example id, row's seq_index and position in the row."""

    def __init__(self, shard: str, seq_index: np.ndarray, example_start: np.ndarray, offsets: np.ndarray):
        self.shard, self.seq_index, self.example_start, self.offsets = shard, seq_index, example_start, offsets

    def position(self, p: int) -> str:
        row = int(np.searchsorted(self.offsets, p, side="right") - 1)
        t = int(p - self.offsets[row])
        return f"example {int(self.example_start[row]) + t} (seq_index {int(self.seq_index[row])}, position {t})"

    def row(self, r: int) -> str:
        return f"row {r} (seq_index {int(self.seq_index[r])}, example_start {int(self.example_start[r])})"


def _first_bad_position(bad: np.ndarray) -> Optional[int]:
    """Index of the first position with any True in ``bad`` ((P,) or (P, ...)), or None."""
    per_position = bad.reshape(len(bad), -1).any(axis=1) if bad.ndim > 1 else bad
    hits = np.flatnonzero(per_position)
    return int(hits[0]) if len(hits) else None


def _check_finite(values: np.ndarray, what: str, loc: _Locator, position_of: Optional[np.ndarray] = None) -> None:
    """SoftLabelError naming the first position whose ``values`` hold NaN/inf.

    ``values`` is (P, ...) per position, or flat with ``position_of`` mapping each entry to its position.
    """
    bad = ~np.isfinite(values)
    first = _first_bad_position(bad)
    if first is not None:
        p = first if position_of is None else int(position_of[first])
        raise SoftLabelError(
            f"{loc.shard}: {what} of {loc.position(p)} is NaN or infinite; the teacher output is broken"
        )


def _check_ids(
    ids: np.ndarray, what: str, num_items: int, loc: _Locator, position_of: Optional[np.ndarray] = None
) -> None:
    """SoftLabelError naming the first position with an id outside 1..num_items.

    ``ids`` is (P,) or (P, k) per position, or flat with ``position_of`` as in :func:`_check_finite`.
    """
    bad = (ids < 1) | (ids > num_items)
    first = _first_bad_position(bad)
    if first is not None:
        p = first if position_of is None else int(position_of[first])
        row_ids, row_bad = ids.reshape(len(ids), -1)[first], bad.reshape(len(bad), -1)[first]
        raise SoftLabelError(
            f"{loc.shard}: {what} of {loc.position(p)} holds id {int(row_ids[row_bad][0])}, outside 1..{num_items}"
        )


def _encode_values(spec: StoreSpec, logits: np.ndarray, loc: _Locator) -> pa.Array:
    """(P, k) float32 logits -> flat Arrow array of the store's value type (P*k,)."""
    if spec.value_dtype == "fp32":
        return pa.array(logits.reshape(-1))
    if spec.value_dtype == "fp16":
        with np.errstate(over="ignore"):  # reported below, with the example id
            encoded = logits.astype(np.float16)
        check = encoded
    else:
        # torch rounds float32 -> bfloat16 to nearest-even; keep the 16 bits.
        bf16 = torch.from_numpy(np.ascontiguousarray(logits)).to(torch.bfloat16)
        encoded = bf16.view(torch.int16).numpy().view(np.uint16)
        check = bf16.float().numpy()
    # The input was finite (checked before), so a non-finite value here is an overflow of the narrow type.
    first = _first_bad_position(~np.isfinite(check))
    if first is not None:
        raise SoftLabelError(
            f"{loc.shard}: topk_logits of {loc.position(first)} overflow {spec.value_dtype} "
            f"(max |logit| {float(np.abs(logits[first]).max()):.4g}); store fp32 instead"
        )
    return pa.array(encoded.reshape(-1))


def _list(offsets: np.ndarray, values: pa.Array, shard: str) -> pa.Array:
    """list<X> array from (n+1,) offsets into ``values`` (Arrow lists use int32 offsets)."""
    if offsets[-1] > np.iinfo(np.int32).max:
        raise SoftLabelError(f"{shard}: {offsets[-1]} list entries exceed Arrow's int32 offsets; lower rows_per_shard")
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)


def encode_rows(
    spec: StoreSpec,
    seq_index: np.ndarray,
    users: np.ndarray,
    example_start: np.ndarray,
    inputs: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    topk_ids: Sequence[np.ndarray],
    topk_logits: Sequence[np.ndarray],
    lse: Sequence[np.ndarray],
    sampled: Optional[Sequence[tuple[Sequence[np.ndarray], Sequence[np.ndarray], Sequence[np.ndarray]]]],
    shard_name: str,
) -> pa.Table:
    """Validate and encode R sequences into a table of :func:`soft_label_schema`.

    Per row ``i`` with ``n_i`` positions: ``inputs[i]``, ``targets[i]``: (n_i,)
    int item ids; ``topk_ids[i]``: (n_i, k) int; ``topk_logits[i]``: (n_i, k)
    float32 raw logits sorted descending along k; ``lse[i]``: (n_i,) float32,
    logsumexp of the raw logits over ids 1..num_items (padding excluded).
    ``seq_index``, ``users``, ``example_start``: (R,); ``seq_index`` must be
    consecutive (a shard is a contiguous slice of the global order, which is
    what lets the manifest check coverage from first/last seq alone).
    ``sampled`` is required iff ``spec.num_sampled > 0``: per row a tuple
    ``(ids, counts, logits)`` of n_i per-position arrays (d_t,) each, as
    returned by :func:`sample_soft_labels` sliced to the row.

    ``shard_name`` only labels error messages. Raises :class:`SoftLabelError`
    naming the shard and the example id (``example_start + t``) of the first
    bad position: NaN/inf logits or lse, ids outside 1..num_items, wrong k,
    unsorted top-k, lse below the top logit, logits overflowing fp16/bf16,
    sampled counts not summing to ``num_sampled``.
    """
    seq_index = np.asarray(seq_index, dtype=np.int64).reshape(-1)
    users = np.asarray(users, dtype=np.int64).reshape(-1)
    example_start = np.asarray(example_start, dtype=np.int64).reshape(-1)
    num_rows = len(seq_index)
    per_row = {"users": users, "example_start": example_start, "inputs": inputs, "targets": targets,
               "topk_ids": topk_ids, "topk_logits": topk_logits, "lse": lse}
    if sampled is not None:
        per_row["sampled"] = sampled
    for name, values in per_row.items():
        if len(values) != num_rows:
            raise SoftLabelError(f"{shard_name}: {name} has {len(values)} rows but seq_index has {num_rows}")
    if num_rows == 0:
        raise SoftLabelError(f"{shard_name}: no rows to encode")
    if (sampled is not None) != (spec.num_sampled > 0):
        raise SoftLabelError(
            f"{shard_name}: sampled soft labels {'given' if sampled is not None else 'missing'} "
            f"but the spec has num_sampled={spec.num_sampled}"
        )
    if num_rows > 1 and np.any(np.diff(seq_index) != 1):
        r = int(np.flatnonzero(np.diff(seq_index) != 1)[0])
        raise SoftLabelError(
            f"{shard_name}: seq_index must be consecutive within a shard, but row {r + 1} has "
            f"{int(seq_index[r + 1])} after {int(seq_index[r])}"
        )
    if seq_index[0] < 0:
        raise SoftLabelError(f"{shard_name}: seq_index starts at {int(seq_index[0])}, must be >= 0")

    # Row lengths: every per-position list of a row must have the same n_i.
    n = _lengths(targets)
    offsets = _offsets(n)
    loc = _Locator(shard_name, seq_index, example_start, offsets)
    for name in ("inputs", "topk_ids", "topk_logits", "lse"):
        other = _lengths(per_row[name])
        if np.any(other != n):
            r = int(np.flatnonzero(other != n)[0])
            raise SoftLabelError(f"{shard_name}: {name} of {loc.row(r)} has {other[r]} positions, targets has {n[r]}")
    if np.any(n > spec.max_len):
        r = int(np.flatnonzero(n > spec.max_len)[0])
        raise SoftLabelError(f"{shard_name}: {loc.row(r)} has {n[r]} positions, more than max_len={spec.max_len}")
    for name in ("topk_ids", "topk_logits"):
        # One shape check per row (not per position) so the error can name the row.
        shapes = [np.shape(a) for a in per_row[name]]
        bad = [r for r, s in enumerate(shapes) if len(s) != 2 or s[1] != spec.k]
        if bad:
            r = bad[0]
            raise SoftLabelError(
                f"{shard_name}: {name} of {loc.row(r)} has shape {shapes[r]}, expected (n, k={spec.k})"
            )

    flat_inputs = _concat(inputs, np.int64)
    flat_targets = _concat(targets, np.int64)
    flat_ids = _concat(topk_ids, np.int64, (spec.k,))
    flat_logits = _concat(topk_logits, np.float32, (spec.k,))
    flat_lse = _concat(lse, np.float32)

    _check_finite(flat_logits, "topk_logits", loc)
    _check_finite(flat_lse, "lse", loc)
    _check_ids(flat_inputs, "inputs", spec.num_items, loc)
    _check_ids(flat_targets, "targets", spec.num_items, loc)
    _check_ids(flat_ids, "topk_ids", spec.num_items, loc)
    first = _first_bad_position(np.diff(flat_logits, axis=1) > 0)
    if first is not None:
        raise SoftLabelError(f"{shard_name}: topk_logits of {loc.position(first)} are not sorted in descending order")
    # logsumexp >= max logit; a smaller lse was computed over something else (another temperature, a subset).
    slack = 1e-3 * np.maximum(1.0, np.abs(flat_lse))
    first = _first_bad_position(flat_lse + slack < flat_logits[:, 0]) if len(flat_lse) else None
    if first is not None:
        raise SoftLabelError(
            f"{shard_name}: lse of {loc.position(first)} is {flat_lse[first]:.6g}, below the top logit "
            f"{flat_logits[first, 0]:.6g}; lse must be the logsumexp of the raw logits over the whole catalog"
        )

    id_np = np.uint16 if spec.id_dtype == "uint16" else np.int32
    # (P, k) -> P fixed-size lists of k over the flat (P*k,) values.
    per_position_ids = pa.FixedSizeListArray.from_arrays(pa.array(flat_ids.astype(id_np).reshape(-1)), spec.k)
    per_position_values = pa.FixedSizeListArray.from_arrays(_encode_values(spec, flat_logits, loc), spec.k)
    columns: dict[str, pa.Array] = {
        "seq_index": pa.array(seq_index, pa.int64()),
        "user": pa.array(users.astype(np.int32), pa.int32()),
        "example_start": pa.array(example_start, pa.int64()),
        "inputs": _list(offsets, pa.array(flat_inputs.astype(np.int32)), shard_name),
        "targets": _list(offsets, pa.array(flat_targets.astype(np.int32)), shard_name),
        "topk_ids": _list(offsets, per_position_ids, shard_name),
        "topk_logits": _list(offsets, per_position_values, shard_name),
        "lse": _list(offsets, pa.array(flat_lse), shard_name),
    }
    if sampled is not None:
        columns.update(_encode_sampled(spec, sampled, n, offsets, loc, id_np))
    return pa.Table.from_pydict(columns, schema=soft_label_schema(spec))


def _encode_sampled(
    spec: StoreSpec, sampled: Sequence[tuple], n: np.ndarray, offsets: np.ndarray, loc: _Locator, id_np: Any
) -> dict[str, pa.Array]:
    """The three sampled columns (list<list<...>>) from per-row tuples of per-position arrays."""
    # Flatten rows -> positions (P lists) -> entries; chain/map run in C.
    parts = []
    for j, name in enumerate(("sampled_ids", "sampled_counts", "sampled_logits")):
        per_position = list(itertools.chain.from_iterable(row[j] for row in sampled))
        rows_n = np.fromiter((len(row[j]) for row in sampled), dtype=np.int64, count=len(sampled))
        if np.any(rows_n != n):
            r = int(np.flatnonzero(rows_n != n)[0])
            raise SoftLabelError(f"{loc.shard}: {name} of {loc.row(r)} has {rows_n[r]} positions, targets has {n[r]}")
        parts.append(per_position)
    ids_pp, counts_pp, logits_pp = parts
    distinct = _lengths(ids_pp)
    for name, other in (("sampled_counts", counts_pp), ("sampled_logits", logits_pp)):
        lengths = _lengths(other)
        if np.any(lengths != distinct):
            p = int(np.flatnonzero(lengths != distinct)[0])
            raise SoftLabelError(
                f"{loc.shard}: {name} of {loc.position(p)} has {lengths[p]} entries, sampled_ids has {distinct[p]}"
            )
    inner = _offsets(distinct)
    position_of = np.repeat(np.arange(len(distinct)), distinct)  # (E,) entry -> flat position
    flat_ids = _concat(ids_pp, np.int64)
    flat_counts = _concat(counts_pp, np.int64)
    flat_logits = _concat(logits_pp, np.float32)
    _check_ids(flat_ids, "sampled_ids", spec.num_items, loc, position_of)
    _check_finite(flat_logits, "sampled_logits", loc, position_of)
    totals = np.bincount(position_of, weights=flat_counts, minlength=len(distinct)) if len(distinct) else distinct
    bad = (totals != spec.num_sampled) | (distinct == 0)
    if np.any(bad) or np.any(flat_counts < 1):
        p = int(np.flatnonzero(bad)[0]) if np.any(bad) else int(position_of[np.flatnonzero(flat_counts < 1)[0]])
        raise SoftLabelError(
            f"{loc.shard}: sampled_counts of {loc.position(p)} sum to {int(totals[p])} "
            f"(each >= 1 expected), the spec has num_sampled={spec.num_sampled}"
        )

    def nested(values: pa.Array) -> pa.Array:
        return _list(offsets, _list(inner, values, loc.shard), loc.shard)

    return {
        "sampled_ids": nested(pa.array(flat_ids.astype(id_np))),
        "sampled_counts": nested(pa.array(flat_counts.astype(np.uint16))),
        "sampled_logits": nested(pa.array(flat_logits)),
    }


def sample_soft_labels(
    logits: torch.Tensor, num_samples: int, generator: torch.Generator
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Draw ``num_samples`` ids per position from the teacher's softmax (temperature 1), with replacement.

    ``logits``: (P, C) float32, column 0 is padding and never drawn (the
    softmax is over columns 1..C-1). Returns three lists of P arrays, one per
    position: distinct ids drawn (d_t,) int64 in increasing order, how often each
    was drawn (d_t,) int64 (summing to ``num_samples``), and their raw logits
    (d_t,) float32. Deterministic for a given ``generator`` state (and device).
    """
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise SoftLabelError(f"sample_soft_labels: logits must be (P, C>=2), got {tuple(logits.shape)}")
    num_positions = logits.shape[0]
    if num_positions == 0:
        return [], [], []
    probs = torch.softmax(logits[:, 1:].float(), dim=1)
    draws = torch.multinomial(probs, num_samples, replacement=True, generator=generator) + 1  # (P, S) ids
    draws, _ = torch.sort(draws, dim=1)
    # Distinct ids = starts of runs in each sorted row; column 0 always starts a run, so runs never span rows.
    starts = torch.ones_like(draws, dtype=torch.bool)
    starts[:, 1:] = draws[:, 1:] != draws[:, :-1]
    start_idx = torch.nonzero(starts.reshape(-1)).squeeze(1)  # (E,) flat indices into (P*S,)
    ids = draws.reshape(-1)[start_idx]
    counts = torch.diff(start_idx, append=torch.tensor([draws.numel()], device=start_idx.device))
    rows = start_idx // num_samples
    values = logits[rows, ids].float()
    split_at = np.cumsum(starts.sum(dim=1).cpu().numpy())[:-1]
    return (
        np.split(ids.cpu().numpy(), split_at),
        np.split(counts.cpu().numpy(), split_at),
        np.split(values.cpu().numpy(), split_at),
    )


# --------------------------------------------------------------------------------------
# Write


def _parquet_leaves(schema: pa.Schema) -> dict[str, pa.DataType]:
    """Parquet leaf column path -> leaf Arrow type, e.g. ``"lse.list.element"`` -> float32.

    pyarrow names list items "element" in Parquet (the compliant nested layout, its default), fixed-size
    lists included; the per-column encoding options take these paths.
    """
    leaves = {}
    for field in schema:
        path, dtype = field.name, field.type
        while pa.types.is_list(dtype) or pa.types.is_fixed_size_list(dtype):
            path, dtype = path + ".list.element", dtype.value_type
        leaves[path] = dtype
    return leaves


def _serialise(table: pa.Table, row_group_size: int, compression: Optional[str] = COMPRESSION) -> bytes:
    """Parquet bytes of ``table``: floats BYTE_STREAM_SPLIT, everything else dictionary-encoded (see COMPRESSION)."""
    leaves = _parquet_leaves(table.schema)
    # topk_logits is always a float in disguise (bf16 bits in uint16), and splits like one.
    floats = [
        path
        for path, dtype in leaves.items()
        if (pa.types.is_floating(dtype) or path.startswith("topk_logits."))
        and (_SPLIT_ANY_WIDTH or dtype == pa.float32())
    ]
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        row_group_size=row_group_size,
        compression=compression or "none",
        compression_level=COMPRESSION_LEVEL if compression == "zstd" else None,
        use_dictionary=[path for path in leaves if path not in floats],
        use_byte_stream_split=floats,
    )
    return sink.getvalue().to_pybytes()


def write_shard(
    store_url: str,
    index: int,
    table: pa.Table,
    provenance: dict[str, Any],
    row_group_size: int,
    storage_options: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Write shard ``index`` (a table from :func:`encode_rows`), then its commit record; return the record.

    The Parquet bytes are built in memory once: they are hashed and uploaded in
    one atomic write, so the recorded sha256 is that of exactly the bytes
    written, with no second read. The provenance also goes into the file's
    key-value metadata so a lone shard still says where it came from. The
    record ``{index, file, rows, positions, bytes, sha256, first_seq, last_seq,
    provenance}`` is written after the shard: its presence means the shard is
    complete. A previous record of this index is removed before the shard is
    replaced.
    """
    name = shard_name(index)
    spec = _check_provenance(provenance, name)
    expected = soft_label_schema(spec)
    if not table.schema.remove_metadata().equals(expected):
        raise SoftLabelError(
            f"{name}: table schema does not match the store spec {spec}:\n{table.schema}\nexpected:\n{expected}"
        )
    if table.num_rows == 0:
        raise SoftLabelError(f"{name}: refusing to write an empty shard")
    seq = table.column("seq_index")
    table = table.replace_schema_metadata({PROVENANCE_KEY: json.dumps(provenance, sort_keys=True).encode()})
    data = _serialise(table, row_group_size)
    record = {
        "index": index,
        "file": name,
        "rows": table.num_rows,
        "positions": int(pc.sum(pc.list_value_length(table.column("targets"))).as_py() or 0),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "first_seq": int(pc.min(seq).as_py()),
        "last_seq": int(pc.max(seq).as_py()),
        "provenance": provenance,
    }
    record_url = fsio.join(store_url, record_name(index))
    # Uncommit first: should we crash between the two writes below, an old record (maybe of another
    # teacher) must not be left vouching for the new file.
    fsio.remove_file(record_url, storage_options)
    fsio.atomic_write_bytes(fsio.join(store_url, name), data, storage_options)
    fsio.write_json_atomic(record_url, record, storage_options)
    return record


def remove_manifest(store_url: str, storage_options: Optional[dict[str, Any]] = None) -> None:
    """Uncommit a store: call before rewriting any of its shards, so no manifest describes a mix of runs."""
    fsio.remove_file(fsio.join(store_url, MANIFEST), storage_options)


def _file_size(fs: Any, path: str) -> Optional[int]:
    try:
        return int(fs.info(path)["size"])
    except FileNotFoundError:
        return None


def _short(a: Any, b: Any) -> tuple[str, str]:
    """Two differing values for a message: fingerprints cut to 12 characters when that still tells them apart."""
    sa, sb = str(a), str(b)
    if len(sa) > 12 and len(sb) > 12 and sa[:12] != sb[:12]:
        return sa[:12] + "…", sb[:12] + "…"
    return sa, sb


def _as_json(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists...), so in-memory and stored values compare equal."""
    return json.loads(json.dumps(obj, sort_keys=True))


def _provenance_diff(theirs: Any, ours: dict[str, Any]) -> str:
    """"teacher_fingerprint ab12… (this run: cd34…), ..." for every key whose value differs."""
    theirs = theirs if isinstance(theirs, dict) else {}
    keys = sorted(set(theirs) | set(ours), key=lambda k: (k not in PROVENANCE_FIELDS, k))
    return ", ".join(
        "{} {} (this run: {})".format(key, *_short(theirs.get(key), ours.get(key)))
        for key in keys
        if theirs.get(key) != ours.get(key)
    )


def committed_shards(
    store_url: str, provenance: dict[str, Any], storage_options: Optional[dict[str, Any]] = None
) -> dict[int, dict[str, Any]]:
    """Shards already done for this provenance: ``{index: commit record}``.

    A shard counts when its commit record's provenance equals ``provenance`` and
    its Parquet file exists with the recorded size. Records of another teacher,
    dataset, schema or spec are skipped (logged at INFO): the caller rewrites
    those shards. Unreadable records are skipped with a warning.
    """
    provenance = _as_json(provenance)
    fs, root = fsio.get_fs(store_url, storage_options)
    # Object-store listings are cached per filesystem instance; another process may have written since.
    fs.invalidate_cache(root)
    try:
        names = [p.rsplit("/", 1)[-1] for p in fs.glob(root.rstrip("/") + "/part-*.json")]
    except FileNotFoundError:
        names = []
    done: dict[int, dict[str, Any]] = {}
    for name in sorted(names):
        match = _SHARD_RE.fullmatch(name)
        if not match:
            continue
        index = int(match.group(1))
        url = fsio.join(store_url, name)
        try:
            record = fsio.read_json(url, storage_options)
        except (ValueError, OSError) as exc:  # not JSON, or vanished since the listing
            log.warning("%s: unreadable commit record (%s); shard %d will be rewritten", url, exc, index)
            continue
        if not (isinstance(record, dict) and record.get("index") == index and record.get("file") == shard_name(index)):
            log.warning(
                "%s: commit record does not describe %s; shard %d will be rewritten", url, shard_name(index), index
            )
            continue
        if record.get("provenance") != provenance:
            log.info(
                "%s: made with another %s; shard %d will be rewritten",
                url, _provenance_diff(record.get("provenance"), provenance), index,
            )
            continue
        size = _file_size(fs, root.rstrip("/") + "/" + record["file"])
        if size != record.get("bytes"):
            found = "shard file is missing" if size is None else f"shard file has {size} bytes"
            log.info(
                "%s: %s, the record says %s bytes; shard %d will be rewritten", url, found, record.get("bytes"), index
            )
            continue
        done[index] = record
    return done


_SHARD_ENTRY_KEYS = ("index", "file", "rows", "positions", "bytes", "sha256", "first_seq", "last_seq")


def write_manifest(
    store_url: str,
    spec: StoreSpec,
    provenance: dict[str, Any],
    records: list[dict[str, Any]],
    num_sequences: int,
    num_positions: int,
    extra: dict[str, Any],
    storage_options: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Check the shard records and write ``manifest.json``, the store's commit point (call it last).

    The records must all carry ``provenance`` (whose spec is ``spec``), cover
    seq_index 0..num_sequences-1 exactly once (no hole, no overlap), and add up
    to ``num_positions`` positions; otherwise SoftLabelError and no manifest.
    ``extra`` (timings, hardware...) is stored under the key "extra". Returns
    the manifest.
    """
    where = fsio.join(store_url, MANIFEST)
    if _check_provenance(provenance, where) != spec:
        raise SoftLabelError(
            f"{where}: provenance spec {provenance['spec']} differs from the store spec {spec.to_dict()}"
        )
    ours = _as_json(provenance)
    for record in records:
        if _as_json(record.get("provenance")) != ours:
            raise SoftLabelError(
                f"{where}: the record of {record.get('file')} has another provenance than this store: "
                + _provenance_diff(record.get("provenance"), ours)
            )
        if record["rows"] != record["last_seq"] - record["first_seq"] + 1:
            raise SoftLabelError(
                f"{where}: {record['file']} has {record['rows']} rows but spans seq_index "
                f"{record['first_seq']}..{record['last_seq']}"
            )
    dup = sorted(i for i, n in collections.Counter(r["index"] for r in records).items() if n > 1)
    if dup:
        raise SoftLabelError(f"{where}: shard index listed twice: {', '.join(shard_name(i) for i in dup)}")

    # Coverage: sorted by first_seq, each shard must start right after the previous one ends.
    ordered = sorted(records, key=lambda r: (r["first_seq"], r["index"]))
    expected_next = 0
    for record in ordered:
        if record["first_seq"] > expected_next:
            raise SoftLabelError(
                f"{where}: no shard holds seq_index {expected_next}..{record['first_seq'] - 1} "
                f"(hole before {record['file']})"
            )
        if record["first_seq"] < expected_next:
            raise SoftLabelError(
                f"{where}: {record['file']} (seq_index {record['first_seq']}..{record['last_seq']}) overlaps "
                f"the shards before it, which already hold up to seq_index {expected_next - 1}"
            )
        expected_next = record["last_seq"] + 1
    if expected_next != num_sequences:
        if expected_next < num_sequences:
            raise SoftLabelError(f"{where}: no shard holds seq_index {expected_next}..{num_sequences - 1}")
        raise SoftLabelError(
            f"{where}: shards hold seq_index up to {expected_next - 1}, but num_sequences={num_sequences}"
        )
    positions = sum(r["positions"] for r in records)
    if positions != num_positions:
        raise SoftLabelError(f"{where}: shards hold {positions} positions, expected num_positions={num_positions}")

    total_bytes = sum(r["bytes"] for r in records)
    manifest = {
        "kind": KIND,
        "schema_version": SCHEMA_VERSION,
        "teacher_fingerprint": provenance["teacher_fingerprint"],
        "dataset_fingerprint": provenance["dataset_fingerprint"],
        "num_items": spec.num_items,
        "k": spec.k,
        "value_dtype": spec.value_dtype,
        "id_dtype": spec.id_dtype,
        "num_sampled": spec.num_sampled,
        "temperature_applied_at_training_time": True,
        "max_len": spec.max_len,
        "spec": spec.to_dict(),
        "provenance": ours,
        "compression": f"{COMPRESSION}({COMPRESSION_LEVEL}), byte_stream_split floats",
        "num_sequences": num_sequences,
        "num_positions": num_positions,
        "num_shards": len(records),
        "total_bytes": total_bytes,
        "bytes_per_position": total_bytes / num_positions if num_positions else None,
        "shards": [{key: r[key] for key in _SHARD_ENTRY_KEYS} for r in ordered],
        "extra": extra,
        "created_by": f"recdistill {_version()}",
    }
    fsio.write_json_atomic(where, manifest, storage_options)
    return manifest


# --------------------------------------------------------------------------------------
# Read back


def load_store_manifest(
    store_url: str,
    storage_options: Optional[dict[str, Any]] = None,
    expect_teacher: Optional[str] = None,
    expect_dataset: Optional[str] = None,
    expect_num_items: Optional[int] = None,
) -> dict[str, Any]:
    """Read and check ``store_url/manifest.json``.

    SoftLabelError when it is missing, of another kind or schema version, or
    when the store was made by another teacher / dataset / catalog size than
    expected (the message names the key and both values).
    """
    url = fsio.join(store_url, MANIFEST)
    try:
        manifest = fsio.read_json(url, storage_options)
    except FileNotFoundError:
        raise SoftLabelError(
            f"{store_url} holds no soft labels: {MANIFEST} is missing (precompute was not run there, or did not finish)"
        ) from None
    except ValueError as exc:
        raise SoftLabelError(f"{url}: not valid JSON ({exc})") from None
    kind = manifest.get("kind") if isinstance(manifest, dict) else None
    if kind != KIND:
        raise SoftLabelError(f"{url}: kind is {kind!r}, expected {KIND!r}")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise SoftLabelError(
            f"{url}: schema_version {manifest.get('schema_version')!r} is not supported "
            f"(this code reads version {SCHEMA_VERSION}); run precompute again"
        )
    for key, what, expected in (
        ("teacher_fingerprint", "teacher", expect_teacher),
        ("dataset_fingerprint", "dataset", expect_dataset),
        ("num_items", "catalog size", expect_num_items),
    ):
        if expected is not None and manifest.get(key) != expected:
            theirs, ours = _short(manifest.get(key), expected)
            raise SoftLabelError(
                f"soft labels at {store_url} were made by {what} {theirs} but this run's {what} is {ours} "
                f"({key} differs); run precompute again"
            )
    return manifest


def manifest_spec(manifest: dict[str, Any]) -> StoreSpec:
    """The :class:`StoreSpec` a manifest describes."""
    return StoreSpec.from_dict(manifest["spec"])


def _shard_entry(manifest: dict[str, Any], index: int) -> dict[str, Any]:
    for entry in manifest["shards"]:
        if entry["index"] == index:
            return entry
    raise SoftLabelError(f"{shard_name(index)}: shard {index} is not in the manifest ({manifest['num_shards']} shards)")


def _read_bytes(url: str, storage_options: Optional[dict[str, Any]]) -> Optional[bytes]:
    """The whole file, or None if it does not exist."""
    fs, path = fsio.get_fs(url, storage_options)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _check_file(url: str, entry: dict[str, Any], data: Optional[bytes], verify: bool) -> bytes:
    """``data`` if it matches the manifest ``entry`` (size; sha256 if ``verify``); else SoftLabelError naming url."""
    if data is None:
        raise SoftLabelError(f"{url}: shard listed in the manifest is missing")
    if len(data) != entry["bytes"]:
        raise SoftLabelError(
            f"{url}: shard has {len(data)} bytes, the manifest says {entry['bytes']} (truncated or replaced?)"
        )
    if verify:
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["sha256"]:
            theirs, ours = _short(digest, entry["sha256"])
            raise SoftLabelError(f"{url}: shard sha256 is {theirs}, the manifest says {ours} (corrupt?)")
    return data


def _parse(url: str, data: bytes) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as exc:
        raise SoftLabelError(f"{url}: shard is unreadable (truncated or corrupt?): {exc}") from None


def read_shard(
    store_url: str,
    manifest: dict[str, Any],
    index: int,
    storage_options: Optional[dict[str, Any]] = None,
    verify_checksum: bool = False,
) -> pa.Table:
    """Read shard ``index`` as a table of :func:`soft_label_schema`, checked against the manifest.

    Always checks the file's size, that it parses, its row count, its schema and
    provenance; with ``verify_checksum`` also its sha256. Every failure is a
    SoftLabelError naming the file.
    """
    entry = _shard_entry(manifest, index)
    url = fsio.join(store_url, entry["file"])
    # One read: the size check, the checksum and the parser all see the same bytes.
    data = _check_file(url, entry, _read_bytes(url, storage_options), verify_checksum)
    try:
        table = _parse(url, data).read()
    except (pa.ArrowException, OSError) as exc:
        raise SoftLabelError(f"{url}: shard is unreadable (truncated or corrupt?): {exc}") from None
    if table.num_rows != entry["rows"]:
        raise SoftLabelError(f"{url}: shard has {table.num_rows} rows, the manifest says {entry['rows']}")
    expected = soft_label_schema(manifest_spec(manifest))
    if not table.schema.remove_metadata().equals(expected):
        raise SoftLabelError(f"{url}: schema does not match the manifest's spec:\n{table.schema}")
    try:
        theirs = json.loads((table.schema.metadata or {}).get(PROVENANCE_KEY, b"{}"))
    except ValueError:
        theirs = {}
    for key in ("teacher_fingerprint", "dataset_fingerprint"):
        if theirs.get(key) != manifest[key]:
            a, b = _short(theirs.get(key), manifest[key])
            raise SoftLabelError(f"{url}: shard was made with {key} {a}, the manifest says {b}")
    return table.replace_schema_metadata(None)


def verify_store(store_url: str, storage_options: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Check every shard's existence, size, sha256 and row count against the manifest.

    Returns ``{"store", "num_shards", "num_sequences", "num_positions",
    "total_bytes", "bytes_per_position"}``; raises SoftLabelError listing every
    bad shard (one line each) when any is wrong.
    """
    manifest = load_store_manifest(store_url, storage_options)
    problems = []
    for entry in manifest["shards"]:
        url = fsio.join(store_url, entry["file"])
        try:
            data = _check_file(url, entry, _read_bytes(url, storage_options), verify=True)
            rows = _parse(url, data).metadata.num_rows
            if rows != entry["rows"]:
                raise SoftLabelError(f"{url}: shard has {rows} rows, the manifest says {entry['rows']}")
        except SoftLabelError as exc:
            problems.append(str(exc))
    if problems:
        raise SoftLabelError(
            f"soft labels at {store_url}: {len(problems)} of {len(manifest['shards'])} shards are bad:\n  "
            + "\n  ".join(problems)
        )
    return {
        "store": store_url,
        "num_shards": len(manifest["shards"]),
        "num_sequences": manifest["num_sequences"],
        "num_positions": manifest["num_positions"],
        "total_bytes": manifest["total_bytes"],
        "bytes_per_position": bytes_per_position(manifest),
    }


# --------------------------------------------------------------------------------------
# Summaries


def raw_floor_bytes(spec: StoreSpec) -> int:
    """Bytes per position of k ids plus k fp16 values with no overhead: ``k * (id bytes + 2)``."""
    return spec.k * ((2 if spec.id_dtype == "uint16" else 4) + 2)


def bytes_per_position(manifest: dict[str, Any]) -> float:
    """Stored bytes (all shards) divided by the number of positions (NaN for an empty store)."""
    return manifest["total_bytes"] / manifest["num_positions"] if manifest["num_positions"] else math.nan


def format_manifest(manifest: dict[str, Any]) -> str:
    """A human-readable multi-line summary of a store manifest (for ``recdistill inspect``)."""
    spec = manifest_spec(manifest)
    floor = raw_floor_bytes(spec)
    bpp = bytes_per_position(manifest)
    lines = [
        f"soft labels (schema v{manifest['schema_version']}, {manifest.get('created_by', '?')})",
        f"  teacher:    {manifest['teacher_fingerprint'][:12]}",
        f"  dataset:    {manifest['dataset_fingerprint'][:12]}",
        f"  catalog:    {manifest['num_items']} items (ids {manifest['id_dtype']})",
        f"  top-k:      k={manifest['k']}, logits {manifest['value_dtype']}, lse float32",
        "  sampled:    " + (f"{manifest['num_sampled']} draws per position" if manifest["num_sampled"] else "off"),
        "  temperature: applied at training time (raw logits stored)",
        f"  sequences:  {manifest['num_sequences']} (max_len {manifest['max_len']})",
        f"  positions:  {manifest['num_positions']}",
        f"  shards:     {manifest['num_shards']} ({manifest.get('compression', '?')} Parquet)",
    ]
    size = f"  size:       {_human_bytes(manifest['total_bytes'])}"
    if manifest["num_positions"]:
        size += f" = {bpp:.1f} bytes/position (raw floor k*(id+fp16) = {floor}: {bpp / floor:.2f}x)"
    lines.append(size)
    for key, value in sorted((manifest.get("extra") or {}).items()):
        lines.append(f"  {key}: {value}")
    return "\n".join(lines)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# --------------------------------------------------------------------------------------
# Decode for training


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
    carries no weight).
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
    return out
