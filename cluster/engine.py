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
from typing import Any, Callable, Optional, Protocol

import torch

from cluster import checkpoint_integrity

log = logging.getLogger(__name__)


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
    """A private local copy of the newest intact reported checkpoint (the caller may delete it)."""

    local_dir: str
    origin: str  # where it came from, for messages


class CheckpointError(RuntimeError):
    """No registered checkpoint is intact: nothing is opened, and the message says what to do."""


def restore_first_intact(candidates: list[tuple[str, Callable[[str], None]]], rank: int) -> RestoredCheckpoint:
    """The newest of ``candidates`` (origin, download-into-directory; newest first) whose seals verify.

    Nothing is unpickled before :func:`cluster.checkpoint_integrity.verify` passes; a damaged
    checkpoint is skipped with a warning naming what is wrong, and the previous one is tried.
    """
    reasons = []
    for origin, download in candidates:
        local = tempfile.mkdtemp(prefix=f"recdistill-resume-rank{rank}-")
        try:
            download(local)
            problem = checkpoint_integrity.verify(local)
        except (OSError, ValueError) as exc:  # a checkpoint directory that cannot even be copied
            problem = f"it cannot be read: {exc}"
        if problem is None:
            if reasons:
                log.warning("rank %d: resuming from %s, the newest intact checkpoint", rank, origin)
            return RestoredCheckpoint(local, origin)
        shutil.rmtree(local, ignore_errors=True)
        reasons.append(f"{origin}: {problem}")
        log.warning("rank %d: checkpoint %s is not intact (%s); trying the previous one", rank, origin, problem)
    raise CheckpointError("no intact checkpoint to resume from:\n  " + "\n  ".join(reasons)
                          + "\nDelete that checkpoint folder to train this stage from scratch, or restore the files.")


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
        # Each into a directory of this rank's own: Ray's default download path is shared by every worker on a node.
        candidates = [(str(c.path), c.to_directory) for c in [checkpoint, *_older_ray_checkpoints(checkpoint)]]
        return restore_first_intact(candidates, self.rank)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[str] = None) -> None:
        import ray.train

        if checkpoint_dir:
            checkpoint_integrity.seal(checkpoint_dir, self.rank)
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

    def _checkpoint_names(self) -> list[str]:
        """The checkpoints reported so far, oldest first (names are zero-padded counters)."""
        if not os.path.isdir(self.checkpoint_root):
            return []
        return sorted(n for n in os.listdir(self.checkpoint_root) if n.startswith("checkpoint_"))

    def restore_checkpoint(self) -> Optional[RestoredCheckpoint]:
        names = self._checkpoint_names()
        if not names:
            return None
        paths = [os.path.join(self.checkpoint_root, n) for n in reversed(names)]
        return restore_first_intact([(p, lambda local, p=p: shutil.copytree(p, local, dirs_exist_ok=True)) for p in paths],
                                    self.rank)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[str] = None) -> None:
        entry: dict[str, Any] = {"metrics": dict(metrics), "checkpoint": None}
        if checkpoint_dir:
            checkpoint_integrity.seal(checkpoint_dir, self.rank)
        if checkpoint_dir and self.rank == 0:
            target = os.path.join(self.checkpoint_root, f"checkpoint_{len(self._checkpoint_names()):06d}")
            shutil.copytree(checkpoint_dir, target)
            entry["checkpoint"] = target
        self.reports.append(entry)

    def wrap_data_parallel(self, module: torch.nn.Module) -> torch.nn.Module:
        if self.world_size == 1:
            return module
        return torch.nn.parallel.DistributedDataParallel(module)


def _older_ray_checkpoints(checkpoint: Any) -> list[Any]:
    """The checkpoints Ray keeps beside ``checkpoint`` (``num_to_keep``), newest first; names are timestamps."""
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    current = str(checkpoint.path).rstrip("/")
    try:
        infos = checkpoint.filesystem.get_file_info(pafs.FileSelector(os.path.dirname(current)))
    except OSError:
        return []
    older = sorted((i.path for i in infos if i.type == pafs.FileType.Directory
                    and os.path.basename(i.path).startswith("checkpoint_") and i.path < current), reverse=True)
    return [Checkpoint(path=p, filesystem=checkpoint.filesystem) for p in older]
