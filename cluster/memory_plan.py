"""Peak memory of every stage's workers, estimated before launch, against what the machines have.

Part of the run plan: :func:`stage_memory` is a pure function of the config, the catalog size
and the worker count. It adds up, per worker:

* **model states**, by ZeRO stage and offload: parameters, fp32 master weights, gradients and
  Adam's two moments, each either partitioned over the workers (ZeRO), kept whole (stage 0 /
  DDP), moved to host RAM (offload ``cpu``: on a CPU-only machine that is the same RAM) or to
  NVMe files (only DeepSpeed's swap buffers stay in RAM). The byte counts per parameter are
  those of DeepSpeed's own estimators (``estimate_zero3_model_states_mem_needs``) with fp32
  in place of fp16 where the run trains in fp32;
* **ZeRO-3's working set**: the gathered weights of the blocks in flight and the gradient
  bucket being reduced;
* **activations** of one micro-batch: the tensors a block keeps for its backward
  (:data:`FLOATS_KEPT_PER_TOKEN`), or only each block's input with activation checkpointing,
  plus the logits over the catalog and their gradient;
* the **reader's buffers** and the **process itself** (Python, torch, DeepSpeed and a Ray
  Train worker: :data:`WORKER_BASE_BYTES`, measured on this project's machines).

:func:`check_fit` compares a stage's estimate with the host RAM per node (this machine's
available memory, or ``scaling.memory_per_node_gb``), the GPU memory per device and the free
space under ``deepspeed.nvme_path``, and when it does not fit, tries the settings a user can
change (offload, activation checkpointing, more workers) and names those that would.
``bench/memory_plan.py`` checks the estimates against measured peaks.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from typing import Optional

from cluster.config import Config, DeepSpeedConfig
from distill.config import ModelConfig
from distill.sizing import count_parameters

GB = 1024**3
#: RSS of a Ray Train worker process with torch, DeepSpeed and gloo loaded, before any model
#: (measured by bench/memory_plan.py on the 2-core CPU machine: 0.6-0.7 GB).
WORKER_BASE_BYTES = int(0.65 * GB)
#: fp32 values a pre-norm block keeps per token for its backward, in units of d_model and ffn_dim:
#: LN inputs and outputs (4d), q, k, v (3d), attention output (1d), FFN input and GELU in/out (2f),
#: plus the attention kernel's own saved output (1d); dropout masks are counted as bytes below.
FLOATS_KEPT_PER_TOKEN = (9, 2)  # (x d_model, x ffn_dim)
#: ZeRO-3 gathers a block's weights while the next one's are prefetched: two blocks in flight.
BLOCKS_IN_FLIGHT = 2
#: Ray kills a worker when its node passes this share of memory (RAY_memory_usage_threshold).
RAY_MEMORY_THRESHOLD = 0.95


@dataclass(frozen=True)
class Estimate:
    """One worker's estimated peak: host RAM and GPU memory by part (bytes), and its NVMe files."""

    stage: str
    workers: int
    host: dict[str, int]
    device: dict[str, int] = field(default_factory=dict)
    nvme: int = 0
    rank0_extra: dict[str, int] = field(default_factory=dict)  # what rank 0 holds on top (loading, exporting)

    @property
    def host_total(self) -> int:
        return sum(self.host.values())

    @property
    def rank0_total(self) -> int:
        return self.host_total + sum(self.rank0_extra.values())

    @property
    def device_total(self) -> int:
        return sum(self.device.values())

    def summary(self) -> str:
        text = f"{self.rank0_total / GB:.1f} GB"
        if self.rank0_extra:
            text += f" rank 0, {self.host_total / GB:.1f} GB others"
        if self.device:
            text += f", GPU {self.device_total / GB:.1f} GB"
        if self.nvme:
            text += f", NVMe {self.nvme / GB:.1f} GB"
        return text

    def breakdown(self) -> str:
        parts = {**self.host, **{f"rank 0: {k}": v for k, v in self.rank0_extra.items()}}
        shown = ", ".join(f"{name} {value / GB:.2f}" for name, value in parts.items() if value >= 0.005 * GB)
        return f"{shown} (GB)"


