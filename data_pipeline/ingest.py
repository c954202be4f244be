"""Read an interaction log into one normalised Arrow table.

Every supported format becomes a table with the columns of
:data:`INTERACTIONS_SCHEMA`:

``user`` (string), ``item`` (string)
    Raw ids exactly as written in the file. The headerless text formats (sasrec,
    MovieLens) define their ids as integers, and a non-integer id there is an error
    naming the line; CSV and Parquet ids are strings.
``timestamp`` (int64)
    The file's time column, or, for formats without one, the row's position in
    the file (0, 1, 2, ...) so that "file order" is the time order.
``rating`` (float64, nullable)
    Null where the format has no rating.

Text formats are parsed twice over, by design. The fast path hands the whole
file to ``pyarrow.csv`` (ML-1M's million lines take well under a second). If
that fails, or its result does not validate, the file is parsed again by
:func:`_parse_lines`, a plain line-by-line reference parser that is slow but
knows line numbers: it either raises a :class:`DataError` naming the URL and
the 1-based line at fault, or succeeds where pyarrow was too strict (e.g. a
``sasrec`` file separated by tabs or runs of spaces).
"""

from __future__ import annotations

import csv
import io
import logging
import re
from dataclasses import dataclass
from typing import Any, Optional

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from data_pipeline.config import DataConfig
from data_pipeline import fsio

log = logging.getLogger(__name__)

INTERACTIONS_SCHEMA = pa.schema(
    [
        pa.field("user", pa.string(), nullable=False),
        pa.field("item", pa.string(), nullable=False),
        pa.field("timestamp", pa.int64(), nullable=False),
        pa.field("rating", pa.float64(), nullable=True),
    ]
)

_ARROW_TYPES = {field.name: field.type for field in INTERACTIONS_SCHEMA}

FILE_FORMATS = ("sasrec", "movielens_udata", "movielens_dat", "csv", "parquet")


class DataError(ValueError):
    """Input data that cannot be used; the message names the file (and line, where there is one)."""


@dataclass(frozen=True)
class _TextLayout:
    """How one line of a headerless text format splits into fields.

    ``fields`` gives the role of each field in order: "user", "item", "rating"
    or "timestamp". ``separator`` None means "any run of whitespace".
    """

    fields: tuple[str, ...]
    separator: Optional[str]
    description: str


_TEXT_LAYOUTS = {
    "sasrec": _TextLayout(("user", "item"), None, "'user item' separated by whitespace"),
    "movielens_udata": _TextLayout(("user", "item", "rating", "timestamp"), "\t", "'user\\titem\\trating\\ttime'"),
    "movielens_dat": _TextLayout(("user", "item", "rating", "timestamp"), "::", "'user::item::rating::time'"),
}

# pyarrow.csv only splits on one byte, so '::' is translated to this control
# character (which never occurs in a well-formed file) before the fast path.
_UNIT_SEPARATOR = "\x1f"
_INTEGER = re.compile(r"^[+-]?[0-9]+$")


def read_interactions(cfg: DataConfig) -> pa.Table:
    """Read ``cfg.path`` in format ``cfg.format`` into a table of :data:`INTERACTIONS_SCHEMA`.

    The path may be any fsspec URL (opened with ``cfg.storage_options``);
    text files compressed as .gz/.bz2/.xz/.zst are decompressed by extension.
    Rows with a rating below ``cfg.min_rating`` are dropped (rows without a
    rating are kept). Raises :class:`DataError` for unreadable or malformed
    input and for an unknown format.
    """
    if cfg.format not in FILE_FORMATS:
        raise DataError(
            f"data.format '{cfg.format}' cannot be read from a file; valid formats: {', '.join(FILE_FORMATS)}"
            + (" (use data_pipeline.synthetic for 'synthetic')" if cfg.format == "synthetic" else "")
        )
    if not cfg.path:
        raise DataError(f"data.path is empty; format '{cfg.format}' needs an input file")

    url = cfg.path
    if cfg.format == "parquet":
        table = _read_parquet(url, cfg)
    else:
        data = _read_bytes(url, cfg.storage_options)
        if not data.strip():
            raise DataError(f"{url}: file is empty (no interactions)")
        if cfg.format == "csv":
            table = _read_csv(url, data, cfg)
        else:
            table = _read_text(url, data, _TEXT_LAYOUTS[cfg.format])

    if table.num_rows == 0:
        raise DataError(f"{url}: no interactions found")
    return _filter_rating(table, cfg.min_rating, url)


# --------------------------------------------------------------------------------------
# Reading bytes


def _read_bytes(url: str, storage_options: dict[str, Any]) -> bytes:
    try:
        with fsspec.open(url, "rb", compression="infer", **storage_options) as f:
            return f.read()
    except FileNotFoundError as exc:
        raise DataError(f"{url}: file not found") from exc
    except IsADirectoryError:
        raise DataError(f"{url} is a directory, not a file: data.path names one interaction log") from None


