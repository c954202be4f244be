"""The student's batches: rows the streaming reader hands a worker, as tensors.

Distillation reads the soft-label store (inputs, targets and the teacher's labels per
position); the baseline reads the dataset's training split (next-item pairs only). Both
are vectorised (no per-row Python): they run on the prefetch thread beside the step.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import torch

from cluster.config import Config
from data_pipeline import fsio
from data_pipeline import soft_labels as store
from data_pipeline.layout import RunLayout
from data_pipeline.streaming import BlockRef, list_blocks
from distill.sequences import left_pad_flat


@dataclass
class StudentBatch:
    """One worker's share of a global step, as tensors.

    inputs/targets: (B, L) left-padded; ``soft``: per-position teacher labels aligned
    with the real (non-padding) positions of ``inputs`` in row-major order; ``rows``:
    an identifier per row (for the consumed-rows audit log); ``augmented``: (P,) bool
    aligned like ``soft``, True at positions of teacher-labelled augmented rows (KD only),
    or None when the store has none.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    soft: Optional[dict[str, torch.Tensor]]
    rows: list[int]
    augmented: Optional[torch.Tensor] = None


def _list_column(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (values, offsets): row r is ``values[offsets[r]:offsets[r + 1]]``."""
    col = table.column(name).combine_chunks()
    return col.values.to_numpy(zero_copy_only=False), col.offsets.to_numpy()


def _padded(values: np.ndarray, offsets: np.ndarray, max_len: int, allow_zero: bool = False) -> torch.Tensor:
    # A worker with no rows this step still runs a forward (DDP all-reduces in backward): one padding row.
    width = int(min(np.diff(offsets).max(initial=0), max_len)) or 1
    return torch.from_numpy(left_pad_flat(values, offsets, width, allow_zero) if len(offsets) > 1 else np.zeros((1, width), np.int64))


def _row_ids(table: pa.Table, name: str) -> list[int]:
    return table.column(name).to_numpy().tolist() if table.num_rows else []


def augmentation_in_use(cfg: Config, store: Optional[dict]) -> Optional[dict]:
    """The augmentation settings the distilled student trains with, or None.

    The store's (or, before it is written, what ``precompute.augment`` will write), unless
    ``distill.augmented=skip``. ``distill.augmented=use`` with none is refused by the run plan.
    """
    if cfg.distill.augmented == "skip":
        return None
    if store is None:
        return cfg.precompute.augment.settings()
    return (store.get("augmentation") or {}).get("settings")


def label_settings(cfg: Config) -> dict[str, Any]:
    """The settings of the soft labels a run's store holds (the run plan refuses a store written with others)."""
    pcfg = cfg.precompute
    if cfg.run.task == "rating":  # the whole distribution over the rating levels: no top-k, no samples
        return {"value_dtype": pcfg.dtype}
    return {"value_dtype": pcfg.dtype, "k": pcfg.k, "num_sampled": pcfg.num_sampled}


def student_source(teacher_fingerprint: str, cfg: Config, store: Optional[dict]) -> str:
    """What a distilled student learns from, for its stage fingerprint: the teacher, the labels'
    settings (a top-64 and a top-128 store teach differently: a student of one is not done for the
    other), and the augmentation settings when it trains on augmented rows (other rows, another student)."""
    source = {"labels": label_settings(cfg), "augmented": augmentation_in_use(cfg, store)}
    return f"{teacher_fingerprint}+{hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:12]}"


def training_blocks(cfg: Config, dataset: dict, soft_manifest: Optional[dict]) -> tuple[list[BlockRef], Optional[list[str]]]:
    """The student's training row groups and the columns to read: the soft-label store's
    (its augmented shards only when :func:`augmentation_in_use`), or (``soft_manifest``
    None: the baseline) the dataset's training split."""
    layout, storage = RunLayout(cfg.run.run_dir), cfg.data.storage_options
    if soft_manifest is None:
        split = dataset["splits"]["train"]
        files = [fsio.join(layout.data, f) for f in split["files"]]
        columns = ["user", "items", "levels"] if cfg.run.task == "rating" else ["user", "items"]
        return list_blocks(files, storage, split["rows"], split.get("bytes")), columns
    shards = soft_manifest["shards"]
    if soft_manifest.get("augmentation") and augmentation_in_use(cfg, soft_manifest) is None:
        shards = [s for s in shards if s["last_seq"] < soft_manifest["augmentation"]["first_seq"]]
    files = [fsio.join(layout.soft_labels, s["file"]) for s in shards]

    def same_store(file: str, footer) -> None:  # each shard's own provenance: no shard of another teacher
        store.check_shard_provenance(file, footer.metadata, soft_manifest)

    return list_blocks(files, storage, [s["rows"] for s in shards], [s["bytes"] for s in shards], same_store), None


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
    augmented = soft.pop("augmented", None)
    return StudentBatch(inputs=_padded(*inputs, max_len), targets=_padded(*targets, max_len, augmented is not None),
                        soft=soft, rows=_row_ids(table, "seq_index"), augmented=augmented)


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


def rating_batch_from_store(table: pa.Table, spec: store.StoreSpec, max_len: int) -> StudentBatch:
    """A rating store batch as whole sequences: ``inputs`` the (B, W) items and ``targets`` their (B, W) levels,
    left-padded, W <= max_len + 1 (the student's window); ``soft["log_probs"]`` (P, R) the teacher's
    distributions of the positions kept, row-major (:meth:`distill.rating_model.RatingModel.sequence_logits`'s order);
    ``augmented`` (P,) alike when the store has augmented rows (their levels are inputs, not labels)."""
    soft = store.decode_rating_positions(table, spec)
    offsets = soft.pop("row_offsets").numpy()
    lengths = np.diff(offsets)
    if (lengths > max_len).any():  # keep each row's last max_len positions, as the window below does
        row_of = np.repeat(np.arange(len(lengths)), lengths)
        keep = torch.from_numpy(np.arange(offsets[-1]) >= (offsets[1:] - max_len)[row_of])
        soft = {name: t[keep] for name, t in soft.items()}
    augmented = soft.pop("augmented", None)
    # A row's sequence is its first input followed by its targets (targets[t] is inputs[t + 1]).
    sequences = []
    for first, rest in (("inputs", "targets"), ("input_levels", "target_levels")):
        (first_values, _), (values, _) = _list_column(table, first), _list_column(table, rest)
        sequences.append(np.insert(values.astype(np.int64), offsets[:-1], first_values[offsets[:-1]]))
    full_offsets = offsets + np.arange(len(offsets))
    return StudentBatch(inputs=_padded(sequences[0], full_offsets, max_len + 1),
                        targets=_padded(sequences[1], full_offsets, max_len + 1), soft=soft, rows=_row_ids(table, "seq_index"),
                        augmented=augmented)


def rating_batch_from_dataset(table: pa.Table, max_len: int) -> StudentBatch:
    """A batch of training (items, levels) sequences (the rating twin), as :func:`rating_batch_from_store` without labels."""
    (items, offsets), (levels, _) = _list_column(table, "items"), _list_column(table, "levels")
    lengths = np.diff(offsets)
    keep = np.flatnonzero(lengths >= 2)  # a sequence of one pair has no example
    kept_offsets = np.concatenate([[0], np.cumsum(lengths[keep])]).astype(np.int64)
    gather = np.arange(kept_offsets[-1]) - np.repeat(kept_offsets[:-1] - offsets[:-1][keep], lengths[keep])
    return StudentBatch(inputs=_padded(items[gather].astype(np.int64), kept_offsets, max_len + 1),
                        targets=_padded(levels[gather].astype(np.int64), kept_offsets, max_len + 1), soft=None,
                        rows=_row_ids(table, "user"))
