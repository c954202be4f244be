"""``recdistill distill [--baseline]``: the student's recipe, on Ray Train workers (DDP; elastic).

Data comes from the soft-label store (distillation) or from the dataset's training
split (the baseline, alpha = 1, no teacher), streamed by
:class:`data_pipeline.streaming.StreamingReader`: the global batch of step s in
epoch e is a pure function of (seed, e, s), whatever the worker count, so the
resume state is just (epoch, step) plus model, optimiser and RNG state. After a
restart at another worker count the epoch continues with every row used once.

The store is checked against this run (teacher, dataset, catalog) on the driver,
before any worker starts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from typing import Any, Optional

import numpy as np
import torch

from cluster.common import save_resolved_config
from cluster.config import Config, build_config, stage_fingerprint
from cluster.engine import RayTrainContext, WorkerContext, quiet_worker_logs
from cluster.models import save_model
from cluster.plan import RunPlan, build_plan, training_complete
from cluster.runtime import select_runtime
from cluster.student_batches import student_source, training_blocks
from cluster.tasks import training_task
from data_pipeline import fsio
from data_pipeline import soft_labels
from data_pipeline.dataset import load_manifest, read_split, train_item_counts
from data_pipeline.exports import read_export_meta, read_export_tensor
from data_pipeline.layout import RunLayout
from data_pipeline.streaming import PrefetchIterator, StreamingReader, prefetch_iter
from distill.hints import ItemEmbeddingHint, hint_items
from distill.metrics import POPULARITY_BANDS, popularity_band
from distill.sizing import count_parameters
from distill.teacher_init import init_item_table_from_teacher
from distill.training import check_checkpoint_stage, lr_ratio, mixed_loss, seed_step

log = logging.getLogger(__name__)

STATE_FILE = "student_state.json"
WEIGHTS_FILE = "student.pt"


def student_train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train ``train_loop_per_worker``; see :func:`train_student_worker`."""
    train_student_worker(loop_config, RayTrainContext())