@dataclass(frozen=True)
class Capacity:
    """What one node offers the workers placed on it."""

    host_bytes: int  # RAM the workers of a node may use together
    workers_per_node: int
    device_bytes: Optional[int] = None  # per GPU; None when the driver cannot see one
    nvme_free: Optional[int] = None  # under deepspeed.nvme_path
    origin: str = ""


# --------------------------------------------------------------------------------------
# Pieces


def model_state_bytes(params: int, workers: int, ds: DeepSpeedConfig, bf16: bool) -> dict[str, dict[str, int]]:
    """Bytes per worker of each model state, by where it lives: ``{"host"|"device"|"nvme": {state: bytes}}``.

    Parameters and gradients in the training dtype (2 B in bf16, 4 B in fp32), an fp32 master copy that
    the optimizer updates (4 B) and Adam's two moments (8 B): 20 B a parameter when training in fp32 on
    CPU. ZeRO stage s partitions the optimizer states (s >= 1), gradients (s >= 2) and parameters (s = 3)
    over the workers. An offloaded optimizer moves the master copy and the moments, and steps on fp32
    gradients that the reduction writes straight into host buffers (the training-dtype gradient partition
    then does not persist). With the optimizer and parameters offloaded in bf16 this is DeepSpeed's own
    accounting (``estimate_zero3_model_states_mem_needs``: 18 B a parameter in host RAM), checked in the tests.
    """
    width = 2 if bf16 else 4
    stage = ds.zero_stage
    share = lambda partitioned: params / workers if partitioned else params  # noqa: E731
    states = {
        "parameters": (width * share(stage == 3), ds.offload_params),
        "fp32 master weights": (4 * share(stage >= 1), ds.offload_optimizer),
        "Adam moments": (8 * share(stage >= 1), ds.offload_optimizer),
    }
    if ds.offload_optimizer == "none":
        states["gradients"] = (width * share(stage >= 2), "none")
    else:
        states["fp32 gradients"] = (4 * share(True), "cpu")
    if stage == 0 and not bf16:  # plain data parallel in fp32: the optimizer updates the parameters themselves
        del states["fp32 master weights"]
    out: dict[str, dict[str, int]] = {"host": {}, "device": {}, "nvme": {}}
    for name, (size, place) in states.items():
        where = {"none": "device", "cpu": "host", "nvme": "nvme"}[place]
        out[where][name] = int(size)
    if ds.offload_optimizer == "nvme":
        # DeepSpeed also writes the fp32 gradients to files for the step (measured: the 1B teacher's swap
        # folder held exactly parameters + master + moments + these, 9.4 GiB a worker at 2 workers).
        out["nvme"]["fp32 gradient files"] = int(4 * share(True))
    return out


def activation_bytes(model: ModelConfig, num_items: int, micro_batch: int, training: bool, checkpointing: bool,
                     bytes_per_value: int = 4) -> dict[str, int]:
    """Activations of one micro-batch of ``micro_batch`` sequences of ``max_len``, by part."""
    tokens = micro_batch * model.max_len
    d, f = model.d_model, model.ffn_dim
    classes = num_items + 1
    per_block = tokens * (FLOATS_KEPT_PER_TOKEN[0] * d + FLOATS_KEPT_PER_TOKEN[1] * f) * bytes_per_value
    per_block += 2 * tokens * d if training and model.dropout > 0 else 0  # two dropout masks, 1 byte each
    attention = micro_batch * model.num_heads * model.max_len**2 * (bytes_per_value + 1)  # the mask and the scores of one block
    if not training:  # a forward without autograd keeps one block's tensors at a time
        return {"activations": per_block + attention, "scores": micro_batch * classes * bytes_per_value * 2}
    if checkpointing:
        kept = model.num_layers * tokens * d * bytes_per_value + per_block + attention  # block inputs + one recomputed block
    else:
        kept = model.num_layers * (per_block + attention)
    # Logits over the catalog at every position, their log-softmax and their gradient.
    return {"activations": kept, "scores": 3 * tokens * classes * bytes_per_value}


