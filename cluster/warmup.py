"""One-time setup step: JIT-build DeepSpeed's CPU shared-memory comm op.

DeepSpeed compiles it on first use (~25 s, cached in ~/.cache/torch_extensions);
doing it once at install time keeps that cost out of every training job's start.
On a CUDA machine there is nothing to build, so this exits quietly.
"""

from __future__ import annotations

import os
import sys
import time


def main() -> int:
    import torch

    if torch.cuda.is_available():
        print("warmup: CUDA present, no CPU comm op to build")
        return 0
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.comm.torch import build_shm_op

    start = time.perf_counter()
    op = build_shm_op()
    status = "built" if op is not None else "not available (DeepSpeed falls back to plain gloo)"
    print(f"warmup: DeepSpeed shm comm op {status} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
