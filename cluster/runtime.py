"""Device, precision and DeepSpeed settings, chosen from the hardware.

CUDA + NCCL + bf16 when GPUs are present (and bf16 is supported); CPU + gloo +
fp32 otherwise. Pure functions: the choice is testable without a GPU by passing
``cuda_available`` explicitly.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from typing import Any, Optional

import torch

from cluster.config import DeepSpeedConfig

from distill.config import TrainConfig


@dataclass(frozen=True)
class Runtime:
    device: str  # "cuda" or "cpu"
    backend: str  # torch.distributed backend: "nccl" or "gloo"
    bf16: bool
    accelerator: str  # DS_ACCELERATOR value: "cuda" or "cpu"

    @property
    def use_gpu(self) -> bool:
        return self.device == "cuda"


def select_runtime(
    device: str = "auto", bf16: str = "auto", cuda_available: bool | None = None, bf16_supported: bool | None = None
) -> Runtime:
    """Resolve ``run.device`` / ``deepspeed.bf16`` ("auto" | explicit) against the hardware."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if device == "cuda" and not cuda_available:
        raise RuntimeError("run.device=cuda but no CUDA device is visible")
    on_gpu = device == "cuda" or (device == "auto" and cuda_available)
    if on_gpu:
        if bf16_supported is None:
            bf16_supported = torch.cuda.is_bf16_supported()
        use_bf16 = bf16 == "true" or (bf16 == "auto" and bf16_supported)
        return Runtime(device="cuda", backend="nccl", bf16=use_bf16, accelerator="cuda")
    # bf16 on CPU is slow and lossy for training; fp32 unless asked explicitly.
    return Runtime(device="cpu", backend="gloo", bf16=bf16 == "true", accelerator="cpu")


def use_gpu_for_scaling(use_gpu: str, cuda_available: bool | None = None) -> bool:
    """``scaling.use_gpu`` ("auto"|"true"|"false") -> bool, for Ray's ScalingConfig (decided on the driver)."""
    if use_gpu == "auto":
        if cuda_available is None:
            import ray

            cuda_available = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
        return bool(cuda_available)
    return use_gpu == "true"


#: Swap buffers of parameters offloaded to NVMe: ZeRO-3 swaps one tensor per buffer, and a block's
#: parameters (12 tensors in distill.model.Block) plus the next block's prefetch must fit at once.
NVME_PARAM_BUFFERS = 32
#: ZeRO-3 keeps at most this many gathered parameter elements, and keeps one gathered when it is used again
#: within this many elements (DeepSpeed's defaults).
LIVE_PARAMETERS = 1_000_000_000
REUSE_DISTANCE = 1_000_000_000
#: Elements per gradient-reduction bucket.
REDUCE_BUCKET = 50_000_000
#: The optimizer's NVMe swap: buffers, and elements per sub-group (one buffer each).
OPTIMIZER_SWAP_BUFFERS = 4
OPTIMIZER_SUB_GROUP = 50_000_000


def nvme_swap_dir(ds: DeepSpeedConfig, run_dir: str) -> Optional[str]:
    """This run's own folder under ``deepspeed.nvme_path`` (None without NVMe offload).

    DeepSpeed's swap files are scratch (the checkpoints are portable and live in the run), named by rank
    and by tensor ids that change with the worker count: left in place they would pile up (a 2-worker
    run and its 1-worker resume of the 1B teacher left 36 GB). One folder per run lets each start clear
    its own leftovers without touching another job's files under the same path.
    """
    if not ds.nvme_path or "nvme" not in (ds.offload_optimizer, ds.offload_params):
        return None
    run = run_dir.rstrip("/")  # s3://b/r and s3://b/r/ are one run
    return os.path.join(os.path.abspath(ds.nvme_path), "recdistill-" + hashlib.sha256(run.encode()).hexdigest()[:12])


def folder_bytes(path: Optional[str]) -> int:
    """Bytes of the files under ``path`` (0 when it does not exist)."""
    total = 0
    for root, _, names in os.walk(path) if path else ():
        for name in names:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:  # a live run's swapper removed it meanwhile
                pass
    return total


