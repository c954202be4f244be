"""Prepare a leave-one-out dataset directory, and read it back.

``prepare_dataset`` turns an interaction log (or the synthetic generator) into
this layout under ``out_url`` (any fsspec URL)::

    manifest.json               written last: the commit point
    item_ids.parquet            item: int32 (1..N), raw_id: string
    user_ids.parquet            user: int32 (1..U), raw_id: string
    train/part-00000.parquet    user: int32, items: list<int32>        = seq[:-2]
    valid/part-00000.parquet    user: int32, history: list<int32>      = seq[:-2], target: int32 = seq[-2]
    test/part-00000.parquet     user: int32, history: list<int32>      = seq[:-1], target: int32 = seq[-1]

where ``seq`` is a user's time-ordered item sequence. Each shard holds at most
``rows_per_shard`` users, in increasing user id order; row groups hold
``row_group_size`` rows.

Dense ids: 0 is padding. Surviving raw ids are sorted and numbered 1, 2, ...
The sort is numeric when every raw id is an integer literal (so MovieLens
item 7 precedes item 10, and a file with ids 1..N keeps them), otherwise by
the ids' UTF-8 bytes. The numbering therefore depends only on the set of ids,
never on the order of the input file.

Time order: a user's interactions are sorted by timestamp with ties kept in
input order (a stable sort), so formats without time (file order) and logs with
coarse timestamps both behave predictably.

Readers trust a directory only through its manifest: :func:`load_manifest`
refuses a directory without one, and :func:`read_split` checks every shard's
row count against it.
"""

from __future__ import annotations

import hashlib
import logging
from importlib import metadata
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_pipeline.config import DataConfig
from data_pipeline import fsio
from data_pipeline.block_layout import shard_sizes
from data_pipeline.credentials import redact
from data_pipeline.ingest import DataError, read_interactions
from data_pipeline.ratings import rating_columns, rating_levels, update_fingerprint
from data_pipeline.synthetic import generate_interactions

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
KIND = "recdistill.dataset"
MANIFEST = "manifest.json"
SPLITS = ("train", "valid", "test")

SPLIT_SCHEMAS = {
    "train": pa.schema([("user", pa.int32()), ("items", pa.list_(pa.int32()))]),
    "valid": pa.schema([("user", pa.int32()), ("history", pa.list_(pa.int32())), ("target", pa.int32())]),
    "test": pa.schema([("user", pa.int32()), ("history", pa.list_(pa.int32())), ("target", pa.int32())]),
}


def _version() -> str:
    try:
        return metadata.version("recdistill")
    except metadata.PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------------------
# Prepare


def dataset_settings(cfg: DataConfig, seed: int, task: str = "next_item") -> dict[str, Any]:
    """The settings that decide a dataset's content (not its file layout or credentials).

    Recorded in the manifest: a prepared dataset whose settings differ from the config's was
    made from another input, and must not be taken as this run's. The task is recorded only when
    it is not the default (datasets prepared before tasks existed are next-item ones).
    """
    settings = {"task": task} if task != "next_item" else {}
    if cfg.format == "synthetic":
        return {**settings, "format": "synthetic", "synthetic": cfg.synthetic.model_dump(mode="json"), "seed": seed,
                "min_user_interactions": cfg.min_user_interactions, "min_item_interactions": cfg.min_item_interactions}
    settings |= cfg.model_dump(mode="json", include={"path", "format", "columns", "min_rating", "min_user_interactions",
                                                     "min_item_interactions"})
    if cfg.format == "csv":
        settings["csv_delimiter"] = cfg.csv_delimiter
    settings["path"] = redact(settings["path"])
    return settings


def settings_differ(recorded: dict[str, Any], wanted: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """key -> (recorded, wanted) for every dataset setting that differs (nested keys dotted)."""
    out: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(recorded) | set(wanted)):
        a, b = recorded.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.update({f"{key}.{k}": v for k, v in settings_differ(a, b).items()})
        elif a != b:
            out[key] = (a, b)
    return out


