"""What a soft-label store is: its spec, its Arrow schema, its provenance and its file names.

Owns :class:`SoftLabelError` (every failure in the package raises it), the
format constants (``SCHEMA_VERSION``, ``KIND``, ``MANIFEST``,
``PROVENANCE_KEY``...), :class:`StoreSpec` and :func:`soft_label_schema`,
:func:`make_provenance` and its check, and the shard / commit-record names.
The other modules of the package build on this one; it imports none of them.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 1
KIND = "recdistill.soft_labels"
MANIFEST = "manifest.json"
# Key of the provenance JSON in each Parquet file's key-value metadata.
PROVENANCE_KEY = b"recdistill.soft_labels.provenance"
VALUE_DTYPES = ("fp16", "bf16", "fp32")
PROVENANCE_FIELDS = ("teacher_fingerprint", "dataset_fingerprint", "schema_version", "spec")

_SHARD_RE = re.compile(r"part-(\d{5,})\.json$")


class SoftLabelError(ValueError):
    """A problem with soft labels; the message names the shard file, example id or key at fault."""


# --------------------------------------------------------------------------------------
# Spec and schema


@dataclass(frozen=True)
class StoreSpec:
    """What a store holds; everything needed to build its schema and decode it.

    ``num_items``: catalog size (ids 1..num_items). ``k``: top-k entries per
    position. ``value_dtype``: "fp16" | "bf16" | "fp32" for the top-k logits.
    ``num_sampled``: draws per position for sampled soft labels (0 = none).
    ``max_len``: the teacher's maximum sequence length (positions per row <= max_len).
    ``augmented_rows``: the store may hold teacher-labelled augmented rows (an ``augmented``
    column; those rows have soft labels and no hard target: their targets are 0; in a rating
    store their levels are kept, as the history's features, and no loss takes them as labels).
    ``num_levels``: 0 for the next-item task; R > 0 makes it a rating store (``run.task=rating``):
    each position holds the teacher's whole distribution over the R rating levels (``k == R``, no
    top-k, no log-normaliser: :func:`rating_store_schema`).
    """

    num_items: int
    k: int
    value_dtype: str
    num_sampled: int
    max_len: int
    augmented_rows: bool = False
    num_levels: int = 0

    @property
    def task(self) -> str:
        return "rating" if self.num_levels else "next_item"

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
        if self.num_levels and (self.k != self.num_levels or self.num_sampled):
            raise SoftLabelError(f"a rating store holds whole distributions: k must equal num_levels ({self.num_levels}), "
                                 f"with no sampled labels; got k={self.k}, num_sampled={self.num_sampled}")

    @property
    def id_dtype(self) -> str:
        """"uint16" when every id 0..num_items fits in 16 bits, else "int32"."""
        return "uint16" if self.num_items <= np.iinfo(np.uint16).max else "int32"

    def to_dict(self) -> dict[str, Any]:
        # augmented_rows only when set: a plain store's spec (and provenance) reads as before the option.
        d = asdict(self)
        for optional in ("augmented_rows", "num_levels"):  # likewise a next-item store's spec
            if not d[optional]:
                d.pop(optional)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StoreSpec":
        names = ("num_items", "k", "value_dtype", "num_sampled", "max_len")
        missing = [n for n in names if n not in d]
        if missing:
            raise SoftLabelError(f"store spec lacks {', '.join(missing)}: {d!r}")
        return cls(**{n: d[n] for n in names}, augmented_rows=bool(d.get("augmented_rows", False)),
                   num_levels=int(d.get("num_levels", 0)))

    @classmethod
    def from_config(cls, precompute: Any, num_items: int, max_len: int) -> "StoreSpec":
        """From a :class:`distill.config.PrecomputeConfig` plus the catalog size and the teacher's max_len."""
        return cls(num_items, precompute.k, precompute.dtype, precompute.num_sampled, max_len,
                   augmented_rows=precompute.augment.ratio > 0)


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
    augmented      bool                  (augmented_rows only) a teacher-labelled perturbed row: targets 0
    ============== ==================================== =========================================

    ID is uint16 or int32 (``spec.id_dtype``); VAL is float16, float32, or uint16
    holding bfloat16 bits (``spec.value_dtype``). A rating store's rows: :func:`rating_store_schema`.
    """
    if spec.num_levels:
        return rating_store_schema(spec)
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
    if spec.augmented_rows:
        fields.append(("augmented", pa.bool_()))
    return pa.schema(fields)


def rating_store_schema(spec: StoreSpec) -> pa.Schema:
    """The Arrow schema of one rating store row: one user's training sequence of (item, rating level) pairs,
    ``n`` positions (every pair but the first is an example: its rating given the pairs before it).

    ============== ==================================== =========================================
    column         type                                 per row
    ============== ==================================== =========================================
    seq_index      int64                                index in the global sequence order
    user           int32                                dense user id
    example_start  int64                                example id of position 0 (then +1 each)
    inputs         list<int32>                          (n,) history item ids, oldest first
    targets        list<int32>                          (n,) the item rated at each position
    input_levels   list<uint8>                          (n,) the rating level (1..R) of each input
    target_levels  list<uint8>                          (n,) the rating level (1..R) of each target
    log_probs      list<fixed_size_list<VAL, R>>        (n, R) the teacher's log p(level) (T = 1)
    augmented      bool                  (augmented_rows only) a teacher-labelled perturbed row: KD only
    ============== ==================================== =========================================
    """
    augmented = [("augmented", pa.bool_())] if spec.augmented_rows else []
    return pa.schema([
        ("seq_index", pa.int64()),
        ("user", pa.int32()),
        ("example_start", pa.int64()),
        ("inputs", pa.list_(pa.int32())),
        ("targets", pa.list_(pa.int32())),
        ("input_levels", pa.list_(pa.uint8())),
        ("target_levels", pa.list_(pa.uint8())),
        ("log_probs", pa.list_(pa.list_(_value_arrow_type(spec), spec.num_levels))),
        *augmented,
    ])


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


def _short(a: Any, b: Any) -> tuple[str, str]:
    """Two differing values for a message: fingerprints cut to 12 characters when that still tells them apart."""
    sa, sb = str(a), str(b)
    if len(sa) > 12 and len(sb) > 12 and sa[:12] != sb[:12]:
        return sa[:12] + "…", sb[:12] + "…"
    return sa, sb
