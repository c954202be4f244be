"""Ray wiring shared by the stages: connect to a cluster, build Ray Train configs."""

from __future__ import annotations

import logging
import os
import random
import socket
from typing import Any, Callable

import fsspec
import pyarrow.fs
import ray
from fsspec.implementations.local import LocalFileSystem
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig

from cluster.config import Config, ConfigError
from data_pipeline import fsio
from cluster.runtime import select_runtime, use_gpu_for_scaling

log = logging.getLogger(__name__)


def ensure_ray(cfg: Config) -> None:
    """Join ``scaling.address`` (or RAY_ADDRESS, e.g. under ``ray job submit``); else start a local Ray."""
    if ray.is_initialized():
        return
    address = cfg.scaling.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        start_local_ray(log_to_driver=True)
    log.info("Ray resources: %s", ray.cluster_resources())


class ResourceError(ConfigError):
    """The Ray cluster cannot hold the workers a stage asks for."""


def require_resources(cfg: Config, elastic: bool = False) -> None:
    """Refuse, with the numbers, a worker group the connected cluster cannot place (unless it autoscales).

    Checked against ``ray.cluster_resources()`` (every node) and the largest node (one worker's
    CPUs must fit on one node); an elastic stage needs only ``scaling.min_workers``.
    """
    if cfg.scaling.autoscaling:
        return
    sc = cfg.scaling
    workers = sc.min_workers if elastic and sc.min_workers is not None else sc.num_workers
    use_gpu = use_gpu_for_scaling(sc.use_gpu)
    total = ray.cluster_resources()
    largest_node_cpus = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=0.0)
    needs = {"CPU": workers * sc.cpus_per_worker, **({"GPU": float(workers)} if use_gpu else {})}
    short = {k: (v, total.get(k, 0.0)) for k, v in needs.items() if v > total.get(k, 0.0)}
    what = f"{workers} worker{'s' if workers > 1 else ''}" + (" (scaling.min_workers, elastic)" if workers != sc.num_workers else "")
    if short:
        have = ", ".join(f"{k}: needs {need:g}, the cluster has {got:g}" for k, (need, got) in short.items())
        raise ResourceError(
            f"the Ray cluster cannot start {what} with scaling.cpus_per_worker={sc.cpus_per_worker:g}"
            f"{' and 1 GPU each' if use_gpu else ''} ({have}). Lower scaling.num_workers (or set scaling.min_workers "
            "for an elastic distill), add nodes, or set scaling.autoscaling=true if the cluster grows on demand")
    if sc.cpus_per_worker > largest_node_cpus:
        raise ResourceError(f"scaling.cpus_per_worker={sc.cpus_per_worker:g} does not fit on any node (the largest has "
                            f"{largest_node_cpus:g} CPUs)")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C ended a stage; the message says what it committed."""


def fit(trainer: Any, finished: Callable[[], bool], cfg: Config, name: str) -> Any:
    """``trainer.fit()``, with Ctrl-C ending it as :class:`Interrupted`.

    Ray Train's own SIGINT handler aborts the run and then lets ``fit`` return (or exits 0):
    a stage would go on as if it had finished. ``finished()`` says from the stage's own
    records whether it did; if not, the run was aborted, and the message names the last
    checkpoint Ray registered under ``run_dir/ray/<name>``, which the next run resumes from.
    """
    try:
        result = trainer.fit()
    except SystemExit:
        raise Interrupted(_committed(cfg, name)) from None
    if not finished():
        raise Interrupted(_committed(cfg, name))
    return result


def _committed(cfg: Config, name: str) -> str:
    if name == "precompute":
        return "interrupted; every committed soft-label shard is kept, and the next run computes only the others"
    folder = fsio.join(cfg.run.run_dir, "ray", name)
    try:
        snapshot = fsio.read_json(fsio.join(folder, "checkpoint_manager_snapshot.json"), cfg.data.storage_options)
        metrics = [r["metrics"] for r in snapshot.get("checkpoint_results", [])]
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        metrics = []
    if not metrics:
        return f"interrupted before the first checkpoint of {name}: the next run starts it afresh"
    last = max(metrics, key=lambda m: (m.get("epoch", 0), m.get("step", 0)))
    where = f"epoch {last.get('epoch')}" + (f", step {last['step']}" if last.get("step") else "")
    return f"interrupted; the last checkpoint kept is at {where} under {folder}: run the same command again to resume from it"


def start_local_ray(**init_kwargs: Any) -> None:
    """Start a fresh one-machine Ray cluster for this process, with its own dashboard.

    ``address="local"`` never joins a stray head. The dashboard is there for Ray Train's
    placement-group cleaner, which asks the state API (served by the dashboard) every
    second whether the train controller is alive: without one it logs a warning each
    time, and it finds "the" cluster by auto-detection, which on a machine that runs
    another Ray cluster can be the other one, where our controller does not exist, and
    then it removes our workers' placement group. So every process of this job is told
    our own dashboard's address (``RAY_API_SERVER_ADDRESS``).
    """
    port = free_port()
    env = {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
    ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
             runtime_env={"env_vars": env}, **init_kwargs)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now.

    Drawn from 20000-32767: above Ray's worker ports (10002-19999) and below the kernel's ephemeral range
    (32768 and up on Linux, 49152 and up elsewhere), where no port is handed out without being asked for
    by number. A port from ``bind(0)`` comes from the ephemeral range, and on a busy machine a Ray worker
    or an outgoing connection took one between this call and the caller's bind (Serve's proxy then failed
    to bind it)."""
    draw = random.Random()
    for _ in range(200):
        port = draw.randrange(20000, 32768)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # in use: draw again
                continue
            return port
    with socket.socket() as s:  # 200 ports in use: fall back to the kernel's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(cfg: Config) -> dict[str, str]:
    """Environment for train workers: DeepSpeed's accelerator follows the hardware."""
    use_gpu = use_gpu_for_scaling(cfg.scaling.use_gpu)
    runtime = select_runtime(cfg.run.device if use_gpu else "cpu", cfg.deepspeed.bf16, cuda_available=use_gpu)
    return {"DS_ACCELERATOR": runtime.accelerator}


