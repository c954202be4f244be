"""Checkpoints are opened only after their integrity is established.

DeepSpeed loads its checkpoint files with ``torch.load(weights_only=False)``: unpickling
them runs whatever code a planted file holds. So every rank that writes checkpoint files
seals them first: ``integrity-rank<r>.json`` lists each file it wrote with its size and
sha256. Before anything opens a restored checkpoint, :func:`verify` checks that every
file is listed by a seal and matches it, and that no seal lists a file that is gone.

The seals are signed with HMAC-SHA256 when ``RECDISTILL_CHECKPOINT_KEY`` is set in the
workers' environment: then even someone who can write the whole ``run_dir`` (and so
could rewrite an unsigned seal) cannot make a checkpoint this run will open. Without a
key a seal catches damaged, truncated, deleted and replaced files, not a forger who
also rewrites the seal: ``run_dir`` must then be writable only by people trusted to
run code on the workers (the README says so).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from typing import Optional

KEY_ENV = "RECDISTILL_CHECKPOINT_KEY"
SEAL_PREFIX = "integrity-rank"


def _key() -> Optional[bytes]:
    key = os.environ.get(KEY_ENV)
    return key.encode() if key else None


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _files(directory: str) -> list[str]:
    """Every regular file below ``directory``, relative, seals excluded."""
    out = []
    for root, _, names in os.walk(directory):
        for name in names:
            relative = os.path.relpath(os.path.join(root, name), directory)
            if not name.startswith(SEAL_PREFIX):
                out.append(relative)
    return sorted(out)


def _signature(files: dict[str, dict], key: bytes) -> str:
    return hmac.new(key, json.dumps(files, sort_keys=True).encode(), hashlib.sha256).hexdigest()


def seal(directory: str, rank: int) -> None:
    """Write ``integrity-rank<rank>.json`` over every file now in ``directory`` (this rank's share)."""
    files = {name: {"bytes": os.path.getsize(os.path.join(directory, name)), "sha256": _digest(os.path.join(directory, name))}
             for name in _files(directory)}
    key = _key()
    record = {"files": files, "signature": _signature(files, key) if key else None}
    with open(os.path.join(directory, f"{SEAL_PREFIX}{rank}.json"), "w") as f:
        json.dump(record, f, sort_keys=True)


def verify(directory: str) -> Optional[str]:
    """None when the checkpoint in ``directory`` is intact; else what is wrong, naming the file."""
    seals = sorted(n for n in os.listdir(directory) if n.startswith(SEAL_PREFIX) and n.endswith(".json"))
    if not seals:
        return "it has no integrity seal (written by an older recdistill, or not by this run)"
    key = _key()
    listed: dict[str, dict] = {}
    for name in seals:
        try:
            with open(os.path.join(directory, name)) as f:
                record = json.load(f)
            files = dict(record["files"])
        except (OSError, ValueError, KeyError, TypeError):
            return f"its seal {name} is unreadable"
        if key is not None and not hmac.compare_digest(str(record.get("signature")), _signature(files, key)):
            return f"its seal {name} is not signed with this run's {KEY_ENV}"
        listed.update(files)
    present = set(_files(directory))
    for name in sorted(present - set(listed)):
        return f"{name} is not listed in any seal (a file added after the checkpoint was written)"
    for name, expected in sorted(listed.items()):
        path = os.path.join(directory, name)
        if name not in present:
            return f"{name} is missing"
        size = os.path.getsize(path)
        if size != expected["bytes"]:
            return f"{name} has {size} bytes, its seal says {expected['bytes']}"
        if _digest(path) != expected["sha256"]:
            return f"{name} does not match the sha256 in its seal"
    return None
