"""The student's training loop, run by every Ray Train worker (DDP; elastic).

Data comes from the soft-label store (distillation) or from the dataset's
training split (the baseline, alpha = 1, no teacher), streamed by
:class:`data_pipeline.streaming.StreamingReader`: the global batch of step s in
epoch e is a pure function of (seed, e, s), whatever the worker count, so the
resume state is just (epoch, step) plus model, optimiser and RNG state. After a
restart at another worker count the epoch continues with every row used once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from data_pipeline import fsio
from data_pipeline import soft_labels as store
from data_pipeline.dataset import load_manifest, read_split, train_item_counts
from data_pipeline.layout import RunLayout
from data_pipeline.streaming import BlockRef, PrefetchIterator, StreamingReader, list_blocks, prefetch_iter
from distill.config import Config, build_config, stage_fingerprint
from distill.export import read_export_tensor, save_export
from distill.losses import distillation_loss
from distill.model import PAD_ID, SequentialRecommender
from distill.runtime import select_runtime
from distill.sequences import left_pad_flat
from distill.sizing import count_parameters
from distill.teacher_init import init_item_table_from_teacher
from distill.training import check_checkpoint_stage, distributed_ranking_eval, lr_ratio

log = logging.getLogger(__name__)

STATE_FILE = "student_state.json"
WEIGHTS_FILE = "student.pt"


@dataclass
class StudentBatch:
    """One worker's share of a global step, as tensors.

    inputs/targets: (B, L) left-padded; ``soft``: per-position teacher labels aligned
    with the real (non-padding) positions of ``inputs`` in row-major order; ``rows``:
    an identifier per row (for the consumed-rows audit log).
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    soft: Optional[dict[str, torch.Tensor]]
    rows: list[int]