def prepare_dataset(
    cfg: DataConfig, out_url: str, seed: int, row_group_size_for: Optional[Callable[[list[int]], int]] = None,
    before_write: Optional[Callable[[dict[str, Any]], None]] = None, task: str = "next_item",
) -> dict[str, Any]:
    """Read (or generate) interactions, filter, remap, split leave-one-out and write under ``out_url``.

    ``task="rating"`` keeps every interaction's rating as a level (:mod:`data_pipeline.ratings`)
    and refuses data without ratings.

    ``seed`` only matters for ``format: synthetic``. Row groups hold ``cfg.row_group_size``
    rows when set, else ``row_group_size_for(rows of each training file)`` (the run plan's
    rule: the streaming reader's deal must fill the batch), else 64. ``cfg.storage_options`` is
    used for the input and the output alike. ``before_write(manifest)`` (the counts, no splits
    yet) may raise to refuse the data before anything under ``out_url`` changes. Returns the manifest (also written
    to ``out_url/manifest.json``, last). Raises :class:`DataError` if no user is
    left after the filters.
    """
    storage = cfg.storage_options
    if cfg.format == "synthetic":
        table = generate_interactions(cfg.synthetic, seed, with_ratings=task == "rating")
        source = "synthetic"
    else:
        table = read_interactions(cfg)
        source = redact(cfg.path)

    # Integer codes for the raw ids (in order of first appearance; only used internally).
    user_codes, user_raw = _encode(table.column("user"))
    item_codes, item_raw = _encode(table.column("item"))
    keep, rounds = _filter_counts(
        user_codes, item_codes, len(user_raw), len(item_raw), cfg.min_user_interactions, cfg.min_item_interactions
    )
    if not keep.any():
        raise DataError(
            f"{source}: no users left after the filters (min_user_interactions={cfg.min_user_interactions}, "
            f"min_item_interactions={cfg.min_item_interactions}); leave-one-out needs 3 interactions per user"
        )
    timestamps = table.column("timestamp").to_numpy()[keep]
    user_dense, user_ids = _dense_ids(user_codes[keep], user_raw)
    item_dense, item_ids = _dense_ids(item_codes[keep], item_raw)

    # Sort by (user, timestamp, input position): lexsort's last key is the primary one,
    # and the input position makes ties keep input order.
    order = np.lexsort((np.arange(len(user_dense)), timestamps, user_dense))
    users = user_dense[order]
    items = item_dense[order].astype(np.int32)
    lengths = np.bincount(users, minlength=len(user_ids) + 1)[1:]
    rating_values, levels = None, None
    if task == "rating":
        rating_values, levels = rating_levels(table.column("rating").filter(pa.array(keep)), source, cfg.format)
        levels = levels[order]

    manifest = {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
        "source": source,
        "format": cfg.format,
        "num_users": len(user_ids),
        "num_items": len(item_ids),
        "num_interactions": int(len(items)),
        "dropped_users": int(len(user_raw) - len(user_ids)),
        "dropped_items": int(len(item_raw) - len(item_ids)),
        "fingerprint": _fingerprint(lengths, items, user_ids, item_ids, (levels, rating_values) if task == "rating" else None),
        "task": task,
        "settings": dataset_settings(cfg, seed, task),
        "filters": {
            "min_user_interactions": cfg.min_user_interactions,
            "min_item_interactions": cfg.min_item_interactions,
            "min_rating": cfg.min_rating,
            "rounds": rounds,
        },
        "id_order": {name: "numeric" if _all_integers(ids) else "lexicographic"
                     for name, ids in (("user", user_ids), ("item", item_ids))},
        "created_by": f"recdistill {_version()}",
    }
    if rating_values is not None:
        manifest["rating_values"] = rating_values
    if cfg.format == "synthetic":
        manifest["seed"] = seed
        manifest["synthetic"] = cfg.synthetic.model_dump(mode="json")

    if before_write is not None:
        before_write(manifest)

    # The old manifest goes first: from here until the new one is written the
    # directory is "not a dataset", so a crash never leaves a manifest that
    # describes a mix of old and new files.
    fsio.remove_file(fsio.join(out_url, MANIFEST), storage)
    for split in SPLITS:
        fsio.remove_tree(fsio.join(out_url, split), storage)

    fsio.write_parquet_atomic(fsio.join(out_url, "item_ids.parquet"), _id_table("item", item_ids), storage)
    fsio.write_parquet_atomic(fsio.join(out_url, "user_ids.parquet"), _id_table("user", user_ids), storage)
    extra = rating_columns(lengths, levels) if levels is not None else {}
    manifest["splits"] = _write_splits(lengths, items, out_url, cfg, row_group_size_for, extra)

    fsio.write_json_atomic(fsio.join(out_url, MANIFEST), manifest, storage)
    log.info(
        "prepared %s: %d users, %d items, %d interactions -> %s",
        source, manifest["num_users"], manifest["num_items"], manifest["num_interactions"], out_url,
    )
    return manifest