def largest_block_params(model: ModelConfig) -> int:
    d, f = model.d_model, model.ffn_dim
    return 4 * d * d + 2 * d * f + 9 * d + f


# --------------------------------------------------------------------------------------
# Stages


def teacher_training(cfg: Config, num_items: int, workers: int, runtime_bf16: bool = False,
                     num_sequences: int = 0) -> Estimate:
    """``train-teacher``: DeepSpeed ZeRO over ``workers``, one micro-batch of ``ceil(batch / workers)``."""
    model, ds = cfg.teacher.model, cfg.deepspeed
    params = count_parameters(model, num_items)
    states = model_state_bytes(params, workers, ds, runtime_bf16)
    micro = math.ceil(cfg.teacher.train.batch_size / workers)
    width = 2 if runtime_bf16 else 4
    host = {"process": WORKER_BASE_BYTES, **states["host"]}
    device = dict(states["device"])
    working = {}
    if ds.zero_stage == 3:
        # ZeRO-3 keeps a gathered parameter until its next use when that use comes within REUSE_DISTANCE
        # elements: in training the blocks nearest the output are used again in the backward soon after
        # the forward, so about half the reuse distance (up to the whole model) stays gathered at the turn.
        from cluster.runtime import LIVE_PARAMETERS, REUSE_DISTANCE

        live = min(LIVE_PARAMETERS, REUSE_DISTANCE // 2, params)
        working["gathered parameters"] = max(live, BLOCKS_IN_FLIGHT * largest_block_params(model)) * width
    if ds.zero_stage >= 1 or workers > 1:
        from cluster.runtime import REDUCE_BUCKET

        working["reduce bucket"] = min(REDUCE_BUCKET, params) * 4
    if ds.offload_params == "nvme":
        from cluster.runtime import NVME_PARAM_BUFFERS

        working["parameter swap buffers"] = NVME_PARAM_BUFFERS * math.ceil(_largest_tensor(model, num_items) / workers) * 4
    if ds.offload_optimizer == "nvme":  # the optimizer swapper's buffers, one sub-group each
        from cluster.runtime import OPTIMIZER_SUB_GROUP, OPTIMIZER_SWAP_BUFFERS

        working["optimizer swap buffers"] = OPTIMIZER_SWAP_BUFFERS * min(params // workers + 1, OPTIMIZER_SUB_GROUP) * 4
    acts = activation_bytes(model, num_items, micro, True, ds.activation_checkpointing, width)
    on_device = _on_gpu(cfg)
    (device if on_device else host).update({**working, **acts})
    if not on_device:
        host.update(device)
        device = {}
    host["training sequences"] = _sequences_bytes(num_sequences, model.max_len)
    # Checkpoints and exports stream one whole parameter at a time; rank 0 also holds a checkpoint part being filled.
    from cluster.portable_checkpoint import PART_BYTES

    rank0 = {"checkpoint part": PART_BYTES + 3 * _largest_tensor(model, num_items) * 4}
    return Estimate("train-teacher", workers, host, device, sum(states["nvme"].values()), rank0)


def teacher_hosting(cfg: Config, num_items: int, workers: int, params: Optional[int] = None,
                    model: Optional[ModelConfig] = None, batch: int = 0) -> Estimate:
    """``precompute``: the exported teacher's weights partitioned over ``workers`` (ZeRO-3), forward only."""
    model = model or cfg.teacher.model
    params = params or count_parameters(model, num_items)
    stage3 = cfg.deepspeed.zero_stage == 3
    host = {"process": WORKER_BASE_BYTES, "parameters": int(4 * params / (workers if stage3 else 1))}
    if stage3:
        host["gathered blocks"] = BLOCKS_IN_FLIGHT * largest_block_params(model) * 4
    host.update(activation_bytes(model, num_items, batch or cfg.precompute.batch_size, False, False))
    # Under ZeRO-3 rank 0 reads the export's safetensors file (memory-mapped pages count in its RSS) and
    # scatters it; without it every worker reads the whole file before loading it.
    if stage3:
        rank0 = {"export file pages": params * 4}
    else:
        rank0, host["export file"] = {}, params * 4
    return Estimate("precompute", workers, host, {}, 0, rank0)


def student_training(cfg: Config, num_items: int, workers: int, baseline: bool) -> Estimate:
    """``distill``: DDP over ``workers`` (the model whole on each), the store streamed in row groups."""
    model = cfg.student.model
    params = count_parameters(model, num_items)
    micro = math.ceil(cfg.student.train.batch_size / workers)
    host = {"process": WORKER_BASE_BYTES,
            # parameters, gradients, Adam's moments, DDP's gradient buckets
            "model states": params * 4 * (5 if workers > 1 else 4)}
    host.update(activation_bytes(model, num_items, micro, True, False))
    if not baseline:  # the teacher's soft labels of the batch, decoded to dense per-position top-k
        host["soft labels"] = micro * model.max_len * cfg.precompute.k * 8
    if not baseline and cfg.distill.embedding_hint:  # the teacher's item table, read whole (and its fp32 copy)
        host["teacher item table (embedding hint)"] = (num_items + 1) * cfg.teacher.model.d_model * 4 * 2
    return Estimate("distill --baseline" if baseline else "distill", workers, host)


def _largest_tensor(model: ModelConfig, num_items: int) -> int:
    d = model.d_model
    return max((num_items + 1) * d, d * model.ffn_dim, 3 * d * d, model.max_len * d)


def _sequences_bytes(num_sequences: int, max_len: int) -> int:
    # Python lists of ints (teacher training keeps the training split in memory): ~36 B an item.
    return num_sequences * max_len * 36 // 2


def _on_gpu(cfg: Config) -> bool:
    if cfg.run.device == "cpu" or cfg.scaling.use_gpu == "false":
        return False
    if cfg.run.device == "cuda" or cfg.scaling.use_gpu == "true":
        return True
    import torch

    return torch.cuda.is_available()


# --------------------------------------------------------------------------------------
# Capacity and fit


def capacity(cfg: Config, workers: int) -> Capacity:
    """What a node offers: ``scaling.memory_per_node_gb`` or this machine's available RAM (below Ray's
    OOM threshold), workers per node from its CPUs, GPU memory per device, free NVMe space."""
    import psutil

    cpus = os.cpu_count() or 1
    per_node = max(1, min(workers, int(cpus // cfg.scaling.cpus_per_worker) or 1))
    if cfg.scaling.memory_per_node_gb is not None:
        host, origin = int(cfg.scaling.memory_per_node_gb * GB), "scaling.memory_per_node_gb"
    else:
        vm = psutil.virtual_memory()
        # Ray's OOM killer acts at 95% of the total; what other processes use now is not the workers' to take,
        # and Ray's own processes (if not started yet) will need theirs.
        host = int(vm.available - (1 - RAY_MEMORY_THRESHOLD) * vm.total - RAY_SYSTEM_BYTES)
        origin = f"this machine: {vm.available / GB:.1f} of {vm.total / GB:.1f} GB available"
    device = None
    if cfg.scaling.gpu_memory_gb is not None:
        device = int(cfg.scaling.gpu_memory_gb * GB)
    elif _on_gpu(cfg):
        import torch

        if torch.cuda.is_available():
            device = torch.cuda.get_device_properties(0).total_memory
    nvme = None
    if cfg.deepspeed.nvme_path and "nvme" in (cfg.deepspeed.offload_optimizer, cfg.deepspeed.offload_params):
        from cluster.runtime import folder_bytes, nvme_swap_dir

        # This run's leftover swap files are cleared when training starts: their space counts as free.
        nvme = shutil.disk_usage(_existing_parent(cfg.deepspeed.nvme_path)).free
        nvme += folder_bytes(nvme_swap_dir(cfg.deepspeed, cfg.run.run_dir))
    return Capacity(host, per_node, device, nvme, origin)


#: Ray's own processes on a node (GCS, raylet, dashboard, the driver): measured ~1 GB on the 2-core machine.
RAY_SYSTEM_BYTES = int(1.0 * GB)


def _existing_parent(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def shortfalls(estimate: Estimate, cap: Capacity) -> list[str]:
    """What does not fit, in words; empty when the estimate fits."""
    out = []
    node = estimate.rank0_total + (cap.workers_per_node - 1) * estimate.host_total
    if node > cap.host_bytes:
        out.append(f"{cap.workers_per_node} worker(s) on a node need {node / GB:.1f} GB of host RAM "
                   f"({estimate.breakdown()} per worker), the node has {cap.host_bytes / GB:.1f} GB ({cap.origin})")
    if estimate.device and cap.device_bytes is not None and estimate.device_total > cap.device_bytes:
        out.append(f"each GPU needs {estimate.device_total / GB:.1f} GB, it has {cap.device_bytes / GB:.1f} GB")
    if estimate.nvme and cap.nvme_free is not None and estimate.nvme * cap.workers_per_node > cap.nvme_free:
        out.append(f"NVMe offload writes {estimate.nvme * cap.workers_per_node / GB:.1f} GB per node, "
                   f"{cap.nvme_free / GB:.1f} GB are free under deepspeed.nvme_path")
    return out


# --------------------------------------------------------------------------------------
# The plan's check: estimate, compare, and name settings that would fit


@dataclass(frozen=True)
class StageMemory:
    estimate: Estimate
    capacity: Capacity
    problems: list[str]  # empty: it fits
    fixes: list[str]  # settings that would fit, each with its estimate


def estimate_stage(cfg: Config, stage: str, num_items: int, workers: int, num_sequences: int = 0,
                   teacher: Optional[dict] = None) -> Estimate:
    """The estimate of one stage at ``workers`` (``teacher``: the export's meta, for precompute)."""
    if stage == "train-teacher":
        return teacher_training(cfg, num_items, workers, _bf16(cfg), num_sequences)
    if stage == "precompute":
        model = ModelConfig.model_validate(teacher["model"]) if teacher else None
        return teacher_hosting(cfg, num_items, workers, (teacher or {}).get("params"), model)
    if stage in ("distill", "distill --baseline"):
        return student_training(cfg, num_items, workers, stage == "distill --baseline")
    raise ValueError(f"no memory estimate for stage {stage!r}")


def check_stage(cfg: Config, stage: str, num_items: int, num_sequences: int = 0, teacher: Optional[dict] = None,
                cap: Optional[Capacity] = None) -> StageMemory:
    workers = cfg.scaling.num_workers
    estimate = estimate_stage(cfg, stage, num_items, workers, num_sequences, teacher)
    cap = cap or capacity(cfg, workers)
    problems = shortfalls(estimate, cap)
    fixes = _fixes(cfg, stage, num_items, num_sequences, teacher, cap) if problems else []
    return StageMemory(estimate, cap, problems, fixes)


def _fixes(cfg: Config, stage: str, num_items: int, num_sequences: int, teacher: Optional[dict], cap: Capacity) -> list[str]:
    """Settings a user can change that bring the stage within ``cap``, cheapest first (at most three):
    engine settings at the configured batch, then with a smaller batch, then more workers."""
    workers = cfg.scaling.num_workers

    def fits(variant: Config, at_workers: int, update: Optional[dict] = None) -> Optional[Estimate]:
        estimate = estimate_stage(variant, stage, num_items, at_workers, num_sequences, teacher)
        return None if shortfalls(estimate, _with_nvme(cap, cfg, update or {})) else estimate

    found = []
    engines = _engine_variants(cfg) if stage == "train-teacher" else [("", {})]
    for words, update in engines:
        variant = cfg.model_copy(update={"deepspeed": cfg.deepspeed.model_copy(update=update)}) if update else cfg
        batch, key = _batch(cfg, stage)
        estimate = fits(variant, workers, update) if words else None
        while estimate is None and batch > 1:
            batch //= 2
            estimate = fits(_with_batch(variant, stage, batch), workers, update)
            words_now = " ".join(w for w in (words, f"{key}={batch}") if w)
        if estimate is None:
            continue
        changed = words if batch == _batch(cfg, stage)[0] else words_now
        note = "; a smaller global batch changes the training recipe" if key in changed and stage != "precompute" else ""
        found.append(f"{changed} (then {estimate.summary()} per worker{note})")
        if len(found) == 2:
            break
    for more in (2, 4, 8, 16, 32, 64):
        estimate = fits(cfg, workers * more)
        if estimate is not None:
            nodes = math.ceil(workers * more / cap.workers_per_node)
            found.append(f"scaling.num_workers={workers * more} on {nodes} node(s) like this one "
                         f"(then {estimate.summary()} per worker)")
            break
    return found


def _engine_variants(cfg: Config) -> list[tuple[str, dict]]:
    """The teacher's engine settings that save memory, least costly first (the last: everything at once)."""
    nvme = {"nvme_path": cfg.deepspeed.nvme_path or "/path/on/local/nvme"}
    path = "" if cfg.deepspeed.nvme_path else " deepspeed.nvme_path=<a folder on local disk>"
    variants = [
        ("deepspeed.activation_checkpointing=true", {"activation_checkpointing": True}),
        ("deepspeed.offload_optimizer=nvme" + path, {"offload_optimizer": "nvme", **nvme}),
        ("deepspeed.offload_optimizer=nvme deepspeed.offload_params=nvme deepspeed.activation_checkpointing=true" + path,
         {"offload_optimizer": "nvme", "offload_params": "nvme", "activation_checkpointing": True, **nvme}),
    ]
    if _on_gpu(cfg):  # on a CPU-only machine "cpu" offload moves states within the same RAM
        variants.insert(1, ("deepspeed.offload_optimizer=cpu", {"offload_optimizer": "cpu"}))
    current = cfg.deepspeed.model_dump()
    return [(words, update) for words, update in variants if any(current.get(k) != v for k, v in update.items())]


def _batch(cfg: Config, stage: str) -> tuple[int, str]:
    if stage == "train-teacher":
        return cfg.teacher.train.batch_size, "teacher.train.batch_size"
    if stage == "precompute":
        return cfg.precompute.batch_size, "precompute.batch_size"
    return cfg.student.train.batch_size, "student.train.batch_size"


def _with_batch(cfg: Config, stage: str, batch: int) -> Config:
    if stage == "precompute":
        return cfg.model_copy(update={"precompute": cfg.precompute.model_copy(update={"batch_size": batch})})
    role = cfg.teacher if stage == "train-teacher" else cfg.student
    updated = role.model_copy(update={"train": role.train.model_copy(update={"batch_size": batch})})
    return cfg.model_copy(update={"teacher" if stage == "train-teacher" else "student": updated})


def _with_nvme(cap: Capacity, cfg: Config, update: dict) -> Capacity:
    if "nvme" not in (update.get("offload_optimizer"), update.get("offload_params")) or cap.nvme_free is not None:
        return cap
    where = update.get("nvme_path") if cfg.deepspeed.nvme_path else cfg.run.run_dir
    free = shutil.disk_usage(_existing_parent(where)).free if "://" not in where else None
    return Capacity(cap.host_bytes, cap.workers_per_node, cap.device_bytes, free, cap.origin)


def _bf16(cfg: Config) -> bool:
    from cluster.runtime import select_runtime

    try:
        return select_runtime(cfg.run.device, cfg.deepspeed.bf16, cuda_available=_on_gpu(cfg)).bf16
    except RuntimeError:
        return False
