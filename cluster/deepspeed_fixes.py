"""Fixes for three DeepSpeed 0.19.8 faults: NVMe optimizer offload's gradient I/O, JIT builds under "9.0a", and
setting a ZeRO-3 parameter whose size the worker count does not divide.

**Setting a full parameter.** ZeRO-3 pads a parameter of n values to ``ceil(n / W)`` per worker, so the last
worker's partition reaches past the parameter's end (5 rating levels on 2 workers: 3 + 3 for 5 values).
``safe_set_full_fp32_param`` / ``safe_set_full_optimizer_state`` (the portable checkpoint's resume) cut
that partition out of the full value with ``narrow``, which fails past the end: ``start (3) + length (3)
exceeds dimension size (5)``, so a rating teacher could not resume. :func:`set_full_hp_param` copies the
values that exist and leaves the padding as it is (found resuming a rating teacher; tested in
``tests/cluster/test_deepspeed_fixes.py``).

**JIT builds.** DeepSpeed's op builder sorts the architectures of ``TORCH_CUDA_ARCH_LIST`` by parsing each
as integers, so an arch-specific entry such as ``9.0a`` (Hopper's sm_90a, which PyTorch accepts and some
CUDA images set) fails FusedAdam's build with ``invalid literal for int() with base 10: '0a'``: the
teacher could not start on an H200 (found on a lent machine). :func:`sanitize_cuda_arch_list` drops the
suffix (``9.0a`` -> ``9.0``: the ops DeepSpeed builds use no arch-specific instructions).

**NVMe offload.** Gradient partitions its async I/O moves wrongly.

With ``offload_optimizer: nvme``, ZeRO-3 swaps each worker's gradient partitions of 1 MB or more to
files and, when the optimizer steps a sub-group, reads them back into one page-locked buffer at each
partition's offset in the sub-group (DeepSpeed 0.19.8, ``PartitionedOptimizerSwapper
._swap_in_pinned_gradients``; writes go the same way in ``OptimizerSwapper._writeback_gradients``).
DeepSpeed's async I/O opens those files with ``O_DIRECT``, which needs buffer addresses aligned to the
disk's logical block (512 bytes or 4 KB), and a partition's offset is aligned only by luck: it is the sum of
the partitions before it (biases of 64 elements, ...). A read or write at an unaligned page-locked
address moves wrong bytes and still reports success (measured: the op returns its count, the buffer
holds stale data), so the optimizer steps those tensors with garbage gradients. It showed at 2
workers and not at 1 because the partition sizes, and so the offsets, change with the worker count.

The fix sends each partition whose address is not aligned through an ordinary (not page-locked)
tensor, which the async I/O op copies through its own aligned buffer; aligned ones take DeepSpeed's
own path unchanged. It is applied, once per process, by whichever recipe builds a DeepSpeed engine
(:func:`apply`). ``tests/cluster/test_deepspeed_fixes.py`` reproduces the fault on the real op.
"""

from __future__ import annotations

from typing import Any

import torch

#: O_DIRECT's alignment for buffer addresses: a disk's logical block is 512 bytes or 4 KB; the page size
#: covers both (misalignment costs a bounce copy, never wrong bytes).
O_DIRECT_ALIGNMENT = 4096

_applied = False


def is_direct_io_aligned(tensor: torch.Tensor) -> bool:
    """Whether the async I/O op can move ``tensor`` with O_DIRECT straight from/to its memory."""
    return tensor.data_ptr() % O_DIRECT_ALIGNMENT == 0


def read_parts(aio_handle: Any, buffer: torch.Tensor, parts: list[tuple[int, int, str]]) -> None:
    """Fill ``buffer[offset:offset+length]`` from each ``(offset, length, path)`` file, whatever the offset."""
    _transfer(aio_handle, buffer, parts, reading=True)


def write_parts(aio_handle: Any, buffer: torch.Tensor, parts: list[tuple[int, int, str]]) -> None:
    """Write ``buffer[offset:offset+length]`` to each ``(offset, length, path)`` file, whatever the offset."""
    _transfer(aio_handle, buffer, parts, reading=False)


