"""``recdistill train-teacher``: the teacher's recipe, Ray Train TorchTrainer + DeepSpeed ZeRO workers.

Each epoch: data-parallel next-item training (global batch fixed whatever the
worker count), distributed full-ranking validation, a checkpoint reported to the
engine, and, when validation NDCG@10 improved, a consolidated export of the
teacher to ``run_dir/teacher``.

Checkpoints are :mod:`cluster.portable_checkpoint`: every parameter's fp32 master
weight and Adam moments, whole, so a restarted group resumes at any worker count,
with optimizer states and parameters offloaded to NVMe or not (DeepSpeed's own
per-rank checkpoints load only at the world size that wrote them, and not at all
across world sizes once the optimizer is on NVMe). Checkpoints of DeepSpeed's own
format, written by earlier versions, still resume (converted to DeepSpeed's
universal format when the worker count changed).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Optional

import numpy as np
import torch

from cluster import deepspeed_fixes, portable_checkpoint
from cluster.common import save_resolved_config
from cluster.config import Config, build_config, stage_fingerprint
from cluster.engine import RayTrainContext, WorkerContext, quiet_worker_logs
from cluster.memory_watch import NodeMemoryWatch, gather_peaks
from cluster.plan import RunPlan, build_plan, training_complete
from cluster.runtime import clear_swap_dir, deepspeed_config, folder_bytes, nvme_swap_dir, select_runtime
from data_pipeline import fsio
from data_pipeline.dataset import load_manifest, read_split, train_item_counts
from data_pipeline.exports import read_export_meta, save_export_streaming
from data_pipeline.layout import RunLayout
from cluster.tasks import training_task
from distill.sizing import count_parameters, largest_parameter
from distill.training import NextItemObjective, check_checkpoint_stage, rank_batches, seed_step

log = logging.getLogger(__name__)

CKPT_TAG = "ckpt"
STATE_FILE = "train_state.json"
HISTORY_FILE = "history.json"


def _convert_to_universal(checkpoint_dir: str, out_root: str) -> str:
    """DeepSpeed checkpoint at another world size -> universal checkpoint; returns its tag."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal
    from deepspeed.checkpoint.ds_to_universal import parse_arguments

    tag = f"{CKPT_TAG}_universal"
    argv = ["ds_to_universal", "--input_folder", os.path.join(checkpoint_dir, CKPT_TAG), "--output_folder", os.path.join(out_root, tag)]
    saved, sys.argv = sys.argv, argv
    try:
        ds_to_universal(parse_arguments())
    finally:
        sys.argv = saved
    return tag


def _resume_portable(engine, model: torch.nn.Module, checkpoint_dir: str, state: dict[str, Any], rank: int, world: int,
                     max_len: int, device: torch.device) -> None:
    """Load a :mod:`cluster.portable_checkpoint` (written at any worker count) into this engine."""
    try:
        empty = torch.zeros(1, max_len, dtype=torch.long, device=device)  # all padding: a step of zero loss
        portable_checkpoint.create_optimizer_state(engine, (empty, empty))
        portable_checkpoint.load(engine, model, checkpoint_dir)
    finally:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)  # our local copy of the checkpoint
    log.info("rank %d: resumed at epoch %d (best NDCG@10 %.4f), checkpoint of %d workers, now %d", rank, state["epoch"],
             state["best_ndcg"], state["world_size"], world)
    state.setdefault("restarts", []).append({"at_epoch": state["epoch"], "from_workers": state["world_size"], "workers": world})


def _resume(engine, checkpoint_dir: str, universal: bool, state: dict[str, Any], rank: int, world: int) -> None:
    """Load a checkpoint in DeepSpeed's own format (written before portable checkpoints), converting it first if the
    world size changed."""
    scratch = tempfile.mkdtemp(prefix="recdistill-universal-") if universal else None
    try:
        load_root, tag = checkpoint_dir, CKPT_TAG
        if universal:
            log.info("rank %d: checkpoint from %d workers, now %d: converting to universal", rank, state["world_size"], world)
            load_root, tag = scratch, _convert_to_universal(checkpoint_dir, scratch)
        engine.load_checkpoint(load_root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    finally:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)  # our local copy of the checkpoint
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    log.info("rank %d: resumed at epoch %d (best NDCG@10 %.4f)", rank, state["epoch"], state["best_ndcg"])
    state.setdefault("restarts", []).append({"at_epoch": state["epoch"], "from_workers": state["world_size"], "workers": world})


