"""cluster.deepspeed_fixes against DeepSpeed's real async I/O op: gradient partitions at offsets O_DIRECT
cannot use directly are read and written whole (the end-to-end check is test_teacher's NVMe-offload
test, whose losses match the plain engine's)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cluster import deepspeed_fixes

pytestmark = pytest.mark.integration

# A gradient partition of 1 MB (the smallest DeepSpeed swaps) at the offset a 2-worker ZeRO-3 run gave it.
LENGTH, UNALIGNED_OFFSET = 262_144, 37_312


@pytest.fixture(scope="module")
def aio_handle():
    # The builder DeepSpeed's swapper uses on this accelerator (and setup's warm-up builds): another one's flags
    # differ and would rebuild the op (minutes) over the cached one.
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("AsyncIOBuilder")
    if not builder.is_compatible(verbose=False):
        pytest.skip("DeepSpeed's async I/O op needs libaio-dev (make setup installs it)")
    # DeepSpeed's defaults, as cluster.runtime writes them: block 1 MB, queue 8, overlapped events, one thread.
    return builder.load(verbose=False).aio_handle(1_048_576, 8, False, True, 1)


def locked_buffer(handle, numel: int) -> torch.Tensor:
    """A page-locked buffer as DeepSpeed's swap buffer manager makes them."""
    return handle.new_cpu_locked_tensor(numel, torch.empty(0, dtype=torch.float32)).zero_()


def test_the_offsets_deepspeed_uses_include_ones_o_direct_cannot(aio_handle):
    buffer = locked_buffer(aio_handle, 2 * LENGTH + UNALIGNED_OFFSET)
    assert deepspeed_fixes.is_direct_io_aligned(buffer.narrow(0, 0, LENGTH))
    assert deepspeed_fixes.is_direct_io_aligned(buffer.narrow(0, 1024, LENGTH))  # 4 KB
    assert not deepspeed_fixes.is_direct_io_aligned(buffer.narrow(0, 128, LENGTH))  # 512 B: not on a 4 KB-sector disk
    assert not deepspeed_fixes.is_direct_io_aligned(buffer.narrow(0, UNALIGNED_OFFSET, LENGTH))


@pytest.mark.parametrize("offset", [0, 1024, 128, UNALIGNED_OFFSET, 1])
def test_parts_are_read_and_written_whole_at_any_offset(aio_handle, tmp_path, offset):
    gen = torch.Generator().manual_seed(offset)
    parts = [(offset, LENGTH, str(tmp_path / "a.swp")), (offset + LENGTH + 64, LENGTH // 2, str(tmp_path / "b.swp"))]
    source = locked_buffer(aio_handle, offset + 2 * LENGTH)
    source.copy_(torch.randn(source.numel(), generator=gen))

    deepspeed_fixes.write_parts(aio_handle, source, parts)
    for start, length, path in parts:  # the files hold exactly the partitions' bytes
        on_disk = torch.from_numpy(np.fromfile(path, dtype=np.float32)[:length])
        assert torch.equal(on_disk, source.narrow(0, start, length))

    target = locked_buffer(aio_handle, source.numel())
    deepspeed_fixes.read_parts(aio_handle, target, parts)
    for start, length, _ in parts:
        assert torch.equal(target.narrow(0, start, length), source.narrow(0, start, length))
    untouched = torch.ones(source.numel(), dtype=torch.bool)
    for start, length, _ in parts:
        untouched[start:start + length] = False
    assert torch.count_nonzero(target[untouched]) == 0  # nothing outside the partitions was written


def test_apply_replaces_deepspeeds_gradient_io_once():
    from deepspeed.runtime.swap_tensor.optimizer_utils import OptimizerSwapper
    from deepspeed.runtime.swap_tensor.partitioned_optimizer_swapper import PartitionedOptimizerSwapper

    deepspeed_fixes.apply()
    read, write = PartitionedOptimizerSwapper._swap_in_pinned_gradients, OptimizerSwapper._writeback_gradients
    deepspeed_fixes.apply()
    assert PartitionedOptimizerSwapper._swap_in_pinned_gradients is read and read.__module__ == deepspeed_fixes.__name__
    assert OptimizerSwapper._writeback_gradients is write and write.__module__ == deepspeed_fixes.__name__


def test_the_cuda_arch_list_loses_arch_specific_suffixes_deepspeed_cannot_parse():
    from cluster.deepspeed_fixes import sanitize_cuda_arch_list

    env = {"TORCH_CUDA_ARCH_LIST": "8.0 9.0a;9.0;10.0a+PTX"}
    sanitize_cuda_arch_list(env)
    assert env["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0;10.0+PTX"
    # DeepSpeed's own parse of the result (builder.compute_capability_args) now succeeds.
    ccs = sorted(env["TORCH_CUDA_ARCH_LIST"].split(";"), key=lambda cc: tuple(int(p.split("+")[0]) for p in cc.split(".")))
    assert ccs[-1] == "10.0+PTX"
    empty: dict = {}
    sanitize_cuda_arch_list(empty)
    assert empty == {}