def _transfer(aio_handle: Any, buffer: torch.Tensor, parts: list[tuple[int, int, str]], reading: bool) -> None:
    """Aligned parts in one batch straight from/to ``buffer``; the others one at a time through a bounce
    tensor (not page-locked: the op moves it through its own aligned buffer), so at most one part's extra memory."""
    submit = aio_handle.async_pread if reading else aio_handle.async_pwrite
    views = [(buffer.narrow(0, offset, length), path) for offset, length, path in parts]
    direct = [(view, path) for view, path in views if is_direct_io_aligned(view)]
    for view, path in direct:
        submit(view, path, 0)
    if direct and aio_handle.wait() != len(direct):
        raise RuntimeError(f"async I/O moved fewer than {len(direct)} gradient partitions")
    for view, path in views:
        if is_direct_io_aligned(view):
            continue
        bounce = torch.empty_like(view) if reading else view.clone()
        submit(bounce, path, 0)
        if aio_handle.wait() != 1:
            raise RuntimeError(f"async I/O {'read' if reading else 'write'} of {path} failed")
        if reading:
            view.copy_(bounce)


def _swapped_parts(swap_info: Any) -> list[tuple[int, int, str]]:
    return [(grad.offset, grad.length, grad.path) for grad in swap_info.swapped_gradients.values()]


def sanitize_cuda_arch_list(environ: Any = None) -> None:
    """``TORCH_CUDA_ARCH_LIST`` without arch-specific suffixes (``"8.0;9.0a+PTX"`` -> ``"8.0;9.0+PTX"``)."""
    import os
    import re

    environ = os.environ if environ is None else environ
    value = environ.get("TORCH_CUDA_ARCH_LIST")
    if not value:
        return
    entries = []
    for entry in value.replace(" ", ";").split(";"):
        cleaned = re.sub(r"^(\d+\.\d+)[a-z]+", r"\1", entry.strip())
        if cleaned and cleaned not in entries:
            entries.append(cleaned)
    environ["TORCH_CUDA_ARCH_LIST"] = ";".join(entries)


def set_full_hp_param(self, value: torch.Tensor, param: Any, optim_state_key: Any = None) -> None:
    """DeepSpeed's ``DeepSpeedZeroOptimizer_Stage3.set_full_hp_param`` for any partition, the padded last included."""
    if not param.requires_grad:
        return
    if value.numel() != param.ds_numel:
        raise ValueError(f"a full value of {value.numel()} elements for a parameter of {param.ds_numel}")
    partition, group_idx = self._get_fp32_opt_state_partition(param, release_swap_buffers=False,
                                                             optim_state_key=optim_state_key)
    start = partition.numel() * self._get_param_partition_rank(param)
    piece = value.flatten()[start:start + partition.numel()]  # shorter than the partition on the padded last rank
    partition.data.view(-1)[: piece.numel()].copy_(piece.data)
    if self._swappable_optimizer_subgroup(group_idx):
        self._optimizer_states_and_gradient_swap_out(group_idx)


def apply() -> None:
    """Route DeepSpeed's swapped-gradient reads and writes through :func:`read_parts` / :func:`write_parts`,
    set full parameters with :func:`set_full_hp_param`, and make ``TORCH_CUDA_ARCH_LIST`` one DeepSpeed's JIT builder can read."""
    global _applied
    sanitize_cuda_arch_list()
    if _applied:
        return
    from deepspeed.runtime.swap_tensor.optimizer_utils import OptimizerSwapper
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.swap_tensor.partitioned_optimizer_swapper import PartitionedOptimizerSwapper

    def swap_in_pinned_gradients(self, aio_handle, parameter, gradient_tensor):
        swap_info = self.swap_params_info[OptimizerSwapper.parameter_id(parameter)]
        read_parts(aio_handle, gradient_tensor, _swapped_parts(swap_info))

    def writeback_gradients(self, swap_info, parameter, aio_handle):
        if swap_info.swapped_gradients:
            write_parts(aio_handle, parameter.grad, _swapped_parts(swap_info))
        if swap_info.unswapped_gradients:
            # As DeepSpeed does: the in-memory fragments keep the updated values for the next swap-in.
            swap_info.write_unswapped_gradients(src_buffer=parameter.grad)

    DeepSpeedZeroOptimizer_Stage3.set_full_hp_param = set_full_hp_param
    PartitionedOptimizerSwapper._swap_in_pinned_gradients = swap_in_pinned_gradients
    OptimizerSwapper._writeback_gradients = writeback_gradients
    _applied = True