# --------------------------------------------------------------------------------------
# Headerless text formats (sasrec, movielens_udata, movielens_dat)


def _read_text(url: str, data: bytes, layout: _TextLayout) -> pa.Table:
    fast = _parse_text_fast(data, layout)
    if fast is not None and _valid(fast, rating_required="rating" in layout.fields, integer_ids=True):
        return _normalise(fast)
    return _parse_lines(url, data, layout)


def _parse_text_fast(data: bytes, layout: _TextLayout) -> Optional[pa.Table]:
    """pyarrow.csv on the whole file; None when pyarrow rejects it (the slow path then explains why)."""
    if layout.separator is None:
        delimiter = " "
    elif len(layout.separator) == 1:
        delimiter = layout.separator
    else:
        if _UNIT_SEPARATOR.encode() in data:
            return None
        data = data.replace(layout.separator.encode(), _UNIT_SEPARATOR.encode())
        delimiter = _UNIT_SEPARATOR
    try:
        return pacsv.read_csv(
            io.BytesIO(data),
            read_options=pacsv.ReadOptions(column_names=list(layout.fields)),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char=False, ignore_empty_lines=True),
            convert_options=pacsv.ConvertOptions(
                column_types={f: _ARROW_TYPES[f] for f in layout.fields},
                null_values=[""],
                strings_can_be_null=False,
            ),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None


def _split_line(line: str, layout: _TextLayout) -> list[str]:
    if layout.separator is None:
        return line.split()
    return line.split(layout.separator)


def _parse_lines(url: str, data: bytes, layout: _TextLayout) -> pa.Table:
    """Reference parser: one line at a time, raising DataError at the first bad line."""
    columns: dict[str, list[Any]] = {f: [] for f in layout.fields}
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        line = _decode_line(url, lineno, raw).rstrip("\r")
        if not line.strip():
            continue
        parts = _split_line(line, layout)
        if len(parts) != len(layout.fields):
            raise DataError(
                f"{url}, line {lineno}: expected {len(layout.fields)} fields ({layout.description}), "
                f"got {len(parts)}: {line[:120]!r}"
            )
        for role, value in zip(layout.fields, parts):
            columns[role].append(_convert_field(url, lineno, role, value, required=True, integer_ids=True))
    return _normalise(pa.table({f: columns[f] for f in layout.fields}, schema=_partial_schema(layout.fields)))