def _encode(column: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """(codes, distinct values): ``values[codes]`` rebuilds the column."""
    encoded = column.combine_chunks().dictionary_encode()
    return encoded.indices.to_numpy().astype(np.int64), encoded.dictionary


def _filter_counts(
    users: np.ndarray, items: np.ndarray, num_users: int, num_items: int, min_user: int, min_item: int
) -> tuple[np.ndarray, int]:
    """Row mask after dropping rare items and short users, repeated until neither drops anything.

    Dropping an item can push a user under the threshold and vice versa, hence
    the loop. Returns (mask, number of rounds).
    """
    keep = np.ones(len(users), dtype=bool)
    rounds = 0
    while True:
        rounds += 1
        item_counts = np.bincount(items[keep], minlength=num_items)
        keep_next = keep & (item_counts[items] >= min_item)
        user_counts = np.bincount(users[keep_next], minlength=num_users)
        keep_next &= user_counts[users] >= min_user
        if np.array_equal(keep_next, keep):
            return keep, rounds
        keep = keep_next


def _all_integers(raw: pa.Array) -> bool:
    try:
        raw.cast(pa.int64())
        return True
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False


def _dense_ids(codes: np.ndarray, raw: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """Map codes of the surviving rows to dense ids 1..N (see the module docstring for the order).

    Returns (dense id per row, raw id per dense id - 1).
    """
    present = np.flatnonzero(np.bincount(codes, minlength=len(raw)))
    survivors = raw.take(pa.array(present))
    byte_order = pc.sort_indices(survivors).to_numpy()  # distinct values, so no ties
    if _all_integers(survivors):
        # Numeric order; equal values spelt differently ("07", "7") fall back to byte order.
        rank_in_bytes = np.empty(len(byte_order), dtype=np.int64)
        rank_in_bytes[byte_order] = np.arange(len(byte_order))
        sorted_idx = np.lexsort((rank_in_bytes, survivors.cast(pa.int64()).to_numpy()))
    else:
        sorted_idx = byte_order
    code_to_dense = np.zeros(len(raw), dtype=np.int64)
    code_to_dense[present[sorted_idx]] = np.arange(1, len(present) + 1)
    return code_to_dense[codes], survivors.take(pa.array(sorted_idx))


def _id_table(name: str, raw_ids: pa.Array) -> pa.Table:
    return pa.table(
        {name: pa.array(np.arange(1, len(raw_ids) + 1, dtype=np.int32)), "raw_id": raw_ids.cast(pa.string())}
    )


def _fingerprint(lengths: np.ndarray, items: np.ndarray, user_ids: pa.Array, item_ids: pa.Array,
                 ratings: Optional[tuple[np.ndarray, list[float]]] = None) -> str:
    """sha256 over a canonical encoding of the dataset's content.

    Encoding, in this order: b"recdistill.dataset.v1"; the sequence lengths of
    users 1..U as little-endian int64; the item ids of all sequences
    concatenated in user order as little-endian int32; then for the user and
    then the item raw ids, in dense id order: their count (int64), the UTF-8
    byte length of each (int64 each), and their bytes concatenated; then, for the rating task, the
    ratings (:func:`data_pipeline.ratings.update_fingerprint`).
    """
    h = hashlib.sha256(b"recdistill.dataset.v1")
    h.update(lengths.astype("<i8").tobytes())
    h.update(items.astype("<i4").tobytes())
    for raw in (user_ids, item_ids):
        raw = raw.cast(pa.string())
        h.update(np.int64(len(raw)).astype("<i8").tobytes())
        h.update(pc.binary_length(raw).to_numpy(zero_copy_only=False).astype("<i8").tobytes())
        # The string array's data buffer holds the values back to back; slice out exactly this array's span.
        offsets = np.frombuffer(raw.buffers()[1], dtype=np.int32)[raw.offset : raw.offset + len(raw) + 1]
        data = raw.buffers()[2]
        h.update(data.to_pybytes()[offsets[0] : offsets[-1]] if data is not None and len(raw) else b"")
    if ratings is not None:
        update_fingerprint(h, *ratings)
    return h.hexdigest()


def _list_array(offsets: np.ndarray, values: np.ndarray) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, type=pa.int32()))


