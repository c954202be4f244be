"""Small fsspec helpers shared by the dataset store and the soft-label store.

Every location in recdistill is a URL (a local path, ``file://``, ``memory://``,
``s3://``...). These helpers hide the one difference that matters for
correctness: how to make a write appear all at once.

* On a local filesystem a reader can see a half-written file, so we write to a
  temporary name in the same directory and ``os.replace`` it into place (a
  rename within one directory is atomic on POSIX).
* On object stores (and the in-memory filesystem) one ``put`` of a whole object
  is already atomic: readers see the old object, no object, or the new one.
  We therefore build the bytes in memory and upload them in a single call
  rather than streaming, because an interrupted stream could still be
  committed as a truncated object when its file handle is closed.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any, Callable, Iterable, Optional

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem


def get_fs(url: str, storage_options: Optional[dict[str, Any]] = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(filesystem, path)`` for ``url``; the path is what the filesystem's methods take."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    # fsspec caches filesystem instances and their directory listings; another process
    # (a Ray worker) may have committed this very file since, so never trust a stale listing.
    fs.invalidate_cache(path)
    return fs, path


def join(url: str, *parts: str) -> str:
    """Join URL path components with ``/`` (``join("s3://b/run", "train", "x")`` -> ``"s3://b/run/train/x"``)."""
    base = url if url.endswith("://") else url.rstrip("/")
    rest = "/".join(p.strip("/") for p in parts if p.strip("/"))
    if not rest:
        return base
    return base + rest if base.endswith("://") else f"{base}/{rest}"


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def open_input(url: str, storage_options: Optional[dict[str, Any]] = None) -> Any:
    """Open ``url`` for reading as a binary file (a context manager).

    Local files get Arrow's native file, whose reads release the GIL and never call back
    into Python; a Parquet read on a background thread then barely slows the training
    thread beside it. Other filesystems get fsspec's file object.
    """
    fs, path = get_fs(url, storage_options)
    if is_local(fs):
        return pa.OSFile(path)
    return fs.open(path, "rb")


def exists(url: str, storage_options: Optional[dict[str, Any]] = None) -> bool:
    fs, path = get_fs(url, storage_options)
    return fs.exists(path)


def _atomic_local_write(fs: fsspec.AbstractFileSystem, path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` and then rename ``tmp_path`` onto ``path``; remove the temp file on failure."""
    directory = os.path.dirname(path)
    if directory:
        fs.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(exc, OSError) and path not in str(exc):
            # Name the file being written (a full disk otherwise says only "[Errno 28] No space left on device").
            if exc.errno is not None:
                raise type(exc)(exc.errno, f"{exc.strerror} (writing {path})") from None
            raise OSError(f"{exc} (writing {path})") from None
        raise


def atomic_write_bytes(url: str, data: bytes, storage_options: Optional[dict[str, Any]] = None) -> None:
    """Write ``data`` to ``url`` so that readers never see a partial file (see the module docstring)."""
    fs, path = get_fs(url, storage_options)
    if is_local(fs):

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(data)

        _atomic_local_write(fs, path, write)
    else:
        fs.pipe_file(path, bytes(data))


def atomic_write_chunks(url: str, chunks: Iterable[bytes], storage_options: Optional[dict[str, Any]] = None) -> None:
    """:func:`atomic_write_bytes` for data that arrives in pieces (never all in memory): locally a temporary
    file renamed at the end; on an object store one streamed upload, visible only once complete."""
    fs, path = get_fs(url, storage_options)
    if is_local(fs):

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)

        _atomic_local_write(fs, path, write)
    else:
        with fs.open(path, "wb") as f:
            for chunk in chunks:
                f.write(chunk)


def write_parquet_atomic(
    url: str,
    table: pa.Table,
    storage_options: Optional[dict[str, Any]] = None,
    row_group_size: Optional[int] = None,
) -> None:
    """Write ``table`` as one Parquet file at ``url`` atomically, with page CRCs (checked on every read).

    Locally the file is streamed to a temporary name (no in-memory copy);
    elsewhere it is serialised in memory and uploaded in one put.
    """
    fs, path = get_fs(url, storage_options)
    if is_local(fs):
        _atomic_local_write(fs, path, lambda tmp: pq.write_table(table, tmp, row_group_size=row_group_size,
                                                                  write_page_checksum=True))
    else:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, row_group_size=row_group_size, write_page_checksum=True)
        fs.pipe_file(path, sink.getvalue().to_pybytes())


def write_json_atomic(url: str, obj: Any, storage_options: Optional[dict[str, Any]] = None) -> None:
    """Write ``obj`` as indented, key-sorted JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(url, text.encode("utf-8"), storage_options)


def read_json(url: str, storage_options: Optional[dict[str, Any]] = None) -> Any:
    """Read a JSON file; a missing file raises ``FileNotFoundError``."""
    fs, path = get_fs(url, storage_options)
    with fs.open(path, "rb") as f:
        return json.loads(f.read().decode("utf-8"))


def remove_file(url: str, storage_options: Optional[dict[str, Any]] = None) -> None:
    """Remove one file if it exists."""
    fs, path = get_fs(url, storage_options)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def remove_tree(url: str, storage_options: Optional[dict[str, Any]] = None) -> None:
    """Remove a directory (or file) and everything below it; a missing one is not an error."""
    fs, path = get_fs(url, storage_options)
    if not fs.exists(path):
        return
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:  # removed concurrently, or an object store's implicit directory vanished
        pass
