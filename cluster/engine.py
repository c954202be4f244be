"""What a worker loop needs from the engine that runs it, and two engines that provide it.

A stage's worker loop (``cluster/train_teacher.py``, ``precompute.py``, ``distill.py``)
asks its engine for five things only: its rank, the world size, its device, the
checkpoint to resume from, and a way to report metrics with a new checkpoint.
:class:`RayTrainContext` answers them with Ray Train (one per Ray Train worker);
:class:`InProcessContext` answers them in the calling process, so that a loop runs in
a test, a benchmark or a debugger with no Ray at all (one rank, or several ranks of a
process group the caller set up).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

import torch


def quiet_worker_logs(log_level: str = "INFO") -> None:
    """Silence, once per worker process, the lines a user cannot act on; the loop prints its own per epoch.

    * DeepSpeed's ZeRO collectives call ``all_gather_into_tensor`` / ``reduce_scatter_tensor``,
      which torch deprecates with a FutureWarning at every step of every epoch on every rank
      (hundreds of lines per epoch). Nothing in this project calls them; only a DeepSpeed
      release can change it.
    * Ray Train logs every report ("Reporting training result ...": the whole metrics dict,
      from every rank) and every checkpoint upload at INFO. They stay visible at
      ``run.log_level=DEBUG``.
    """
    for name in ("all_gather_into_tensor", "reduce_scatter_tensor"):
        warnings.filterwarnings("ignore", message=rf"`torch\.distributed\.{name}` is deprecated", category=FutureWarning)
    if log_level != "DEBUG":
        logging.getLogger("ray.train").setLevel(logging.WARNING)


@dataclass(frozen=True)
class RestoredCheckpoint:
    """A private local copy of the last reported checkpoint (the caller may delete it)."""

    local_dir: str
    origin: str  # where it came from, for messages


class WorkerContext(Protocol):
    rank: int
    world_size: int

    def device(self, use_gpu: bool) -> torch.device: ...

    def restore_checkpoint(self) -> Optional[RestoredCheckpoint]: ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[str] = None) -> None: ...

    def wrap_data_parallel(self, module: torch.nn.Module) -> torch.nn.Module: ...


class RayTrainContext:
    """The context of the current Ray Train worker (call inside ``train_loop_per_worker``)."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()

    def device(self, use_gpu: bool) -> torch.device:
        if not use_gpu:
            return torch.device("cpu")
        import ray.train.torch

        return ray.train.torch.get_device()

    def restore_checkpoint(self) -> Optional[RestoredCheckpoint]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        # A directory of this rank's own: Ray's default download path is shared by every worker on a node.
        local = checkpoint.to_directory(tempfile.mkdtemp(prefix=f"recdistill-resume-rank{self.rank}-"))
        return RestoredCheckpoint(local, str(checkpoint.path))

    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[str] = None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    def wrap_data_parallel(self, module: torch.nn.Module) -> torch.nn.Module:
        if self.world_size == 1:
            return module
        import ray.train.torch

        return ray.train.torch.prepare_model(module, move_to_device=False)


@dataclass
class InProcessContext:
    """An engine in the calling process: checkpoints are directories under ``checkpoint_root``.

    ``rank``/``world_size`` describe a torch.distributed group the caller already initialised
    (or 1 rank without one). ``reports`` records every report, for tests to inspect.
    """

    checkpoint_root: str
    rank: int = 0
    world_size: int = 1
    reports: list[dict[str, Any]] = field(default_factory=list)

    def device(self, use_gpu: bool) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")

    def _latest(self) -> Optional[str]:
        if not os.path.isdir(self.checkpoint_root):
            return None
        names = sorted(n for n in os.listdir(self.checkpoint_root) if n.startswith("checkpoint_"))
        return os.path.join(self.checkpoint_root, names[-1]) if names else None

    def restore_checkpoint(self) -> Optional[RestoredCheckpoint]:
        latest = self._latest()
        if latest is None:
            return None
        local = tempfile.mkdtemp(prefix=f"recdistill-resume-rank{self.rank}-")
        shutil.copytree(latest, local, dirs_exist_ok=True)
        return RestoredCheckpoint(local, latest)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[str] = None) -> None:
        entry: dict[str, Any] = {"metrics": dict(metrics), "checkpoint": None}
        if checkpoint_dir and self.rank == 0:
            target = os.path.join(self.checkpoint_root, f"checkpoint_{len(self.reports):06d}")
            shutil.copytree(checkpoint_dir, target)
            entry["checkpoint"] = target
        self.reports.append(entry)

    def wrap_data_parallel(self, module: torch.nn.Module) -> torch.nn.Module:
        if self.world_size == 1:
            return module
        return torch.nn.parallel.DistributedDataParallel(module)