def _split_tables(lengths: np.ndarray, items: np.ndarray) -> dict[str, pa.Table]:
    """Leave-one-out split of the concatenated, time-ordered sequences into the three split tables."""
    num_users = len(lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    position = np.arange(len(items)) - np.repeat(starts, lengths)  # index within the user's sequence
    remaining = np.repeat(lengths, lengths) - position  # 1 for the last item, 2 for the second to last

    train_items = items[remaining > 2]
    train_offsets = np.concatenate([[0], np.cumsum(lengths - 2)])
    test_history = items[remaining > 1]
    test_offsets = np.concatenate([[0], np.cumsum(lengths - 1)])
    user = pa.array(np.arange(1, num_users + 1, dtype=np.int32))
    history = _list_array(train_offsets, train_items)
    return {
        "train": pa.Table.from_arrays([user, history], schema=SPLIT_SCHEMAS["train"]),
        "valid": pa.Table.from_arrays(
            [user, history, pa.array(items[remaining == 2], type=pa.int32())], schema=SPLIT_SCHEMAS["valid"]
        ),
        "test": pa.Table.from_arrays(
            [user, _list_array(test_offsets, test_history), pa.array(items[remaining == 1], type=pa.int32())],
            schema=SPLIT_SCHEMAS["test"],
        ),
    }


def _write_splits(
    lengths: np.ndarray, items: np.ndarray, out_url: str, cfg: DataConfig, row_group_size_for: Optional[Callable[[list[int]], int]],
    extra: dict[str, dict[str, pa.Array]],
) -> dict[str, Any]:
    """Write every split in shards of ``rows_per_shard`` users (with ``extra``'s columns appended to each split's
    table); return the manifest's "splits" entry."""
    entries = {}
    num_users = len(lengths)
    train_files = shard_sizes(num_users, cfg.rows_per_shard)
    row_group_size = cfg.row_group_size or (row_group_size_for(train_files) if row_group_size_for else 64)
    for split, table in _split_tables(lengths, items).items():
        for name, column in extra.get(split, {}).items():
            table = table.append_column(name, column)
        files, rows, sizes = [], [], []
        for shard, start in enumerate(range(0, table.num_rows, cfg.rows_per_shard)):
            part = table.slice(start, cfg.rows_per_shard)
            relative = f"{split}/part-{shard:05d}.parquet"
            url = fsio.join(out_url, relative)
            fsio.write_parquet_atomic(url, part, cfg.storage_options, row_group_size=row_group_size)
            fs, path = fsio.get_fs(url, cfg.storage_options)
            files.append(relative)
            rows.append(part.num_rows)
            sizes.append(int(fs.size(path)))  # a replaced or truncated file is told by its size
        list_column = table.column(1)  # "items" or "history"
        entries[split] = {
            "files": files,
            "rows": rows,
            "bytes": sizes,
            "num_rows": table.num_rows,
            # Total length of the list column: the training positions for train, history items otherwise.
            "num_positions": int(pc.sum(pc.list_value_length(list_column)).as_py() or 0),
            "row_group_size": row_group_size,
        }
        if split == "train":  # histories with >= 2 items: the rows of the soft-label store
            entries[split]["num_sequences"] = int((lengths - 2 >= 2).sum())
    return entries


# --------------------------------------------------------------------------------------
# Read back


def load_manifest(data_url: str, storage_options: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Read and check ``data_url/manifest.json``; DataError if absent or not a dataset of this version."""
    url = fsio.join(data_url, MANIFEST)
    try:
        manifest = fsio.read_json(url, storage_options)
    except FileNotFoundError:
        raise DataError(
            f"{data_url} is not a prepared dataset: {MANIFEST} is missing "
            "(prepare was not run there, or did not finish)"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        kind = manifest.get("kind") if isinstance(manifest, dict) else None
        raise DataError(f"{url}: kind is {kind!r}, expected {KIND!r}")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise DataError(
            f"{url}: schema_version {manifest.get('schema_version')!r} is not supported "
            f"(this code reads version {SCHEMA_VERSION}); prepare the dataset again"
        )
    return manifest


def damaged_files(data_url: str, manifest: dict[str, Any], storage_options: Optional[dict[str, Any]] = None) -> list[str]:
    """One line per example shard that is missing or not the size the manifest records (one listing per split)."""
    problems = []
    for split, entry in manifest["splits"].items():
        sizes = entry.get("bytes")
        fs, folder = fsio.get_fs(fsio.join(data_url, split), storage_options)
        try:
            present = {info["name"].rstrip("/").rsplit("/", 1)[-1]: info.get("size") for info in fs.ls(folder, detail=True)}
        except FileNotFoundError:
            present = {}
        for i, relative in enumerate(entry["files"]):
            name = relative.rsplit("/", 1)[-1]
            url = fsio.join(data_url, relative)
            if name not in present:
                problems.append(f"{url} is missing")
            elif sizes is not None and present[name] != sizes[i]:
                problems.append(f"{url} has {present[name]} bytes, the manifest says {sizes[i]} (truncated or replaced?)")
    return problems


def read_split(
    data_url: str,
    split: str,
    storage_options: Optional[dict[str, Any]] = None,
    manifest: Optional[dict[str, Any]] = None,
) -> pa.Table:
    """Read all shards of ``split`` ("train", "valid" or "test") into one table, checking each file's size
    (when the manifest records it), page checksums and row count."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    manifest = manifest if manifest is not None else load_manifest(data_url, storage_options)
    entry = manifest["splits"][split]
    tables = []
    sizes = entry.get("bytes") or [None] * len(entry["files"])
    for relative, expected, size in zip(entry["files"], entry["rows"], sizes):
        url = fsio.join(data_url, relative)
        fs, path = fsio.get_fs(url, storage_options)
        try:
            with fs.open(path, "rb") as f:
                if size is not None and f.size != size:
                    raise DataError(f"{url}: shard has {f.size} bytes, the manifest says {size} (truncated or replaced?)")
                table = pq.ParquetFile(f, page_checksum_verification=True).read()
        except FileNotFoundError:
            raise DataError(f"{url}: shard listed in the manifest is missing") from None
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{url}: shard is unreadable (truncated or corrupt?): {exc}") from None
        if table.num_rows != expected:
            raise DataError(f"{url}: shard has {table.num_rows} rows, the manifest says {expected}")
        tables.append(table)
    return pa.concat_tables(tables) if tables else SPLIT_SCHEMAS[split].empty_table()


def train_item_counts(
    data_url: str, num_items: int, storage_options: Optional[dict[str, Any]] = None
) -> np.ndarray:
    """How often each item id occurs in the training histories: shape (num_items + 1,), index 0 (padding) = 0."""
    items = read_split(data_url, "train", storage_options).column("items").combine_chunks().flatten()
    values = items.to_numpy()
    if len(values) and (values.max() > num_items or values.min() < 1):
        raise DataError(f"{data_url}: training item ids span {values.min()}..{values.max()}, outside 1..{num_items}")
    return np.bincount(values, minlength=num_items + 1).astype(np.int64)


def read_item_ids(data_url: str, storage_options: Optional[dict[str, Any]] = None,
                  manifest: Optional[dict[str, Any]] = None) -> list[str]:
    """The original id of every item, by dense id: ``ids[i - 1]`` is item ``i``'s id in the input data."""
    manifest = manifest if manifest is not None else load_manifest(data_url, storage_options)
    url = fsio.join(data_url, "item_ids.parquet")
    fs, path = fsio.get_fs(url, storage_options)
    try:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
    except FileNotFoundError:
        raise DataError(f"{url} is missing: the dataset's item id map (prepare it again)") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{url} is unreadable (truncated or corrupt?): {exc}") from None
    dense = table.column("item").to_numpy()
    if len(dense) != manifest["num_items"] or not np.array_equal(dense, np.arange(1, len(dense) + 1)):
        raise DataError(f"{url}: holds {len(dense)} items, not the ids 1..{manifest['num_items']} of the manifest")
    return table.column("raw_id").to_pylist()