def _export(model: torch.nn.Module, zero_stage: int, rank: int, url: str, info: dict[str, Any], num_items: int,
            storage: dict[str, Any]) -> Optional[str]:
    """Rank 0 writes the consolidated fp32 export, streamed: one parameter gathered (collectively, under ZeRO-3)
    and written at a time, so no rank ever holds the whole model (4 GB for the 1B teacher, twice over with a
    serialised copy). Every rank must call it; returns the fingerprint on rank 0."""
    entries = model.state_dict(keep_vars=True)  # Parameters themselves (ZeRO-3 gathers them) and buffers
    if model.cfg.tied_embeddings:
        for key in model.tied_weight_keys:  # the same Parameter as the item table, stored once
            entries.pop(key, None)

    def dtype(value: torch.Tensor) -> torch.dtype:
        return torch.float32 if value.is_floating_point() else value.dtype

    layout = [(key, tuple(getattr(value, "ds_shape", value.shape)), dtype(value)) for key, value in entries.items()]

    def tensors():
        for value in entries.values():
            gather = contextlib.nullcontext()
            if zero_stage == 3 and isinstance(value, torch.nn.Parameter):
                import deepspeed

                gather = deepspeed.zero.GatheredParameters([value], modifier_rank=None)
            with gather:
                yield value.detach().to("cpu", dtype(value)).clone() if rank == 0 else None

    if rank != 0:
        for _ in tensors():  # take part in every gather
            pass
        return None
    return save_export_streaming(url, layout, tensors(), model.cfg.model_dump(mode="json"), num_items, info, storage)


