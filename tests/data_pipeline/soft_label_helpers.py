"""Test data for the soft-label store tests (test_soft_labels_*.py): fingerprints, a small spec, random valid batches."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from data_pipeline import soft_labels as sl
from data_pipeline.soft_labels import StoreSpec

TEACHER = "a1" * 32
OTHER_TEACHER = "b2" * 32
DATASET = "c3" * 32


def make_batch(
    spec: StoreSpec, num_rows: int, seed: int = 0, first_seq: int = 0, example_start: int = 0, lengths=None
) -> dict:
    """Keyword arguments for :func:`sl.encode_rows`: ``num_rows`` sequences of random, valid teacher outputs.

    Row lengths are random in 1..max_len with row 0 full, unless ``lengths`` gives them.
    """
    rng = np.random.default_rng(seed)
    n = rng.integers(1, spec.max_len + 1, num_rows)
    n[0] = spec.max_len  # always exercise a full-length row
    if lengths is not None:
        n = np.asarray(lengths)
    num_positions = int(n.sum())
    split = lambda a: np.split(a, np.cumsum(n)[:-1])  # noqa: E731 (test data; rows, not positions)
    ids = rng.integers(1, spec.num_items + 1, (num_positions, spec.k))
    ids[0, 0] = spec.num_items  # the largest id must survive the id dtype
    logits = -np.sort(-rng.normal(0, 4, (num_positions, spec.k)), axis=1).astype(np.float32)
    lse = (logits[:, 0] + rng.uniform(0.5, 3, num_positions)).astype(np.float32)
    items = rng.integers(1, spec.num_items + 1, num_positions + num_rows)
    starts = np.concatenate([[0], np.cumsum(n)[:-1]])
    batch = dict(
        spec=spec,
        seq_index=np.arange(first_seq, first_seq + num_rows),
        users=rng.integers(1, 1000, num_rows),
        example_start=example_start + starts,
        inputs=split(items[:num_positions]),
        targets=split(items[num_rows:]),
        topk_ids=split(ids),
        topk_logits=split(logits),
        lse=split(lse),
        sampled=None,
        shard_name="part-00000.parquet",
    )
    if spec.num_sampled:
        full = torch.from_numpy(rng.normal(0, 2, (num_positions, spec.num_items + 1)).astype(np.float32))
        drawn = sl.sample_soft_labels(full, spec.num_sampled, torch.Generator().manual_seed(seed))
        bounds = np.concatenate([[0], np.cumsum(n)])
        batch["sampled"] = [tuple(x[a:b] for x in drawn) for a, b in zip(bounds[:-1], bounds[1:])]
        batch["full_logits"] = full
    return batch


def encode(batch: dict) -> pa.Table:
    return sl.encode_rows(**{k: v for k, v in batch.items() if k != "full_logits"})


def small_spec(**overrides) -> StoreSpec:
    return StoreSpec(**{"num_items": 50, "k": 4, "value_dtype": "fp16", "num_sampled": 0, "max_len": 6, **overrides})