def train_student_worker(loop_config: dict[str, Any], ctx: WorkerContext) -> None:
    """One worker's share of a student's training;
    ``loop_config = {"config", "baseline", "soft_manifest", "teacher_url"[, "out_url"]}``."""
    import torch.distributed as dist

    cfg: Config = build_config(loop_config["config"])
    quiet_worker_logs(cfg.run.log_level)
    baseline: bool = loop_config["baseline"]
    rank, world = ctx.rank, ctx.world_size
    runtime = select_runtime(cfg.run.device, cfg.student.bf16)
    device = ctx.device(runtime.use_gpu)
    layout = RunLayout(cfg.run.run_dir)
    storage = cfg.data.storage_options
    mcfg, tcfg, dcfg = cfg.student.model, cfg.student.train, cfg.distill
    # A sweep member writes its own folder; `distill` the run's student (or baseline) folder.
    out_url = loop_config.get("out_url") or (layout.baseline if baseline else layout.student)

    dataset = load_manifest(layout.data, storage)
    num_items = dataset["num_items"]
    task = training_task(cfg.run.task, dataset)  # next_item or rating: the model, batches, loss and validation
    num_levels = len(dataset.get("rating_values") or []) if task.name == "rating" else 0
    valid = read_split(layout.data, "valid", storage, dataset)
    soft_manifest = None if baseline else loop_config["soft_manifest"]
    spec = None if baseline else soft_labels.StoreSpec.from_dict(soft_manifest["spec"])
    blocks, columns = training_blocks(cfg, dataset, soft_manifest)
    reader = StreamingReader(
        blocks, columns, dcfg.num_virtual_shards, tcfg.batch_size, cfg.run.seed, rank, world, storage, dcfg.prefetch_blocks
    )

    torch.manual_seed(cfg.run.seed)
    model = task.build(mcfg, dataset)
    trunk = getattr(model, "trunk", model)  # the rating model's Transformer is a next-item model's
    if trunk.item_table is not None:  # mixed-dim item table: popular items in the wide bands
        trunk.item_table.set_item_order(train_item_counts(layout.data, num_items, storage))
    restored = ctx.restore_checkpoint()
    if not baseline and dcfg.init_from_teacher and restored is None:
        # The same on every rank (a deterministic SVD of the same tensor); DDP also broadcasts rank 0's weights.
        init_item_table_from_teacher(trunk, read_export_tensor(loop_config["teacher_url"], task.item_table_key, storage))
    # Item-embedding distillation: a projection that trains beside the student (checkpointed with it, never exported).
    hint = None if baseline or not dcfg.embedding_hint else ItemEmbeddingHint(
        mcfg.d_model, read_export_tensor(loop_config["teacher_url"], task.item_table_key, storage))
    # On the device before the optimiser exists: a restored optimiser state then lands beside its parameters.
    model.to(device)
    if hint is not None:
        hint.to(device)
    trained = [*model.parameters(), *(hint.parameters() if hint is not None else [])]
    optimizer = torch.optim.AdamW(trained, lr=tcfg.lr, weight_decay=tcfg.weight_decay, betas=(0.9, 0.98))
    stage_fp = stage_fingerprint(cfg, "baseline") if baseline else stage_fingerprint(
        cfg, "student", student_source(soft_manifest["teacher_fingerprint"], cfg, soft_manifest))
    state = {"epoch": 0, "step": 0, "best_ndcg": -math.inf, "world_size": world, "history": [], "restarts": [],
             "stage_fingerprint": stage_fp}
    if restored is not None:
        try:
            with open(os.path.join(restored.local_dir, STATE_FILE)) as f:
                saved = json.load(f)
            check_checkpoint_stage(saved, stage_fp, restored.origin)
            blob = torch.load(os.path.join(restored.local_dir, WEIGHTS_FILE), map_location="cpu", weights_only=True)
        finally:
            shutil.rmtree(restored.local_dir, ignore_errors=True)
        model.load_state_dict(blob["model"])
        if hint is not None:
            hint.load_state_dict(blob["hint"])
        optimizer.load_state_dict(blob["optimizer"])  # dropout needs no RNG state: seed_step seeds every step
        saved["restarts"].append({"epoch": saved["epoch"], "step": saved["step"], "from_workers": saved["world_size"], "workers": world})
        state = {**saved, "stage_fingerprint": stage_fp}
        log.info("rank %d: resumed at epoch %d step %d (was %d workers, now %d)", rank, state["epoch"], state["step"], saved["world_size"], world)
    forward = ctx.wrap_data_parallel(task.student_forward(model, runtime.bf16, hint))
    if rank == 0:
        log.info("student on %s (%s), %s forward", device, runtime.backend, "bf16-autocast" if runtime.bf16 else "fp32")
    attempt = f"e{state['epoch']}s{state['step']}w{world}-{uuid.uuid4().hex[:6]}" if rank == 0 else None
    attempt_id = _broadcast_object(attempt, dist) if world > 1 else attempt
    params = count_parameters(mcfg, num_items, num_levels)
    kd_options = {"ranking": {"K": dcfg.ranking_top},
                  "dkd": {"target_weight": dcfg.dkd_target_weight, "nontarget_weight": dcfg.dkd_nontarget_weight}}.get(dcfg.loss, {})
    if dcfg.loss == "kl_bands" and not baseline:  # every item's popularity band, from the training counts
        item_band = torch.from_numpy(popularity_band(train_item_counts(layout.data, num_items, storage))).to(device)
        kd_options = {"item_band": item_band, "band_weight": dcfg.band_weight, "num_bands": len(POPULARITY_BANDS)}

    def save_and_report(metrics: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory(prefix="recdistill-student-") as tmp:
            if rank == 0:
                blob = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
                torch.save({**blob, "hint": hint.state_dict()} if hint is not None else blob, os.path.join(tmp, WEIGHTS_FILE))
                with open(os.path.join(tmp, STATE_FILE), "w") as f:
                    json.dump({**state, "world_size": world}, f)
            ctx.report(metrics, checkpoint_dir=tmp if rank == 0 else None)

    to_batch = lambda t: task.student_batch(t, spec, mcfg.max_len)  # noqa: E731 (spec None: the twin's dataset rows)

    def epoch_batches(epoch: int, start_step: int) -> PrefetchIterator:
        # Reading and decoding the next batches runs beside the step, on a background thread.
        return prefetch_iter(((step, to_batch(t)) for step, t in reader.iter_epoch(epoch, start_step)), dcfg.prefetch_blocks)

    # The lr is a pure function of the global step; steps per epoch can differ between epochs (the reader's plan).
    steps_before = np.cumsum([0] + [reader.steps_per_epoch(e) for e in range(tcfg.epochs)]).tolist()

    def set_lr(epoch: int, step: int) -> None:
        ratio = lr_ratio(steps_before[epoch] + step, steps_before[-1], tcfg.warmup_steps, tcfg.lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = tcfg.lr * ratio

    batches = epoch_batches(state["epoch"], state["step"]) if state["epoch"] < tcfg.epochs else None
    stopped_early = False
    for epoch in range(state["epoch"], tcfg.epochs):
        started, losses, hint_distances = time.perf_counter(), [], []
        forward.train()
        for step, batch in batches:
            seed_step(cfg.run.seed, epoch, step, rank)
            alpha = 1.0 if baseline else dcfg.alpha
            items = hint_items(trunk.num_scores) if hint is not None else None  # drawn after seed_step: resumable
            terms = task.student_terms(forward, batch, alpha, dcfg, kd_options, device, items)
            loss, local_loss = mixed_loss(terms, alpha, world, device, dcfg.embedding_hint)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tcfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trained, tcfg.grad_clip)
            set_lr(epoch, step)
            optimizer.step()
            losses.append(local_loss)
            if hint is not None:  # the mean cosine distance of the sampled items, for the history
                hint_distances.append(float(terms["hint"][0].detach()) / max(float(terms["hint"][1]), 1.0))
            if dcfg.log_consumed:
                _log_consumed(out_url, storage, attempt_id, epoch, step, rank, world, batch.rows)
            state["step"] = step + 1
            if state["step"] % dcfg.checkpoint_every_steps == 0 and state["step"] < reader.steps_per_epoch(epoch):
                save_and_report({"epoch": epoch, "step": state["step"], "workers": world, "train_loss": float(np.mean(losses))})
        # Start the next epoch's reads now: its first blocks arrive while validation runs.
        batches = epoch_batches(epoch + 1, 0) if epoch + 1 < tcfg.epochs else None
        forward.eval()
        metrics = task.validate(model, valid, dataset, cfg.eval, tcfg.eval_batch_size, rank, world, device, mcfg.max_len)
        record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else math.nan,
                  "train_seconds": time.perf_counter() - started, "workers": world, "lr": optimizer.param_groups[0]["lr"],
                  **{f"val_{k}": v for k, v in metrics.items()}, "val_select": task.select(metrics),
                  **({"train_hint_distance": float(np.mean(hint_distances))} if hint_distances else {})}
        state["history"].append(record)
        if rank == 0:
            log.info("%s epoch %d: train loss %.4f, val %s %.4f, %.1f s on %d workers", "baseline" if baseline else "student",
                     epoch + 1, record["train_loss"], task.metric.upper(), metrics[task.metric], record["train_seconds"], world)
        # best_ndcg keeps its name in checkpoints (older runs'); it holds the task's selection value (larger is better).
        if task.select(metrics) > state["best_ndcg"]:
            state["best_ndcg"] = task.select(metrics)
            if rank == 0:
                info = {"role": "baseline" if baseline else "student", "params": params, "epoch": epoch + 1, "valid": metrics,
                        "dataset_fingerprint": dataset["fingerprint"],
                        "distill": None if baseline else {**dcfg.model_dump(mode="json"), "teacher_fingerprint": soft_manifest["teacher_fingerprint"]},
                        **({"task": "rating", "rating_values": dataset["rating_values"]} if task.name == "rating" else {})}
                save_model(out_url, model.state_dict(), mcfg, num_items, info, storage)
        state.update(epoch=epoch + 1, step=0)
        if rank == 0:
            fsio.write_json_atomic(fsio.join(out_url, "history.json"),
                                   {"history": state["history"], "restarts": state["restarts"], "stage_fingerprint": stage_fp}, storage)
        save_and_report({**record, f"best_val_{task.metric}": task.sign * state["best_ndcg"]})
        if tcfg.patience and len(state["history"]) > tcfg.patience:
            recent = [h.get("val_select", h.get("val_ndcg@10")) for h in state["history"][-tcfg.patience:]]
            if max(recent) < state["best_ndcg"]:
                log.info("no improvement for %d epochs: stopping early", tcfg.patience)
                stopped_early = True
                break
    if batches is not None:
        batches.close()  # stopped early: the next epoch's reader was already running
    if rank == 0:  # the pipeline's "this stage is done" (the export alone exists from the first best epoch on)
        fsio.write_json_atomic(fsio.join(out_url, "history.json"),
                               {"history": state["history"], "restarts": state["restarts"], "stage_fingerprint": stage_fp,
                                "complete": True, "stopped_early": stopped_early, "patience": tcfg.patience}, storage)