def teacher_train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train ``train_loop_per_worker``; ``loop_config = {"config": Config.to_dict()}``."""
    train_teacher_worker(loop_config, RayTrainContext())


def train_teacher_worker(loop_config: dict[str, Any], ctx: WorkerContext) -> None:
    """One worker's share of the teacher's training, under whatever engine ``ctx`` is."""
    import deepspeed

    setup_started = time.perf_counter()
    cfg: Config = build_config(loop_config["config"])
    quiet_worker_logs(cfg.run.log_level)
    rank, world = ctx.rank, ctx.world_size
    runtime = select_runtime(cfg.run.device, cfg.deepspeed.bf16)
    device = ctx.device(runtime.use_gpu)
    layout = RunLayout(cfg.run.run_dir)
    storage = cfg.data.storage_options
    mcfg, tcfg = cfg.teacher.model, cfg.teacher.train

    manifest = load_manifest(layout.data, storage)
    num_items = manifest["num_items"]
    task = training_task(cfg.run.task, manifest)
    sequences = task.examples(read_split(layout.data, "train", storage, manifest), mcfg.max_len)
    valid = read_split(layout.data, "valid", storage, manifest)

    # Resume state comes first: a checkpoint of DeepSpeed's own format (older runs) may need a universal conversion.
    stage_fp = stage_fingerprint(cfg, "teacher")
    state: dict[str, Any] = {"epoch": 0, "best_ndcg": -math.inf, "best_epoch": -1, "world_size": world, "history": [], "restarts": [],
                             "stage_fingerprint": stage_fp}
    restored = ctx.restore_checkpoint()  # each rank deletes its own copy after loading
    checkpoint_dir = restored.local_dir if restored else None
    if restored is not None:
        with open(os.path.join(checkpoint_dir, STATE_FILE)) as f:
            state = json.load(f)
        check_checkpoint_stage(state, stage_fp, restored.origin)
        state["stage_fingerprint"] = stage_fp
    portable = checkpoint_dir is not None and portable_checkpoint.is_portable(checkpoint_dir)
    universal = checkpoint_dir is not None and not portable and state["world_size"] != world

    micro_batch = math.ceil(tcfg.batch_size / world)
    steps_per_epoch = math.ceil(len(sequences) / tcfg.batch_size)  # as rank_batches
    # NVMe parameter offload swaps one partition per buffer: size them to the largest.
    swap_numel = math.ceil(largest_parameter(mcfg, num_items) / world)
    swap_dir = nvme_swap_dir(cfg.deepspeed, cfg.run.run_dir)
    ds_settings = cfg.deepspeed.model_copy(update={"nvme_path": swap_dir}) if swap_dir else cfg.deepspeed
    ds_config = deepspeed_config(ds_settings, tcfg, micro_batch, world, runtime, tcfg.epochs * steps_per_epoch, swap_numel)
    ds_config["checkpoint"] = {"load_universal": universal}

    # Ray Train already created the process group; DeepSpeed's comm layer adopts it.
    deepspeed.init_distributed(dist_backend=runtime.backend)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    clear_swap_dir(swap_dir, local_rank)  # an earlier attempt's swap files (other tensor ids, other ranks)
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    init_ctx = deepspeed.zero.Init(config_dict_or_path=ds_config) if cfg.deepspeed.zero_stage == 3 else contextlib.nullcontext()
    with init_ctx:
        model = task.build(mcfg, manifest)
    trunk = getattr(model, "trunk", model)  # the rating model's Transformer is a next-item model's
    trunk.checkpoint_activations = cfg.deepspeed.activation_checkpointing
    if trunk.item_table is not None:  # mixed-dim item table: popular items in the wide bands
        trunk.item_table.set_item_order(train_item_counts(layout.data, num_items, storage))
    if task.name == "next_item":
        objective = NextItemObjective(model, "full_ce" if tcfg.loss == "full_ce" else "sampled", tcfg.num_negatives)
    else:
        objective = task.objective(model)
    deepspeed_fixes.apply()  # NVMe optimizer offload's unaligned gradient I/O (see the module)
    engine, _, _, _ = deepspeed.initialize(model=objective, config=ds_config, model_parameters=objective.parameters())

    if checkpoint_dir is not None:
        if portable:
            _resume_portable(engine, model, checkpoint_dir, state, rank, world, mcfg.max_len, device)
        else:
            _resume(engine, checkpoint_dir, universal, state, rank, world)
        try:  # an export lost in a crash is re-made at the next improvement
            read_export_meta(layout.teacher, storage)
        except ValueError:
            state["best_ndcg"] = -1.0

    node_watch = NodeMemoryWatch()
    if rank == 0:
        log.info("teacher: DeepSpeed ZeRO-%d engine ready on %d workers in %.1f s", cfg.deepspeed.zero_stage, world, time.perf_counter() - setup_started)
    params = count_parameters(mcfg, num_items, len(manifest.get("rating_values") or []) if task.name == "rating" else 0)
    patience_left, stopped_early = tcfg.patience, False
    for epoch in range(state["epoch"], tcfg.epochs):
        started = time.perf_counter()
        engine.train()
        losses, step_seconds = [], []
        for step, rows in enumerate(rank_batches(len(sequences), tcfg.batch_size, cfg.run.seed, epoch, rank, world)):
            seed_step(cfg.run.seed, epoch, step, rank)  # dropout: a function of the step, so a resume repeats it
            if len(rows):
                batch = task.batch([sequences[i] for i in rows], mcfg.max_len)
            else:  # a short last step: still take part in the collectives, with no targets
                batch = task.empty_batch(mcfg.max_len)
            loss_sum, count = engine(*(t.to(device) for t in batch))
            global_count = count.detach().float()
            torch.distributed.all_reduce(global_count)
            # Sum over the global batch / its size: DeepSpeed averages gradients over ranks, hence * world.
            loss = loss_sum * world / global_count.clamp(min=1)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss_sum.detach()) / max(float(count), 1.0))
            step_seconds.append(time.perf_counter() - (started + sum(step_seconds)))
        train_seconds = time.perf_counter() - started

        engine.eval()
        metrics = task.validate(engine.module.model, valid, manifest, cfg.eval, tcfg.eval_batch_size, rank, world, device,
                                mcfg.max_len)
        # best_ndcg keeps its name in checkpoints (older runs'); for the rating task it holds -NLL (larger is better).
        improved = task.select(metrics) > state["best_ndcg"]
        record = {
            "epoch": epoch + 1,
            "train_loss": float(np.mean(losses)) if losses else math.nan,
            "train_seconds": train_seconds,
            # Measured beside the memory plan's estimate (cluster.memory_plan): per rank, and the slowest step.
            "step_seconds_max": round(max(step_seconds), 3) if step_seconds else None,
            **gather_peaks(world, node_watch),
            # rank 0's node: what DeepSpeed's swap files hold on disk (the plan's NVMe estimate is checked against it)
            **({"nvme_swap_gb": round(folder_bytes(swap_dir) / 2**30, 3)} if swap_dir and rank == 0 else {}),
            **{f"val_{k}": v for k, v in metrics.items()},
        }
        state["history"].append(record)
        if rank == 0:
            log.info("teacher epoch %d: train loss %.4f, val %s %.4f%s, %.1f s on %d workers", epoch + 1, record["train_loss"],
                     task.metric.upper(), metrics[task.metric], " (best)" if improved else "", train_seconds, world)
        if improved:
            state.update(best_ndcg=task.select(metrics), best_epoch=epoch + 1)
            info = {
                "role": "teacher",
                "params": params,
                "dataset_fingerprint": manifest["fingerprint"],
                "epoch": epoch + 1,
                "valid": metrics,
                "trained_with": {"workers": world, "zero_stage": cfg.deepspeed.zero_stage, "bf16": runtime.bf16},
                **({"task": "rating", "rating_values": manifest["rating_values"]} if task.name == "rating" else {}),
            }
            export_fp = _export(engine.module.model, cfg.deepspeed.zero_stage, rank, layout.teacher, info, num_items, storage)
            if rank == 0:
                log.info("epoch %d: new best teacher exported (fingerprint %s)", epoch + 1, export_fp[:12])
            patience_left = tcfg.patience
        else:
            patience_left -= 1
        state.update(epoch=epoch + 1, world_size=world)
        if rank == 0:
            progress = {"history": state["history"], "restarts": state["restarts"], "best_epoch": state["best_epoch"],
                        "stage_fingerprint": stage_fp}
            fsio.write_json_atomic(fsio.join(layout.teacher, HISTORY_FILE), progress, storage)

        with tempfile.TemporaryDirectory(prefix="recdistill-ckpt-") as tmp:
            # Whole tensors, not per-rank shards: it resumes at any worker count, offloaded or not.
            portable_checkpoint.save(engine, model, tmp, rank)
            if rank == 0:
                with open(os.path.join(tmp, STATE_FILE), "w") as f:
                    json.dump(state, f)
            report = {**record, f"best_val_{task.metric}": task.sign * state["best_ndcg"], "val_select": task.select(metrics),
                      "params": params, "world_size": world}
            ctx.report(report, checkpoint_dir=tmp)
        if tcfg.patience and patience_left <= 0:
            log.info("no improvement for %d epochs: stopping early", tcfg.patience)
            stopped_early = True
            break
    node_watch.stop()
    del engine  # its swap buffers and files are no longer needed
    clear_swap_dir(swap_dir, local_rank, recreate=False)
    if rank == 0:  # the pipeline's "this stage is done" (the export alone exists from the first best epoch on)
        progress = {"history": state["history"], "restarts": state["restarts"], "best_epoch": state["best_epoch"],
                    "stage_fingerprint": stage_fp, "complete": True, "stopped_early": stopped_early,
                    "patience": tcfg.patience}
        fsio.write_json_atomic(fsio.join(layout.teacher, HISTORY_FILE), progress, storage)


def run(cfg: Config, plan: Optional[RunPlan] = None) -> dict:
    # Ray is imported here, on the driver: the worker part above runs without it (tests, a GPU box without Ray).
    from ray.train.torch import TorchTrainer

    from cluster.ray_setup import ensure_ray, fit, require_resources, run_config, scaling_config, torch_config

    plan = plan or build_plan(cfg)
    plan.require("train-teacher")
    stage = plan.stage("train-teacher")
    layout = RunLayout(cfg.run.run_dir)
    save_resolved_config(cfg)
    print(f"train-teacher: {stage.action}; workers {stage.workers}; stage fingerprint {stage.fingerprints['stage']}, "
          f"{cfg.teacher.train.epochs} epochs -> {stage.writes}", flush=True)
    if stage.action != "done":  # a finished training (its history says so) starts nothing
        ensure_ray(cfg)
        require_resources(cfg)
        trainer = TorchTrainer(
            teacher_train_loop,
            train_loop_config={"config": cfg.to_dict()},
            scaling_config=scaling_config(cfg),
            torch_config=torch_config(cfg),
            # Ray keeps the best checkpoints by this score (val_select: the task's selection metric, larger is better).
            run_config=run_config(cfg, name="teacher", score_attribute="val_ndcg@10" if cfg.run.task == "next_item" else "val_select"),
        )
        fit(trainer, lambda: training_complete(layout.teacher, cfg, "teacher"), cfg, "teacher")
    meta = read_export_meta(layout.teacher, cfg.data.storage_options)
    metric = training_task(cfg.run.task).metric
    print(
        f"teacher: {meta['params']:,} parameters, best validation {metric.upper()} {meta['valid'][metric]:.4f} "
        f"(epoch {meta['epoch']}), fingerprint {meta['fingerprint'][:12]}, exported to {layout.teacher}"
    )
    return meta
