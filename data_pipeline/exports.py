"""Exported models: safetensors weights + config + a sha256 fingerprint.

Layout under an export URL (e.g. ``run_dir/teacher``):
  model.safetensors   consolidated fp32 weights (tied output weight stored once)
  export.json         written last (the commit point): model config, catalog size,
                      dataset fingerprint, training metrics, and ``fingerprint`` =
                      sha256 over the weight bytes and the canonical model config.
Loading never unpickles anything.

This module owns the storage format only (tensors and metadata through fsspec);
building a model from an export is :mod:`cluster.models`' job, so that the data
components never depend on the model code.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from typing import Any, Iterator, Optional

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from data_pipeline import fsio

WEIGHTS = "model.safetensors"
META = "export.json"
KIND = "recdistill.model"


class ExportError(ValueError):
    """A missing, incomplete or tampered export."""


class ExportMissing(ExportError):
    """No committed export at the URL (not trained yet): unlike a damaged one, not a fault."""


def _fingerprint(weights: bytes, model_cfg: dict[str, Any], num_items: int) -> str:
    h = hashlib.sha256(weights)
    h.update(json.dumps({"model": model_cfg, "num_items": num_items}, sort_keys=True).encode())
    return h.hexdigest()


def _missing_weights(url: str) -> ExportError:
    return ExportError(f"export {url} is damaged: it has {META} but no {WEIGHTS}")


def _fingerprint_mismatch(url: str, meta: dict[str, Any]) -> ExportError:
    return ExportError(f"export {url} is damaged: {WEIGHTS} does not match the fingerprint recorded in {META} "
                       f"({meta['fingerprint'][:12]}…)")


def check_export_fits_dataset(meta: dict[str, Any], dataset_manifest: dict[str, Any], url: str) -> None:
    """Refuse an export that scores another catalog or was trained on another dataset (it would rank the wrong items).

    ``meta`` is the export's metadata. An export without a ``dataset_fingerprint`` (one written
    by ``save_export`` outside the training stages) is checked on its catalog size alone.
    """
    if meta["num_items"] != dataset_manifest["num_items"]:
        raise ExportError(f"model at {url} scores {meta['num_items']} items but the dataset has {dataset_manifest['num_items']}")
    trained_on = meta.get("dataset_fingerprint")
    if trained_on and trained_on != dataset_manifest["fingerprint"]:
        raise ExportError(
            f"model at {url} was trained on dataset {trained_on[:12]}…, but this run's dataset is {dataset_manifest['fingerprint'][:12]}…"
        )


def ensemble_fingerprint(fingerprints: list[str]) -> str:
    """The fingerprint of a teacher ensemble: its members' fingerprints, in any order (a mixture
    does not depend on the order). One member is that member's own fingerprint."""
    if len(fingerprints) == 1:
        return fingerprints[0]
    return hashlib.sha256(("ensemble:" + ",".join(sorted(fingerprints))).encode()).hexdigest()