def _list_column(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (values, offsets): row r is ``values[offsets[r]:offsets[r + 1]]``."""
    col = table.column(name).combine_chunks()
    return col.values.to_numpy(zero_copy_only=False), col.offsets.to_numpy()


def _padded(values: np.ndarray, offsets: np.ndarray, max_len: int) -> torch.Tensor:
    # A worker with no rows this step still runs a forward (DDP all-reduces in backward): one padding row.
    width = int(min(np.diff(offsets).max(initial=0), max_len)) or 1
    return torch.from_numpy(left_pad_flat(values, offsets, width) if len(offsets) > 1 else np.zeros((1, width), np.int64))


def _row_ids(table: pa.Table, name: str) -> list[int]:
    return table.column(name).to_numpy().tolist() if table.num_rows else []


def training_blocks(cfg: Config, dataset: dict, soft_manifest: Optional[dict]) -> tuple[list[BlockRef], Optional[list[str]]]:
    """The student's training row groups and the columns to read: the soft-label store's,
    or (``soft_manifest`` None: the baseline) the dataset's training split."""
    layout, storage = RunLayout(cfg.run.run_dir), cfg.data.storage_options
    if soft_manifest is None:
        split = dataset["splits"]["train"]
        return list_blocks([fsio.join(layout.data, f) for f in split["files"]], storage, split["rows"]), ["user", "items"]
    shards = soft_manifest["shards"]
    files = [fsio.join(layout.soft_labels, s["file"]) for s in shards]
    return list_blocks(files, storage, [s["rows"] for s in shards]), None


def batch_from_store(table: pa.Table, spec: store.StoreSpec, max_len: int) -> StudentBatch:
    """A soft-label store batch; positions older than the student's ``max_len`` window are dropped.

    Vectorised (no per-row Python): it runs on the prefetch thread beside the training step.
    """
    inputs, targets = _list_column(table, "inputs"), _list_column(table, "targets")
    # Decoded even for an empty share (0 positions), so every worker runs the same loss code.
    soft = store.decode_positions(table, spec)
    # Keep each row's last min(n, max_len) positions (the student's window), labels alike.
    offsets = soft.pop("row_offsets").numpy()
    lengths = np.diff(offsets)
    if (lengths > max_len).any():
        row_of = np.repeat(np.arange(len(lengths)), lengths)
        keep = torch.from_numpy(np.arange(offsets[-1]) >= (offsets[1:] - max_len)[row_of])
        soft = {name: t[keep] for name, t in soft.items()}
    return StudentBatch(inputs=_padded(*inputs, max_len), targets=_padded(*targets, max_len), soft=soft,
                        rows=_row_ids(table, "seq_index"))


def batch_from_dataset(table: pa.Table, max_len: int) -> StudentBatch:
    """A batch of training histories (the baseline): next-item pairs from the last max_len+1 items."""
    values, offsets = _list_column(table, "items")
    # A sequence s of n >= 2 items gives inputs s[:-1] and targets s[1:]: gather the inputs' value
    # indices (each usable row's [start, end - 1)); the targets are the same indices + 1.
    row_lengths = np.diff(offsets)
    usable = np.flatnonzero(row_lengths >= 2)
    starts, lengths = offsets[:-1][usable], row_lengths[usable] - 1
    input_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    gather = np.arange(input_offsets[-1]) - np.repeat(input_offsets[:-1] - starts, lengths)
    return StudentBatch(
        inputs=_padded(values[gather], input_offsets, max_len),
        targets=_padded(values[gather + 1], input_offsets, max_len),
        soft=None,
        rows=_row_ids(table, "user"),
    )


class PositionLogits(nn.Module):
    """Student logits at the real positions only: (B, L) -> (P, C), fp32. One module, so DDP sees every weight in forward.

    ``bf16``: the forward (chiefly the (P, d) x (d, C) catalog matmul, the student's largest
    cost) runs under bf16 autocast; the logits come back as fp32, so the losses' softmax over
    the catalog stays fp32. The weights and the optimiser stay fp32 either way.
    """

    def __init__(self, model: SequentialRecommender, bf16: bool = False):
        super().__init__()
        self.model = model
        self.bf16 = bf16

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            hidden = self.model(inputs)
            logits = self.model.scores(hidden[inputs != PAD_ID])
        return logits.float()


def student_train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train ``train_loop_per_worker``; ``loop_config = {"config": ..., "baseline": bool}``."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    cfg: Config = build_config(loop_config["config"])
    baseline: bool = loop_config["baseline"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    runtime = select_runtime(cfg.run.device, cfg.student.bf16)
    device = ray.train.torch.get_device() if runtime.use_gpu else torch.device("cpu")
    layout = RunLayout(cfg.run.run_dir)
    storage = cfg.data.storage_options
    mcfg, tcfg, dcfg = cfg.student.model, cfg.student.train, cfg.distill
    out_url = layout.baseline if baseline else layout.student

    dataset = load_manifest(layout.data, storage)
    num_items = dataset["num_items"]
    valid = read_split(layout.data, "valid", storage, dataset)
    soft_manifest = None if baseline else loop_config["soft_manifest"]
    spec = None if baseline else store.StoreSpec.from_dict(soft_manifest["spec"])
    blocks, columns = training_blocks(cfg, dataset, soft_manifest)
    reader = StreamingReader(
        blocks, columns, dcfg.num_virtual_shards, tcfg.batch_size, cfg.run.seed, rank, world, storage, dcfg.prefetch_blocks
    )

    torch.manual_seed(cfg.run.seed)
    model = SequentialRecommender(mcfg, num_items)
    if model.item_table is not None:  # mixed-dim item table: popular items in the wide bands
        model.item_table.set_item_order(train_item_counts(layout.data, num_items, storage))
    checkpoint = ray.train.get_checkpoint()
    if not baseline and dcfg.init_from_teacher and checkpoint is None:
        # The same on every rank (a deterministic SVD of the same tensor); DDP also broadcasts rank 0's weights.
        init_item_table_from_teacher(model, read_export_tensor(loop_config["teacher_url"], "item_emb.weight", storage))
    optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay, betas=(0.9, 0.98))
    stage_fp = stage_fingerprint(cfg, "baseline") if baseline else stage_fingerprint(cfg, "student", soft_manifest["teacher_fingerprint"])
    state = {"epoch": 0, "step": 0, "best_ndcg": -1.0, "world_size": world, "history": [], "restarts": [],
             "stage_fingerprint": stage_fp}
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            with open(os.path.join(ckpt_dir, STATE_FILE)) as f:
                saved = json.load(f)
            check_checkpoint_stage(saved, stage_fp, checkpoint.path)
            blob = torch.load(os.path.join(ckpt_dir, WEIGHTS_FILE), map_location="cpu", weights_only=True)
        model.load_state_dict(blob["model"])
        optimizer.load_state_dict(blob["optimizer"])
        torch.set_rng_state(blob["rng"])
        saved["restarts"].append({"epoch": saved["epoch"], "step": saved["step"], "from_workers": saved["world_size"], "workers": world})
        state = {**saved, "stage_fingerprint": stage_fp}
        log.info("rank %d: resumed at epoch %d step %d (was %d workers, now %d)", rank, state["epoch"], state["step"], saved["world_size"], world)
    model.to(device)
    position_logits = PositionLogits(model, bf16=runtime.bf16)
    forward = ray.train.torch.prepare_model(position_logits, move_to_device=False) if world > 1 else position_logits
    if rank == 0:
        log.info("student on %s (%s), %s forward", device, runtime.backend, "bf16-autocast" if runtime.bf16 else "fp32")
    attempt = f"e{state['epoch']}s{state['step']}w{world}-{uuid.uuid4().hex[:6]}" if rank == 0 else None
    attempt_id = _broadcast_object(attempt, dist) if world > 1 else attempt
    params = count_parameters(mcfg, num_items)
    kd_options = {"K": dcfg.ranking_top} if dcfg.loss == "ranking" else {}

    def save_and_report(metrics: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory(prefix="recdistill-student-") as tmp:
            ckpt = None
            if rank == 0:
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}, os.path.join(tmp, WEIGHTS_FILE))
                with open(os.path.join(tmp, STATE_FILE), "w") as f:
                    json.dump({**state, "world_size": world}, f)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)

    to_batch = (lambda t: batch_from_dataset(t, mcfg.max_len)) if baseline else (lambda t: batch_from_store(t, spec, mcfg.max_len))

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
    for epoch in range(state["epoch"], tcfg.epochs):
        started, losses = time.perf_counter(), []
        forward.train()
        for step, batch in batches:
            logits = forward(batch.inputs.to(device))
            targets = batch.targets[batch.inputs != PAD_ID].to(device)
            soft = {k: v.to(device) for k, v in batch.soft.items()} if batch.soft else None
            alpha = 1.0 if baseline else dcfg.alpha
            loss_sum, count, _ = distillation_loss(dcfg.loss, alpha, dcfg.temperature, logits, targets, soft, **kd_options)
            global_count = torch.as_tensor(float(count), device=device)
            if world > 1:
                dist.all_reduce(global_count)
            # Sum over the global batch / its size; DDP averages gradients over ranks, hence * world.
            loss = loss_sum * world / global_count.clamp(min=1.0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tcfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            set_lr(epoch, step)
            optimizer.step()
            losses.append(float(loss_sum.detach()) / max(float(count), 1.0))
            if dcfg.log_consumed:
                _log_consumed(out_url, storage, attempt_id, epoch, step, rank, world, batch.rows)
            state["step"] = step + 1
            if state["step"] % dcfg.checkpoint_every_steps == 0 and state["step"] < reader.steps_per_epoch(epoch):
                save_and_report({"epoch": epoch, "step": state["step"], "workers": world, "train_loss": float(np.mean(losses))})
        # Start the next epoch's reads now: its first blocks arrive while validation runs.
        batches = epoch_batches(epoch + 1, 0) if epoch + 1 < tcfg.epochs else None
        forward.eval()
        metrics = distributed_ranking_eval(
            model.score_last, valid, num_items, cfg.eval.ks, tcfg.eval_batch_size, rank, world, device, mcfg.max_len
        )
        record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else math.nan,
                  "train_seconds": time.perf_counter() - started, "workers": world, "lr": optimizer.param_groups[0]["lr"],
                  **{f"val_{k}": v for k, v in metrics.items()}}
        state["history"].append(record)
        if rank == 0:
            log.info("%s epoch %d: train loss %.4f, val NDCG@10 %.4f, %.1f s on %d workers", "baseline" if baseline else "student",
                     epoch + 1, record["train_loss"], metrics["ndcg@10"], record["train_seconds"], world)
        if metrics["ndcg@10"] > state["best_ndcg"]:
            state["best_ndcg"] = metrics["ndcg@10"]
            if rank == 0:
                info = {"role": "baseline" if baseline else "student", "params": params, "epoch": epoch + 1, "valid": metrics,
                        "dataset_fingerprint": dataset["fingerprint"],
                        "distill": None if baseline else {**dcfg.model_dump(mode="json"), "teacher_fingerprint": soft_manifest["teacher_fingerprint"]}}
                save_export(out_url, model.state_dict(), mcfg, num_items, info, storage)
        state.update(epoch=epoch + 1, step=0)
        if rank == 0:
            fsio.write_json_atomic(fsio.join(out_url, "history.json"),
                                   {"history": state["history"], "restarts": state["restarts"], "stage_fingerprint": stage_fp}, storage)
        save_and_report({**record, "best_val_ndcg@10": state["best_ndcg"]})
        if tcfg.patience and len(state["history"]) > tcfg.patience:
            recent = [h["val_ndcg@10"] for h in state["history"][-tcfg.patience:]]
            if max(recent) < state["best_ndcg"]:
                log.info("no improvement for %d epochs: stopping early", tcfg.patience)
                break
    if batches is not None:
        batches.close()  # stopped early: the next epoch's reader was already running
    if rank == 0:  # the pipeline's "this stage is done" (the export alone exists from the first best epoch on)
        fsio.write_json_atomic(fsio.join(out_url, "history.json"),
                               {"history": state["history"], "restarts": state["restarts"], "stage_fingerprint": stage_fp,
                                "complete": True}, storage)


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
