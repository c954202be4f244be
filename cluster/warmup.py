"""One-time setup step: JIT-build DeepSpeed's CPU shared-memory comm op and its async I/O op.

DeepSpeed compiles them on first use (~25 s and a few minutes, cached in ~/.cache/torch_extensions);
doing it once at install time keeps that cost out of every training job's start (the async I/O op,
for NVMe offload, only where libaio is installed).
On a CUDA machine there is nothing to build, so this exits quietly.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


# A build takes ~25 s (minutes on a loaded machine); a lock older than this was left by a killed build.
STALE_LOCK_SECONDS = 15 * 60


def clear_stale_build_lock(build_dir: Path, now: float | None = None) -> bool:
    """Remove torch's build lock in ``build_dir`` when it is older than :data:`STALE_LOCK_SECONDS`.

    torch.utils.cpp_extension holds a lock file while it builds; a build killed midway leaves it,
    and every later build then waits for it forever, silently. Returns whether one was removed.
    """
    lock = build_dir / "lock"
    try:
        age = (now if now is not None else time.time()) - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < STALE_LOCK_SECONDS:
        return False
    print(f"warmup: removing {lock}, a build lock {age / 60:.0f} min old left by a build that was killed "
          "(otherwise every build would wait for it forever)", flush=True)
    lock.unlink(missing_ok=True)
    return True


def main() -> int:
    import torch

    if torch.cuda.is_available():
        print("warmup: CUDA present, no CPU comm op to build")
        return 0
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from torch.utils.cpp_extension import _get_build_directory

    clear_stale_build_lock(Path(_get_build_directory("deepspeed_shm_comm", verbose=False)))
    from deepspeed.comm.torch import build_shm_op

    start = time.perf_counter()
    op = build_shm_op()
    status = "built" if op is not None else "not available (DeepSpeed falls back to plain gloo)"
    print(f"warmup: DeepSpeed shm comm op {status} in {time.perf_counter() - start:.1f}s", flush=True)
    build_async_io()
    return 0


def build_async_io() -> None:
    """DeepSpeed's async I/O op (NVMe offload), when libaio is there: a few minutes once, cached after."""
    from deepspeed.ops.op_builder.cpu import AsyncIOBuilder
    from torch.utils.cpp_extension import _get_build_directory

    builder = AsyncIOBuilder()
    if not builder.is_compatible(verbose=False):
        print("warmup: DeepSpeed async I/O not buildable (install libaio-dev): NVMe offload unavailable", flush=True)
        return
    clear_stale_build_lock(Path(_get_build_directory("async_io", verbose=False)))
    start = time.perf_counter()
    builder.load(verbose=False)
    print(f"warmup: DeepSpeed async I/O op built in {time.perf_counter() - start:.1f}s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