def verify_export(url: str, storage_options: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Check the weights against the recorded fingerprint, streaming (no tensors loaded); returns the metadata."""
    meta = read_export_meta(url, storage_options)
    fs, path = fsio.get_fs(fsio.join(url, WEIGHTS), storage_options)
    h = hashlib.sha256()
    try:
        with fs.open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    except FileNotFoundError:
        raise _missing_weights(url) from None
    h.update(json.dumps({"model": meta["model"], "num_items": meta["num_items"]}, sort_keys=True).encode())
    if h.hexdigest() != meta["fingerprint"]:
        raise _fingerprint_mismatch(url, meta)
    return meta


def save_export(
    url: str,
    state_dict: dict[str, torch.Tensor],
    model_config: dict[str, Any],
    num_items: int,
    info: dict[str, Any],
    storage_options: Optional[dict[str, Any]] = None,
) -> str:
    """Write an export and return its fingerprint.

    ``model_config`` is the model's config as JSON (it is stored and fingerprinted); ``info``
    is stored as is (metrics, provenance).
    """
    # Weights as fp32; integer buffers (a mixed-dim table's item order) keep their dtype.
    tensors = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous() for k, v in state_dict.items()}
    if model_config.get("tied_embeddings", True):  # the output matrix is the same Parameter as the item table
        for key in [k for k in tensors if k == "output.weight" or k.endswith(".output.weight")]:
            tensors.pop(key)
    weights = save_safetensors(tensors)
    cfg_dict = dict(model_config)
    fingerprint = _fingerprint(weights, cfg_dict, num_items)
    fsio.remove_file(fsio.join(url, META), storage_options)  # uncommit before replacing the weights
    fsio.atomic_write_bytes(fsio.join(url, WEIGHTS), weights, storage_options)
    meta = {"kind": KIND, "model": cfg_dict, "num_items": num_items, "fingerprint": fingerprint, **info}
    fsio.write_json_atomic(fsio.join(url, META), meta, storage_options)
    return fingerprint




def save_export_streaming(
    url: str,
    layout: list[tuple[str, tuple[int, ...], torch.dtype]],
    tensors: Iterator[torch.Tensor],
    model_config: dict[str, Any],
    num_items: int,
    info: dict[str, Any],
    storage_options: Optional[dict[str, Any]] = None,
) -> str:
    """:func:`save_export` for a model too large to hold twice (the 1B teacher: 4 GB of fp32): ``tensors``
    yields the ``layout``'s tensors one at a time, in its order, and each is written (safetensors: an
    8-byte header length, a JSON header of dtypes, shapes and byte offsets, then the raw bytes) and hashed
    as it comes. Returns the fingerprint."""
    header: dict[str, Any] = {}
    offset = 0
    for name, shape, dtype in layout:
        size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    digest = hashlib.sha256()

    def chunks() -> Iterator[bytes]:
        prefix = struct.pack("<Q", len(encoded)) + encoded
        digest.update(prefix)
        yield prefix
        count = 0
        for (name, shape, dtype), tensor in zip(layout, tensors):
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ExportError(f"export of {name}: got {tuple(tensor.shape)} {tensor.dtype}, the layout says {shape} {dtype}")
            data = tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            digest.update(data)
            count += 1
            yield data
        if count != len(layout):
            raise ExportError(f"export: {count} tensors arrived, the layout has {len(layout)}")

    fsio.remove_file(fsio.join(url, META), storage_options)  # uncommit before replacing the weights
    fsio.atomic_write_chunks(fsio.join(url, WEIGHTS), chunks(), storage_options)
    cfg_dict = dict(model_config)
    digest.update(json.dumps({"model": cfg_dict, "num_items": num_items}, sort_keys=True).encode())
    fingerprint = digest.hexdigest()
    meta = {"kind": KIND, "model": cfg_dict, "num_items": num_items, "fingerprint": fingerprint, **info}
    fsio.write_json_atomic(fsio.join(url, META), meta, storage_options)
    return fingerprint


def read_export_meta(url: str, storage_options: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The export's metadata; an error naming the URL if there is no committed export."""
    try:
        meta = fsio.read_json(fsio.join(url, META), storage_options)
    except FileNotFoundError:
        raise ExportMissing(f"no exported model at {url} (missing {META})") from None
    if meta.get("kind") != KIND:
        raise ExportError(f"{fsio.join(url, META)} is not a recdistill model export")
    return meta


def load_export(
    url: str, storage_options: Optional[dict[str, Any]] = None, verify: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, metadata) of an export; the fingerprint is checked. ``metadata["model"]`` is the model's config."""
    meta = read_export_meta(url, storage_options)
    fs, path = fsio.get_fs(fsio.join(url, WEIGHTS), storage_options)
    try:
        weights = fs.cat_file(path)
    except FileNotFoundError:
        raise _missing_weights(url) from None
    if verify and _fingerprint(weights, meta["model"], meta["num_items"]) != meta["fingerprint"]:
        raise _fingerprint_mismatch(url, meta)
    return load_safetensors(weights), meta


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32}
_DTYPE_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


def read_export_tensor(url: str, name: str, storage_options: Optional[dict[str, Any]] = None, verify: bool = True) -> torch.Tensor:
    """One tensor of an export, reading only its bytes (e.g. a billion-parameter teacher's item table).

    The safetensors layout: an 8-byte little-endian header length, a JSON header with each
    tensor's dtype, shape and byte range, then the data. ``verify`` first checks the whole
    file against the recorded fingerprint (a streaming hash, no tensors loaded).
    """
    if verify:
        verify_export(url, storage_options)
    fs, path = fsio.get_fs(fsio.join(url, WEIGHTS), storage_options)
    with fs.open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
        if name not in header:
            tensors = sorted(k for k in header if k != "__metadata__")
            raise ExportError(f"export {url} has no tensor {name!r}; it has {tensors}")
        entry = header[name]
        if entry["dtype"] not in _SAFETENSORS_DTYPES:
            raise ExportError(f"export {url}: tensor {name!r} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        f.seek(8 + header_len + begin)
        data = bytearray(f.read(end - begin))
    return torch.frombuffer(data, dtype=_SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"]).clone()
