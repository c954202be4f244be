"""``recdistill precompute``: the exported teacher, hosted under ZeRO-3 on Ray Train workers,
labels every training position once; soft labels go to ``run_dir/soft_labels``.

Work is planned in *shards* of consecutive training sequences (``precompute.rows_per_shard``
sequences each), so shard boundaries never depend on the worker count. With teacher-labelled
augmentation (``precompute.augment``) perturbed copies of the sequences follow, in shards of
their own, labelled at every position and marked as augmented (no hard target). Worker r
of W takes the not-yet-committed shards ``r::W``. The teacher is hosted under
ZeRO-3, so all workers run their forwards in lockstep (a worker with nothing
left runs a one-row dummy forward). A writer thread encodes and uploads each
finished shard while the teacher computes the next batches.

Re-running after a crash skips committed shards; per-shard sampling seeds and
fixed per-shard batches make the values identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from cluster.common import save_resolved_config
from cluster.plan import RunPlan, build_plan
from cluster.config import Config, build_config
from cluster.memory_watch import NodeMemoryWatch, gather_peaks
from cluster.engine import RayTrainContext, WorkerContext, quiet_worker_logs
from cluster.runtime import select_runtime
from cluster.precompute_rating import RatingLabeller, rating_rows
from cluster.teacher_hosting import host_teacher
from data_pipeline import fsio
from data_pipeline.augment import augment_sequences
from data_pipeline.credentials import redact
from data_pipeline import soft_labels as store
from data_pipeline.dataset import load_manifest, read_split
from data_pipeline.exports import check_export_fits_dataset, verify_export
from data_pipeline.layout import RunLayout
from distill.sequences import left_pad
from distill.training import training_sequences_with_users

log = logging.getLogger(__name__)


@dataclass
class ShardPlan:
    """The rows of one shard and where their positions sit in the global example order."""

    index: int
    seq_indices: np.ndarray  # (R,) into the global row list
    example_start: np.ndarray  # (R,) global id of each row's first position


@dataclass
class LabelRows:
    """What the teacher labels, one row per store row: the training sequences, then any augmented rows.

    A training sequence ``s`` gives inputs ``s[:-1]`` and targets ``s[1:]``; an augmented row
    ``a`` (teacher-labelled augmentation) gives inputs ``a`` and no targets (zeros): the
    teacher labels every position of it, the last one included.
    """

    users: np.ndarray  # (R,)
    inputs: list[np.ndarray]
    targets: list[np.ndarray]
    num_real: int  # rows 0..num_real-1 are training sequences, the rest augmented
    augmented_rows: bool  # the store has the augmented column (augmentation on, even if it made 0 rows)

    @property
    def augmented(self) -> Optional[np.ndarray]:
        return (np.arange(len(self.inputs)) >= self.num_real) if self.augmented_rows else None


def label_rows(users: np.ndarray, sequences: list[np.ndarray], augment, num_items: int, seed: int, max_len: int) -> LabelRows:
    """The training sequences, plus ``augment.ratio`` perturbed copies per sequence when augmentation is on."""
    inputs, targets = [s[:-1] for s in sequences], [s[1:] for s in sequences]
    if augment.ratio == 0:
        return LabelRows(users, inputs, targets, len(sequences), False)
    sources, rows = augment_sequences(sequences, num_items, round(augment.ratio * len(sequences)), augment.ops,
                                      augment.rate, seed, max_len)
    return LabelRows(np.concatenate([users, users[sources]]), inputs + rows,
                     targets + [np.zeros(len(a), np.int64) for a in rows], len(sequences), True)


def plan_shards(positions: np.ndarray, rows_per_shard: int, num_real: Optional[int] = None) -> list[ShardPlan]:
    """Consecutive runs of ``rows_per_shard`` rows; example ids count positions in row order.

    ``positions`` (R,): positions per row. Rows from ``num_real`` on (augmented) start shards of
    their own, so a shard is either all training sequences or all augmented rows.
    """
    positions = np.asarray(positions, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(positions)[:-1]]) if len(positions) else positions
    num_real = len(positions) if num_real is None else num_real
    plans = []
    for first, end in ((0, num_real), (num_real, len(positions))):
        for begin in range(first, end, rows_per_shard):
            rows = np.arange(begin, min(begin + rows_per_shard, end))
            plans.append(ShardPlan(len(plans), rows, starts[rows]))
    return plans


def assign_shards(todo: list[int], rank: int, world: int) -> list[int]:
    """Deterministic, worker-count-aware assignment of the remaining shards."""
    return todo[rank::world]


def shard_seed(seed: int, shard_index: int) -> int:
    """Sampling seed of one shard: independent of which worker computes it, or when."""
    return int(np.random.SeedSequence([seed, shard_index]).generate_state(1)[0])


@dataclass
class TeacherOutputs:
    """Per-sequence teacher outputs for one batch, positions oldest first."""

    topk_ids: list[np.ndarray]  # each (n_i, k) int64
    topk_logits: list[np.ndarray]  # each (n_i, k) float32
    lse: list[np.ndarray]  # each (n_i,) float32
    sampled: Optional[tuple[list, list, list]] = None


def teacher_outputs(
    logits: torch.Tensor, inputs: torch.Tensor, k: int, num_sampled: int, generator: Optional[torch.Generator]
) -> TeacherOutputs:
    """Top-k ids/logits, log-normaliser and sampled labels at every real position.

    logits: (B, L, C) fp32 with column 0 = padding; inputs: (B, L) left-padded ids.
    The padding column is excluded from top-k, the log-normaliser and sampling.
    """
    real = inputs != 0  # (B, L)
    flat = logits[real][:, 1:]  # (P, C-1): row-major, so each sequence's positions stay in order
    top_values, top_columns = flat.topk(k, dim=-1)
    lse = torch.logsumexp(flat, dim=-1)
    counts = real.sum(dim=1).tolist()
    split = lambda t: [a.numpy() for a in torch.split(t, counts)]  # noqa: E731
    sampled = None
    if num_sampled:
        padded = torch.nn.functional.pad(flat, (1, 0), value=torch.finfo(flat.dtype).min)
        ids, cnts, vals = store.sample_soft_labels(padded, num_sampled, generator)
        bounds = np.cumsum([0] + counts)
        sampled = tuple([x[a:b] for a, b in zip(bounds[:-1], bounds[1:])] for x in (ids, cnts, vals))
    return TeacherOutputs(split(top_columns + 1), split(top_values), split(lse), sampled)


@dataclass
class _ShardBuffer:
    plan: ShardPlan
    batches: list = field(default_factory=list)  # the labeller's outputs, one per batch, in row order


class NextItemLabeller:
    """What the teacher computes and the store keeps for the next-item task: top-k scores over the
    catalog, the log-normaliser and (optionally) sampled labels, at every position of every row."""

    def __init__(self, teacher, rows: LabelRows, spec: store.StoreSpec):
        self.teacher, self.rows, self.spec = teacher, rows, spec

    def dummy_forward(self) -> None:
        self.teacher.logits_all(torch.ones(1, 1, dtype=torch.long))

    def forward(self, batch_rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = left_pad([self.rows.inputs[i] for i in batch_rows], max(len(self.rows.inputs[i]) for i in batch_rows))
        return self.teacher.logits_all(inputs).cpu(), inputs

    def outputs(self, forward: tuple[torch.Tensor, torch.Tensor], generator) -> tuple[TeacherOutputs, int]:
        logits, inputs = forward
        return teacher_outputs(logits, inputs, self.spec.k, self.spec.num_sampled, generator), int((inputs != 0).sum())

    def encode(self, shard: _ShardBuffer):
        rows, label = shard.plan.seq_indices, self.rows
        outs = shard.batches
        cat = lambda name: [a for o in outs for a in getattr(o, name)]  # noqa: E731
        sampled = None
        if self.spec.num_sampled:
            sampled = tuple([a for o in outs for a in o.sampled[i]] for i in range(3))
        return store.encode_rows(
            self.spec,
            seq_index=rows,
            users=label.users[rows],
            example_start=shard.plan.example_start,
            inputs=[label.inputs[i] for i in rows],
            targets=[label.targets[i] for i in rows],
            topk_ids=cat("topk_ids"),
            topk_logits=cat("topk_logits"),
            lse=cat("lse"),
            sampled=sampled,
            shard_name=store.shard_name(shard.plan.index),
            augmented=None if label.augmented is None else label.augmented[rows],
        )


class ShardWriter:
    """Encodes (with the task's labeller) and commits finished shards on a background thread
    (bounded queue = bounded memory)."""

    def __init__(self, store_url: str, encode, provenance: dict[str, Any], row_group_size: int, storage_options):
        self.store_url, self.encode, self.provenance = store_url, encode, provenance
        self.row_group_size, self.storage_options = row_group_size, storage_options
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: Optional[BaseException] = None
        self.records: list[dict] = []
        self.thread = threading.Thread(target=self._run, name="soft-label-writer", daemon=True)
        self.thread.start()

    def submit(self, shard: _ShardBuffer) -> None:
        if self.error:
            raise self.error
        self.queue.put(shard)

    def close(self) -> list[dict]:
        self.queue.put(None)
        self.thread.join()
        if self.error:
            raise self.error
        return self.records

    def _run(self) -> None:
        while True:
            shard = self.queue.get()
            if shard is None:
                return
            if self.error:
                continue  # drain: the main thread raises at its next submit/close
            try:
                table = self.encode(shard)
                self.records.append(store.write_shard(self.store_url, shard.plan.index, table, self.provenance,
                                                      self.row_group_size, self.storage_options))
            except BaseException as exc:  # surfaced on the main thread
                self.error = exc


def run_precompute(
    labeller,
    plans: list[ShardPlan],
    todo: list[int],
    provenance: dict[str, Any],
    store_url: str,
    batch_size: int,
    seed: int,
    rank: int,
    world: int,
    row_group_size: int,
    storage_options=None,
    progress=None,
    forward_only: bool = False,
    labels_only: bool = False,
) -> list[dict]:
    """This rank's share of the work; every rank must call it (lockstep forwards). Returns its shard records.

    ``labeller``: the task's (:class:`NextItemLabeller`, :class:`cluster.precompute_rating.RatingLabeller`).
    For the benchmark: ``forward_only`` runs the same teacher forwards and nothing else (the
    reference time); ``labels_only`` also computes the soft labels but stores nothing.
    """
    mine = assign_shards(todo, rank, world)
    # The number of forwards every rank runs: the largest share, in batches.
    def batches_of(shards: list[int]) -> int:
        return sum(math.ceil(len(plans[j].seq_indices) / batch_size) for j in shards)

    steps = max(batches_of(assign_shards(todo, r, world)) for r in range(world)) if todo else 0
    writer = ShardWriter(store_url, labeller.encode, provenance, row_group_size, storage_options)
    tasks = [(j, b) for j in mine for b in range(0, len(plans[j].seq_indices), batch_size)]
    current: Optional[_ShardBuffer] = None
    generator = None
    try:
        for step in range(steps):
            if step >= len(tasks):  # nothing left here: a dummy forward keeps ZeRO-3 in lockstep
                labeller.dummy_forward()
                continue
            j, begin = tasks[step]
            if current is None or current.plan.index != j:
                current = _ShardBuffer(plans[j])
                generator = torch.Generator().manual_seed(shard_seed(seed, j))
            forward = labeller.forward(plans[j].seq_indices[begin : begin + batch_size])
            if forward_only:
                continue
            outputs, positions = labeller.outputs(forward, generator)
            if labels_only:
                continue
            current.batches.append(outputs)
            if progress is not None:
                progress(positions)
            if begin + batch_size >= len(plans[j].seq_indices):
                writer.submit(current)
                current = None
    finally:
        records = writer.close()
    return records


def precompute_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train ``train_loop_per_worker`` for ``recdistill precompute``."""
    precompute_worker(loop_config, RayTrainContext())


def precompute_worker(loop_config: dict[str, Any], ctx: WorkerContext) -> None:
    """One worker's share of the labelling, under whatever engine ``ctx`` is."""
    import deepspeed
    import torch.distributed as dist
    from tqdm import tqdm

    cfg = build_config(loop_config["config"])
    quiet_worker_logs(cfg.run.log_level)
    teacher_url = loop_config["teacher_url"]
    forward_only, labels_only = loop_config.get("forward_only", False), loop_config.get("labels_only", False)
    benchmark_only = forward_only or labels_only  # neither touches the store
    rank, world = ctx.rank, ctx.world_size
    runtime = select_runtime(cfg.run.device, cfg.deepspeed.bf16)
    deepspeed.init_distributed(dist_backend=runtime.backend)
    node_watch = NodeMemoryWatch()  # from before the teacher is hosted: loading it is part of the peak
    layout = RunLayout(cfg.run.run_dir)
    storage = cfg.data.storage_options
    pcfg = cfg.precompute

    manifest = load_manifest(layout.data, storage)
    # One teacher, or the mixture of it and teacher.ensemble's members (each its own ZeRO engine).
    teacher = host_teacher([teacher_url, *cfg.teacher.ensemble], storage, zero_stage=cfg.deepspeed.zero_stage, bf16=runtime.bf16,
                           device=ctx.device(runtime.use_gpu))
    check_export_fits_dataset(teacher.meta, manifest, teacher_url)
    train, max_len = read_split(layout.data, "train", storage, manifest), teacher.model_cfg.max_len
    if cfg.run.task == "rating":  # the teacher's whole distribution over rating levels (no top-k)
        levels = len(manifest["rating_values"])
        rating = rating_rows(train, max_len, pcfg.augment, manifest["num_items"], levels, cfg.run.seed)
        positions, num_real, augmented_rows = rating.positions, rating.num_real, rating.augmented_rows
        spec = store.StoreSpec(num_items=manifest["num_items"], k=levels, value_dtype=pcfg.dtype, num_sampled=0,
                               max_len=max_len, num_levels=levels, augmented_rows=augmented_rows)
        labeller = RatingLabeller(teacher, rating, spec)
    else:
        users, sequences = training_sequences_with_users(train, max_len)
        rows = label_rows(users, sequences, pcfg.augment, manifest["num_items"], cfg.run.seed, max_len)
        positions = np.fromiter(map(len, rows.inputs), dtype=np.int64, count=len(rows.inputs))
        num_real, augmented_rows = rows.num_real, rows.augmented_rows
        spec = store.StoreSpec(num_items=manifest["num_items"], k=pcfg.k, value_dtype=pcfg.dtype, num_sampled=pcfg.num_sampled,
                               max_len=max_len, augmented_rows=augmented_rows)
        labeller = NextItemLabeller(teacher, rows, spec)
    # The store's layout was decided by the run plan (cluster.plan), from the counts, before any worker started.
    rows_per_shard, row_group_size = loop_config["rows_per_shard"], loop_config["row_group_size"]
    plans = plan_shards(positions, rows_per_shard, num_real)
    # The sampling seed decides stored values, and the layout which rows a shard holds: a reusable
    # shard must match both (and the augmentation settings, which decide the augmented rows).
    provenance = {**store.make_provenance(spec, teacher.fingerprint, manifest["fingerprint"]), "seed": cfg.run.seed,
                  "layout": {"rows_per_shard": rows_per_shard, "row_group_size": row_group_size}}
    if augmented_rows:
        provenance["augmentation"] = pcfg.augment.settings()
    done = {} if benchmark_only else store.committed_shards(layout.soft_labels, provenance, storage)
    todo = [p.index for p in plans if p.index not in done]
    if todo and not benchmark_only:
        if rank == 0:
            store.remove_manifest(layout.soft_labels, storage)  # uncommit before any shard changes
        dist.barrier()
    total_positions = int(sum(positions[plans[j].seq_indices].sum() for j in todo))
    my_positions = int(sum(positions[plans[j].seq_indices].sum() for j in assign_shards(todo, rank, world)))
    if rank == 0:
        log.info("precompute: %d shards (%d rows, %d of them augmented), %d already committed, %d positions to go on %d workers",
                 len(plans), len(positions), len(positions) - num_real, len(done), total_positions, world)

    started = time.perf_counter()
    # Rank 0 shows its own share; the others run at the same pace (lockstep).
    bar = tqdm(total=my_positions, unit="pos", desc=f"precompute (rank 0 of {world})", disable=rank != 0, mininterval=5)
    run_precompute(
        labeller, plans, todo, provenance, layout.soft_labels, pcfg.batch_size, cfg.run.seed,
        rank, world, row_group_size, storage, progress=bar.update,
        forward_only=forward_only, labels_only=labels_only,
    )
    bar.close()
    dist.barrier()  # every shard is committed before the manifest
    memory = gather_peaks(world, node_watch)  # measured, beside the plan's estimate
    node_watch.stop()
    # Where every shard was committed before and the manifest is there, the manifest stays as written (with the time its
    # labelling took), since a rewrite would record this run's seconds of nothing to do.
    if rank == 0 and not benchmark_only and (todo or not fsio.exists(fsio.join(layout.soft_labels, store.MANIFEST), storage)):
        records = store.committed_shards(layout.soft_labels, provenance, storage)
        augmentation = None
        if augmented_rows:
            augmentation = {"settings": pcfg.augment.settings(), "first_seq": num_real,
                            "rows": len(positions) - num_real, "positions": int(positions[num_real:].sum())}
        store.write_manifest(
            layout.soft_labels, spec, provenance, [records[j] for j in sorted(records)], len(positions), int(positions.sum()),
            extra={"seconds_this_run": time.perf_counter() - started, "workers": world, "memory": memory,
                   "teacher_url": redact(teacher_url),
                   "ensemble": [{"url": redact(url), "fingerprint": fp} for url, fp in getattr(teacher, "members", [])]},
            storage_options=storage, augmentation=augmentation,
        )
    metrics = {"positions": total_positions, "seconds": time.perf_counter() - started, "benchmark_only": benchmark_only,
               **memory}
    # Ray Train V2 surfaces metrics of checkpointed reports only, so rank 0 attaches a tiny one.
    with tempfile.TemporaryDirectory(prefix="recdistill-precompute-") as tmp:
        if rank == 0:
            with open(os.path.join(tmp, "timing.json"), "w") as f:
                json.dump(metrics, f)
        ctx.report(metrics, checkpoint_dir=tmp if rank == 0 else None)


def run(cfg: Config, plan: Optional[RunPlan] = None) -> dict:
    # Ray is imported here, on the driver: the worker part above runs without it.
    from ray.train.torch import TorchTrainer

    from cluster.ray_setup import ensure_ray, fit, require_resources, run_config, scaling_config, torch_config

    plan = plan or build_plan(cfg)
    plan.require("precompute")
    layout = RunLayout(cfg.run.run_dir)
    save_resolved_config(cfg)
    if plan.stage("precompute").action == "done":  # a rerun starts no Ray and keeps the manifest (its labelling time)
        print(f"precompute: done; the store at {layout.soft_labels} holds teacher {plan.labels_fingerprint[:12]}'s labels "
              "with this run's settings (delete it to label again)", flush=True)
        print(store.format_manifest(plan.store))
        return plan.store
    # The teacher's weights against its fingerprint (a full read), here, before any worker starts.
    for url in (plan.teacher_url, *cfg.teacher.ensemble):
        verify_export(url, cfg.data.storage_options)
    if cfg.teacher.ensemble:
        print(f"precompute: labels from the mixture of {1 + len(cfg.teacher.ensemble)} teachers "
              f"(ensemble {plan.labels_fingerprint[:12]})", flush=True)
    print(f"precompute: teacher {plan.teacher['fingerprint'][:12]} from {plan.teacher_url}; {plan.num_sequences:,} sequences "
          f"in files of {plan.layout.store_rows_per_shard} and row groups of {plan.layout.store_row_group_size} "
          f"({plan.layout.origin['precompute.row_group_size']}) on {cfg.scaling.num_workers} workers", flush=True)
    ensure_ray(cfg)
    require_resources(cfg)
    trainer = TorchTrainer(
        precompute_loop,
        train_loop_config={"config": cfg.to_dict(), "teacher_url": plan.teacher_url,
                           "rows_per_shard": plan.layout.store_rows_per_shard, "row_group_size": plan.layout.store_row_group_size},
        scaling_config=scaling_config(cfg),
        torch_config=torch_config(cfg),
        run_config=run_config(cfg, name="precompute"),
    )
    committed = lambda: fsio.exists(fsio.join(layout.soft_labels, store.MANIFEST), cfg.data.storage_options)  # noqa: E731
    fit(trainer, committed, cfg, "precompute")
    manifest = store.load_store_manifest(layout.soft_labels, cfg.data.storage_options)
    print(store.format_manifest(manifest))
    return manifest