def _broadcast_object(obj: Any, dist) -> Any:
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _log_consumed(out_url: str, storage, attempt: str, epoch: int, step: int, rank: int, world: int, rows: list[int]) -> None:
    """Append-only audit record of the rows this worker trained on at (epoch, step)."""
    record = json.dumps({"attempt": attempt, "epoch": epoch, "step": step, "rank": rank, "world": world, "rows": rows})
    fs, path = fsio.get_fs(fsio.join(out_url, "consumed", f"{attempt}-rank{rank}.jsonl"), storage)
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    with fs.open(path, "a") as f:
        f.write(record + "\n")


def run(cfg: Config, baseline: bool = False, plan: Optional[RunPlan] = None) -> dict:
    # Ray is imported here, on the driver: the worker part above runs without it.
    from ray.train.torch import TorchTrainer

    from cluster.ray_setup import ensure_ray, fit, require_resources, run_config, scaling_config, torch_config

    baseline = baseline or cfg.distill.alpha >= 1.0
    name = "distill --baseline" if baseline else "distill"
    plan = plan or build_plan(cfg)
    plan.require(name)
    stage = plan.stage(name)
    layout = RunLayout(cfg.run.run_dir)
    for warning in plan.warnings:
        log.warning("%s", warning.message)
    save_resolved_config(cfg)
    # Every file the reader will stream is listed now (Parquet footers against the manifests' row counts),
    # so a missing or replaced file is refused before any worker starts.
    blocks, _ = training_blocks(cfg, plan.dataset, None if baseline else plan.store)
    print(f"{name}: {stage.action}; workers {stage.workers}; {sum(b.num_rows for b in blocks):,} rows in {len(blocks)} "
          f"row groups, global batch {cfg.student.train.batch_size} over {cfg.distill.num_virtual_shards} virtual shards "
          f"(fill {plan.layout.fill.get('baseline' if baseline else 'distill', float('nan')):.0%}) -> {stage.writes}", flush=True)
    out = layout.baseline if baseline else layout.student
    role = "baseline" if baseline else "student"
    if stage.action != "done":  # a finished training (its history says so) starts nothing
        ensure_ray(cfg)
        require_resources(cfg, elastic=True)
        trainer = TorchTrainer(
            student_train_loop,
            train_loop_config={"config": cfg.to_dict(), "baseline": baseline, "soft_manifest": None if baseline else plan.store,
                               "teacher_url": plan.teacher_url},
            scaling_config=scaling_config(cfg, elastic=True),
            torch_config=torch_config(cfg),
            run_config=run_config(cfg, name="baseline" if baseline else "student"),
        )
        teacher_fp = None if baseline else student_source(plan.store["teacher_fingerprint"], cfg, plan.store)
        fit(trainer, lambda: training_complete(out, cfg, role, teacher_fp), cfg, role)
    meta = read_export_meta(out, cfg.data.storage_options)
    metric = training_task(cfg.run.task).metric
    print(
        f"{role}: {meta['params']:,} parameters, best validation {metric.upper()} "
        f"{meta['valid'][metric]:.4f} (epoch {meta['epoch']}), exported to {out}"
    )
    return meta
