"""Device, precision and DeepSpeed settings, chosen from the hardware.

CUDA + NCCL + bf16 when GPUs are present (and bf16 is supported); CPU + gloo +
fp32 otherwise. Pure functions: the choice is testable without a GPU by passing
``cuda_available`` explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


def deepspeed_config(
    ds: DeepSpeedConfig, train: TrainConfig, micro_batch_size: int, world_size: int, runtime: Runtime, total_steps: int = 0
) -> dict[str, Any]:
    """The DeepSpeed JSON config for one training job.

    ``train_batch_size`` is micro x world: callers keep the *global* batch fixed by
    choosing ``micro_batch_size = ceil(batch / world)`` and weighting the loss.
    ``total_steps`` (optimiser steps in the whole run) is needed by the cosine schedule.
    """
    if train.lr_schedule == "cosine" and total_steps < 1:
        raise ValueError("lr_schedule 'cosine' needs the run's total_steps")
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage == 3:
        # Gather parameters layer by layer; release them right after use.
        zero.update({"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 5e7})
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": runtime.use_gpu}
    if ds.offload_params and ds.zero_stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": runtime.use_gpu}
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
