"""Writing a store: shard files, their commit records, and the manifest that commits the whole store.

Owns the Parquet encoding of the shards (``COMPRESSION``, :func:`_serialise`)
and the commit protocol: :func:`write_shard` (shard, then its commit record),
:func:`committed_shards` (what an interrupted run may keep),
:func:`remove_manifest` (uncommit before rewriting) and :func:`write_manifest`
(checks coverage and provenance, then writes ``manifest.json`` last).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
from importlib import metadata
from typing import Any, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_pipeline import fsio
from data_pipeline.soft_labels.spec import (
    _SHARD_RE,
    KIND,
    MANIFEST,
    PROVENANCE_FIELDS,
    PROVENANCE_KEY,
    SCHEMA_VERSION,
    SoftLabelError,
    StoreSpec,
    _check_provenance,
    _short,
    record_name,
    shard_name,
    soft_label_schema,
)

# The package's logger ("data_pipeline.soft_labels"), the name it had before the package was split.
log = logging.getLogger(__package__)

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


def _version() -> str:
    try:
        return metadata.version("recdistill")
    except metadata.PackageNotFoundError:
        return "unknown"


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
        write_page_checksum=True,  # a CRC per page: the reader checks it as it reads each row group
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
    augmentation: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Check the shard records and write ``manifest.json``, the store's commit point (call it last).

    The records must all carry ``provenance`` (whose spec is ``spec``), cover
    seq_index 0..num_sequences-1 exactly once (no hole, no overlap), and add up
    to ``num_positions`` positions; otherwise SoftLabelError and no manifest.
    ``extra`` (timings, hardware...) is stored under the key "extra". A store
    with augmented rows (``spec.augmented_rows``) describes them in ``augmentation``:
    ``{"settings", "first_seq" (the first augmented row; all later rows are too),
    "rows", "positions"}``. Returns the manifest, whose ``store_fingerprint`` hashes
    the provenance (teacher, dataset, spec, seed, layout, augmentation settings).
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

    if spec.augmented_rows != (augmentation is not None):
        raise SoftLabelError(f"{where}: spec augmented_rows={spec.augmented_rows} but augmentation "
                             f"{'described' if augmentation is not None else 'not described'}")
    if augmentation is not None:
        first = augmentation["first_seq"]
        mixed = [r["file"] for r in ordered if r["first_seq"] < first <= r["last_seq"]]
        if mixed:
            raise SoftLabelError(f"{where}: {mixed[0]} holds both training and augmented rows (first augmented row {first})")

    total_bytes = sum(r["bytes"] for r in records)
    manifest = {
        "kind": KIND,
        "schema_version": SCHEMA_VERSION,
        "teacher_fingerprint": provenance["teacher_fingerprint"],
        "dataset_fingerprint": provenance["dataset_fingerprint"],
        "task": spec.task,
        "num_items": spec.num_items,
        "k": spec.k,
        "value_dtype": spec.value_dtype,
        "id_dtype": spec.id_dtype,
        "num_sampled": spec.num_sampled,
        "temperature_applied_at_training_time": True,
        "max_len": spec.max_len,
        "spec": spec.to_dict(),
        "provenance": ours,
        "store_fingerprint": hashlib.sha256(json.dumps(ours, sort_keys=True).encode()).hexdigest()[:16],
        "augmentation": augmentation,
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
