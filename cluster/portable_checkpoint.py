"""Checkpoints of a DeepSpeed ZeRO engine that resume at any worker count, offloaded or not.

DeepSpeed's own checkpoint is one file set per rank, laid out for that world size: resuming at
another needs ``ds_to_universal``, and with the optimizer offloaded to NVMe it cannot be
converted at all (the per-rank files hold empty tensors; the states are raw swap files, which
DeepSpeed copies back only to the same ranks). This format holds what training needs, per
parameter and whole: the fp32 master weight and Adam's two moments, read through DeepSpeed's
own accessors (``deepspeed.utils.safe_get_full_*``, which gather partitions and swap offloaded
states in), written by rank 0 as safetensors parts of bounded size, plus the step counts and
the lr scheduler's state in JSON. Loading sets each rank's partitions from the whole tensors,
so 2 workers can resume 1 worker's checkpoint and the other way round, with or without offload.
Nothing in it is a pickle: a checkpoint is data, never code.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

META_FILE = "portable.json"
FORMAT = 1
#: Adam's moments, as torch.optim.AdamW names them.
MOMENTS = ("exp_avg", "exp_avg_sq")
#: Bytes per safetensors part: rank 0 holds one part in memory while writing (plus one parameter).
PART_BYTES = 256 * 1024**2


def save(engine: Any, model: torch.nn.Module, directory: str, rank: int, extra: Optional[dict[str, Any]] = None) -> None:
    """Write ``model``'s master weights and Adam moments under ``directory`` (every rank calls it: the gathers are collective)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    parts: list[dict[str, Any]] = []
    pending: dict[str, torch.Tensor] = {}

    def flush() -> None:
        if pending:
            name = f"part-{len(parts):05d}.safetensors"
            save_file(pending, os.path.join(directory, name))
            parts.append({"file": name, "tensors": sorted(pending)})
            pending.clear()

    for name, param in _unique_parameters(model):
        whole = {name: safe_get_full_fp32_param(param)}
        whole.update({f"{name}::{key}": safe_get_full_optimizer_state(param, key) for key in MOMENTS})
        missing = [key for key, value in whole.items() if value is None]
        if missing:
            raise RuntimeError(f"DeepSpeed gave no optimizer state for {missing}: portable checkpoints need ZeRO stage >= 1")
        if rank == 0:
            pending.update({key: value.detach().to("cpu", torch.float32).contiguous() for key, value in whole.items()})
            if sum(t.numel() * 4 for t in pending.values()) >= PART_BYTES:
                flush()
    if rank == 0:
        flush()
        scheduler = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
        meta = {"format": FORMAT, "global_steps": engine.global_steps, "global_samples": engine.global_samples,
                "optimizer_step": _optimizer_step(engine), "scheduler": scheduler, "parts": parts, **(extra or {})}
        with open(os.path.join(directory, META_FILE), "w") as f:
            json.dump(meta, f)


def is_portable(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, META_FILE))


def create_optimizer_state(engine: Any, inputs: tuple[torch.Tensor, ...]) -> None:
    """One step of zero loss, so that the optimizer's states exist (Adam makes them at its first step) and
    :func:`load` has somewhere to put the checkpoint's. Everything that step changes (weight decay of the
    weights, the step counts, the scheduler) is overwritten by :func:`load`."""
    loss_sum, _ = engine(*inputs)
    engine.backward(loss_sum * 0.0)
    engine.step()


def load(engine: Any, model: torch.nn.Module, directory: str) -> dict[str, Any]:
    """Set every rank's partitions of the master weights, the moments and the model's own weights from ``directory``
    (after :func:`create_optimizer_state`)."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    from cluster import deepspeed_fixes

    deepspeed_fixes.apply()  # DeepSpeed's setter fails on a padded last partition (see the module)

    with open(os.path.join(directory, META_FILE)) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory}: portable checkpoint format {meta.get('format')}, this version reads {FORMAT}")
    where = {tensor: part["file"] for part in meta["parts"] for tensor in part["tensors"]}
    # One part open at a time (parameters come in the order they were written): an open part is a memory map,
    # and the pages read through it would stay in this process's RSS until it is closed (12 GB for the 1B teacher).
    current: dict[str, Any] = {}

    def read(key: str) -> torch.Tensor:
        if key not in where:
            raise ValueError(f"{directory}: the checkpoint has no tensor {key!r} (another model?)")
        file = where[key]
        if file not in current:
            current.clear()
            current[file] = safe_open(os.path.join(directory, file), framework="pt")
        return current[file].get_tensor(key)

    for name, param in _unique_parameters(model):
        master = read(name)
        if master.numel() != _full_numel(param):
            raise ValueError(f"{directory}: {name} has {master.numel()} values, the model's {_full_numel(param)}")
        safe_set_full_fp32_param(param, master)
        for key in MOMENTS:
            safe_set_full_optimizer_state(param, read(f"{name}::{key}"), key)
        # The model's own copy (what the forward reads) from the master weight.
        if hasattr(param, "ds_id"):  # ZeRO-3: gathered, set on rank 0, partitioned again (and swapped out when offloaded)
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if torch.distributed.get_rank() == 0:
                    param.data.copy_(master.view_as(param.data).to(param.dtype))
        else:
            with torch.no_grad():
                param.data.copy_(master.view_as(param.data).to(param.dtype))
    _set_optimizer_step(engine, meta["optimizer_step"])
    if meta["scheduler"] is not None and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(meta["scheduler"])
        # Loading a state does not touch the optimizer's lr; stepping "to" the saved iteration sets it.
        engine.lr_scheduler.step(meta["scheduler"]["last_batch_iteration"])
    engine.global_steps, engine.global_samples = meta["global_steps"], meta["global_samples"]
    return meta


def _unique_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """Trainable parameters, a tied one once (under its first name), in registration order (the same on every rank)."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def _full_numel(param: torch.nn.Parameter) -> int:
    return int(getattr(param, "ds_numel", param.numel()))


def _optimizer_step(engine: Any) -> int:
    """Adam's step count (its bias correction), the same for every parameter group: read from the first one that has it."""
    base = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
    for state in base.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def _set_optimizer_step(engine: Any, step: int) -> None:
    # Keyed by DeepSpeed's flat fp32 partitions (ZeRO-3 empties param_groups between steps).
    base = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
    for state in base.state.values():
        if "step" in state:
            old = state["step"]
            state["step"] = torch.tensor(float(step), dtype=old.dtype, device=old.device) if torch.is_tensor(old) else step
