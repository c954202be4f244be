"""Reading a committed store back: its manifest, its shards (checked), whole-store verification, summaries.

Owns :func:`load_store_manifest` (with the teacher / dataset / catalog
checks), :func:`manifest_spec`, :func:`read_shard` and :func:`verify_store`
(size, sha256, rows, schema and provenance against the manifest), and the
summaries :func:`format_manifest`, :func:`bytes_per_position` and
:func:`raw_floor_bytes`.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline import fsio
from data_pipeline.soft_labels.spec import (
    KIND,
    MANIFEST,
    PROVENANCE_KEY,
    SCHEMA_VERSION,
    SoftLabelError,
    StoreSpec,
    _short,
    shard_name,
    soft_label_schema,
)


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
        return pq.ParquetFile(pa.BufferReader(data), page_checksum_verification=True)
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
    check_shard_provenance(url, table.schema.metadata, manifest)
    return table.replace_schema_metadata(None)


def check_shard_provenance(url: str, key_value_metadata: Optional[dict[bytes, bytes]], manifest: dict[str, Any]) -> None:
    """The teacher and dataset a shard records in its own metadata (its Parquet footer) must be the
    manifest's: a shard copied in from another store is refused, naming the file."""
    try:
        theirs = json.loads((key_value_metadata or {}).get(PROVENANCE_KEY, b"{}"))
    except ValueError:
        theirs = {}
    for key in ("teacher_fingerprint", "dataset_fingerprint"):
        if theirs.get(key) != manifest[key]:
            a, b = _short(theirs.get(key), manifest[key])
            raise SoftLabelError(f"{url}: shard was made with {key} {a}, the manifest says {b}")


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
    """Bytes per position of k ids plus k fp16 values with no overhead: ``k * (id bytes + 2)``; a rating
    store's: R fp16 log-probabilities (levels need no ids)."""
    if spec.num_levels:
        return 2 * spec.num_levels
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
        *([f"  ratings:    the whole distribution over {spec.num_levels} levels, log-probabilities {manifest['value_dtype']}"]
          if spec.num_levels else
          [f"  top-k:      k={manifest['k']}, logits {manifest['value_dtype']}, lse float32",
           "  sampled:    " + (f"{manifest['num_sampled']} draws per position" if manifest["num_sampled"] else "off")]),
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