def _decode_line(url: str, lineno: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{url}, line {lineno}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def _convert_field(url: str, lineno: int, role: str, value: str, required: bool, integer_ids: bool = False) -> Any:
    """Check and convert one field; ``required`` False lets an empty rating become null;
    ``integer_ids``: the format's ids are integers (kept as their text)."""
    text = value.strip() if role in ("rating", "timestamp") else value
    if role in ("user", "item"):
        if not text:
            raise DataError(f"{url}, line {lineno}: empty {role} id")
        if integer_ids and not _INTEGER.fullmatch(text):
            raise DataError(f"{url}, line {lineno}: {role} id must be an integer in this format, got {value!r} "
                            "(for string ids use data.format=csv or parquet)")
        return text
    if not text and not required:
        return None
    try:
        return int(text) if role == "timestamp" else float(text)
    except ValueError:
        kind = "an integer" if role == "timestamp" else "a number"
        raise DataError(f"{url}, line {lineno}: {role} must be {kind}, got {value!r}") from None


def _partial_schema(fields: tuple[str, ...] | list[str]) -> pa.Schema:
    return pa.schema([INTERACTIONS_SCHEMA.field(f) for f in fields])


# --------------------------------------------------------------------------------------
# CSV with a header row


def _csv_roles(cfg: DataConfig) -> dict[str, str]:
    """role -> column name, for the roles the config maps (timestamp and rating are optional)."""
    roles = {"user": cfg.columns.user, "item": cfg.columns.item}
    if cfg.columns.timestamp is not None:
        roles["timestamp"] = cfg.columns.timestamp
    if cfg.columns.rating is not None:
        roles["rating"] = cfg.columns.rating
    return roles


def _check_columns(url: str, available: list[str], roles: dict[str, str]) -> None:
    for role, name in roles.items():
        if name not in available:
            hint = " (set it to null to use file order)" if role == "timestamp" else ""
            raise DataError(
                f"{url}: column '{name}' (data.columns.{role}{hint}) not found; "
                f"columns in the file: {', '.join(available) or '<none>'}"
            )


def _read_csv(url: str, data: bytes, cfg: DataConfig) -> pa.Table:
    delimiter = cfg.csv_delimiter
    if len(delimiter) != 1:
        raise DataError(f"data.csv_delimiter must be a single character, got {delimiter!r}")
    # utf-8-sig drops a byte-order mark, which spreadsheet exports often put before the header.
    first_line = data.split(b"\n", 1)[0].decode("utf-8-sig", errors="replace").rstrip("\r")
    header = next(csv.reader([first_line], delimiter=delimiter), [])
    roles = _csv_roles(cfg)
    _check_columns(url, header, roles)

    try:
        raw = pacsv.read_csv(
            io.BytesIO(data),
            parse_options=pacsv.ParseOptions(delimiter=delimiter),
            convert_options=pacsv.ConvertOptions(
                include_columns=list(roles.values()),
                column_types={name: _ARROW_TYPES[role] for role, name in roles.items()},
                null_values=[""],
                strings_can_be_null=False,
            ),
        )
        table = raw.rename_columns([_role_of(roles, n) for n in raw.column_names])
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        table = None
    if table is not None and _valid(table, rating_required=False):
        return _normalise(table)
    return _parse_csv_lines(url, data, delimiter, header, roles)


def _role_of(roles: dict[str, str], name: str) -> str:
    return next(role for role, col in roles.items() if col == name)


def _parse_csv_lines(url: str, data: bytes, delimiter: str, header: list[str], roles: dict[str, str]) -> pa.Table:
    """Reference CSV parser (the csv module), raising DataError at the first bad record."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        lineno = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{url}, line {lineno}: not valid UTF-8 ({exc.reason})") from None
    index = {role: header.index(name) for role, name in roles.items()}
    columns: dict[str, list[Any]] = {role: [] for role in roles}
    reader = csv.reader(io.StringIO(text), delimiter=delimiter, strict=True)
    try:
        next(reader)  # header, already checked
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{url}, line {reader.line_num}: expected {len(header)} fields separated by "
                    f"{delimiter!r} (as in the header), got {len(row)}"
                )
            for role, i in index.items():
                columns[role].append(_convert_field(url, reader.line_num, role, row[i], required=role != "rating"))
    except csv.Error as exc:
        raise DataError(f"{url}, line {reader.line_num}: {exc}") from None
    fields = list(roles)
    return _normalise(pa.table({f: columns[f] for f in fields}, schema=_partial_schema(fields)))


# --------------------------------------------------------------------------------------
# Parquet


def _read_parquet(url: str, cfg: DataConfig) -> pa.Table:
    roles = _csv_roles(cfg)
    fs, path = fsio.get_fs(url, cfg.storage_options)
    try:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            _check_columns(url, pf.schema_arrow.names, roles)
            raw = pf.read(columns=list(roles.values()))
    except FileNotFoundError as exc:
        raise DataError(f"{url}: file not found") from exc
    except IsADirectoryError:
        raise DataError(f"{url} is a directory, not a file: data.path names one interaction log") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{url}: not a readable Parquet file ({exc})") from exc

    columns = {}
    for role, name in roles.items():
        column = raw.column(name)
        try:
            columns[role] = column.cast(_ARROW_TYPES[role])
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise DataError(f"{url}: column '{name}' ({column.type}) cannot be used as {role}: {exc}") from None
        if role != "rating" and columns[role].null_count:
            row = int(np.flatnonzero(columns[role].is_null().to_numpy(zero_copy_only=False))[0]) + 1
            raise DataError(f"{url}, row {row}: {role} column '{name}' is null")
    return _normalise(pa.table(columns))


# --------------------------------------------------------------------------------------
# Shared: normalise, validate, filter


def _normalise(table: pa.Table) -> pa.Table:
    """Fill in missing timestamp (file order) / rating (null) and return exactly INTERACTIONS_SCHEMA."""
    n = table.num_rows
    names = table.column_names
    timestamp = table.column("timestamp") if "timestamp" in names else pa.array(np.arange(n, dtype=np.int64))
    rating = table.column("rating") if "rating" in names else pa.nulls(n, pa.float64())
    columns = [table.column("user"), table.column("item"), timestamp, rating]
    return pa.Table.from_arrays(
        [c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c for c in columns],
        names=INTERACTIONS_SCHEMA.names,
    ).cast(INTERACTIONS_SCHEMA)


def _valid(table: pa.Table, rating_required: bool, integer_ids: bool = False) -> bool:
    """True if a fast-path table has no nulls, empty or (``integer_ids``) non-integer ids where the
    reference parser would object."""
    for name in ("user", "item"):
        column = table.column(name)
        if column.null_count or pc.any(pc.equal(pc.utf8_length(column), 0)).as_py():
            return False
        if integer_ids and not pc.all(pc.match_substring_regex(column, _INTEGER.pattern)).as_py():
            return False
    if "timestamp" in table.column_names and table.column("timestamp").null_count:
        return False
    return not (rating_required and table.column("rating").null_count)


def _filter_rating(table: pa.Table, min_rating: Optional[float], url: str) -> pa.Table:
    if min_rating is None:
        return table
    rating = table.column("rating")
    if rating.null_count == table.num_rows:
        log.warning("%s: data.min_rating=%s ignored: the input has no ratings", url, min_rating)
        return table
    keep = pc.fill_null(pc.greater_equal(rating, min_rating), True)  # rows without a rating are kept
    return table.filter(keep)