def scaling_config(cfg: Config, elastic: bool = False) -> ScalingConfig:
    use_gpu = use_gpu_for_scaling(cfg.scaling.use_gpu)
    num_workers: int | tuple[int, int] = cfg.scaling.num_workers
    if elastic and cfg.scaling.min_workers is not None:
        num_workers = (cfg.scaling.min_workers, cfg.scaling.num_workers)
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    extra = {"elastic_resize_monitor_interval_s": cfg.scaling.elastic_resize_interval_s} if isinstance(num_workers, tuple) else {}
    return ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources, **extra)


def torch_config(cfg: Config) -> TorchConfig:
    return TorchConfig(backend="nccl" if use_gpu_for_scaling(cfg.scaling.use_gpu) else "gloo")


def storage_location(run_dir: str, storage_options: dict) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """Ray Train's storage under ``run_dir/ray``: a local absolute path, or the same fsspec
    filesystem (and options: endpoint, credentials) that the rest of the run uses."""
    fs, path = fsspec.core.url_to_fs(run_dir, **storage_options)
    if isinstance(fs, LocalFileSystem):
        return os.path.join(os.path.abspath(path), "ray"), None
    return f"{path.rstrip('/')}/ray", pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def run_config(cfg: Config, name: str, score_attribute: str | None = None) -> RunConfig:
    checkpoints = CheckpointConfig(
        num_to_keep=2,
        checkpoint_score_attribute=score_attribute,
        checkpoint_score_order="max",
    )
    path, filesystem = storage_location(cfg.run.run_dir, cfg.data.storage_options)
    return RunConfig(
        name=name,
        storage_path=path,
        storage_filesystem=filesystem,
        # Starting the worker group is retried a bounded number of times (Ray's default is forever).
        failure_config=FailureConfig(max_failures=cfg.scaling.max_failures, controller_failure_limit=cfg.scaling.start_attempts - 1),
        checkpoint_config=checkpoints,
        worker_runtime_env={"env_vars": worker_env(cfg)},
    )