def clear_swap_dir(path: Optional[str], local_rank: int, recreate: bool = True) -> None:
    """Empty a run's NVMe swap folder (at the start) or remove it (``recreate=False``, at the end): once per
    node (local rank 0), after every rank is done with its files and before any uses the folder again."""
    if path is None:
        return
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    if local_rank == 0:
        shutil.rmtree(path, ignore_errors=True)
        if recreate:
            os.makedirs(path, exist_ok=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def offload_settings(ds: DeepSpeedConfig, runtime: Runtime, swap_buffer_numel: int = 0) -> dict[str, Any]:
    """The ``zero_optimization`` keys of ``deepspeed.offload_*``: CPU offload, or ZeRO-Infinity's NVMe offload.

    ``swap_buffer_numel``: the largest parameter partition a worker swaps (elements); NVMe parameter
    offload sizes its pinned buffers to it rather than DeepSpeed's default of 1e8 elements each
    (5 x 400 MB), which on a small host would be most of the memory the offload was meant to save.
    """
    out: dict[str, Any] = {}
    pin = runtime.use_gpu  # page-locked host memory speeds GPU copies; on a CPU-only host it only costs RAM
    if ds.offload_optimizer != "none":
        out["offload_optimizer"] = {"device": ds.offload_optimizer, "pin_memory": pin}
        if ds.offload_optimizer == "nvme":
            out["offload_optimizer"].update(nvme_path=ds.nvme_path, buffer_count=OPTIMIZER_SWAP_BUFFERS,
                                            pipeline_read=False, pipeline_write=False)
            # The optimizer steps one sub-group at a time through its swap buffers (each a sub-group's numel):
            # DeepSpeed's default sub-group of 1e9 elements would make them 4 x 4 GB.
            out["sub_group_size"] = OPTIMIZER_SUB_GROUP
    if ds.offload_params != "none" and ds.zero_stage == 3:
        out["offload_param"] = {"device": ds.offload_params, "pin_memory": pin}
        if ds.offload_params == "nvme":
            if swap_buffer_numel < 1:
                raise ValueError("NVMe parameter offload needs swap_buffer_numel (the largest parameter partition)")
            # max_in_cpu=0: every partition lives on disk between uses (DeepSpeed's default keeps 1e9 elements in RAM).
            out["offload_param"].update(nvme_path=ds.nvme_path, buffer_count=NVME_PARAM_BUFFERS,
                                        buffer_size=swap_buffer_numel, max_in_cpu=0)
    return out


def deepspeed_config(
    ds: DeepSpeedConfig, train: TrainConfig, micro_batch_size: int, world_size: int, runtime: Runtime, total_steps: int = 0,
    swap_buffer_numel: int = 0,
) -> dict[str, Any]:
    """The DeepSpeed JSON config for one training job.

    ``train_batch_size`` is micro x world: callers keep the *global* batch fixed by
    choosing ``micro_batch_size = ceil(batch / world)`` and weighting the loss.
    ``total_steps`` (optimiser steps in the whole run) is needed by the cosine schedule;
    ``swap_buffer_numel`` by NVMe parameter offload (see :func:`offload_settings`).
    """
    if train.lr_schedule == "cosine" and total_steps < 1:
        raise ValueError("lr_schedule 'cosine' needs the run's total_steps")
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage == 3:
        # Gather parameters layer by layer; release them right after use.
        zero.update({"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 5e7,
                     # DeepSpeed's defaults, spelled out: cluster.memory_plan counts what they keep gathered.
                     "stage3_max_live_parameters": LIVE_PARAMETERS, "stage3_max_reuse_distance": REUSE_DISTANCE})
    if ds.zero_stage >= 1:
        # DeepSpeed's default bucket of 5e8 elements is a 2 GB fp32 buffer per worker; 5e7 moves the same
        # gradients in more, smaller collectives (the sums are the same; cluster.memory_plan counts it).
        zero["reduce_bucket_size"] = REDUCE_BUCKET
    zero.update(offload_settings(ds, runtime, swap_buffer_numel))
    config: dict[str, Any] = {
        "train_batch_size": micro_batch_size * world_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": train.grad_clip if train.grad_clip > 0 else 0.0,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": train.lr,
                "weight_decay": train.weight_decay,
                "betas": [0.9, 0.98],
                # FusedAdam needs CUDA; on CPU use torch's AdamW.
                "torch_adam": not runtime.use_gpu,
            },
        },
        "zero_optimization": zero,
        "bf16": {"enabled": runtime.bf16},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if "nvme" in (ds.offload_optimizer, ds.offload_params):
        # DeepSpeed's async I/O (libaio); its defaults, spelled out so a reader of the config sees them.
        config["aio"] = {"block_size": 1048576, "queue_depth": 8, "intra_op_parallelism": 1, "single_submit": False,
                         "overlap_events": True}
    if train.lr_schedule == "cosine":
        # The formula of distill.training.lr_ratio (the students' schedule); needs the run's length.
        config["scheduler"] = {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": total_steps,
                "warmup_num_steps": max(train.warmup_steps, 2),  # DeepSpeed warms up >= 2 steps
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": 0.0,
                "warmup_type": "linear",
            },
        }
    elif train.warmup_steps > 0:
        config["scheduler"] = {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": train.lr,
                "warmup_num_steps": max(train.warmup_steps, 2),
                "warmup_type": "linear",
            },
        }
    return config
