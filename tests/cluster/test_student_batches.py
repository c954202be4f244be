"""The student's batch decoding (pure functions, no Ray): store rows and training histories to tensors."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from data_pipeline import soft_labels as sl
from distill.sequences import left_pad, left_pad_flat, next_item_batch
from cluster.student_batches import batch_from_dataset, batch_from_store


def store_table(lengths, k=3, num_items=30, seed=0) -> tuple[pa.Table, sl.StoreSpec]:
    spec = sl.StoreSpec(num_items=num_items, k=k, value_dtype="fp16", num_sampled=0, max_len=max(lengths))
    rng = np.random.default_rng(seed)
    n = np.asarray(lengths)
    split = lambda a: np.split(a, np.cumsum(n)[:-1])  # noqa: E731
    P = int(n.sum())
    logits = -np.sort(-rng.normal(0, 3, (P, k)), axis=1).astype(np.float32)
    table = sl.encode_rows(
        spec, seq_index=np.arange(len(n)) + 100, users=np.arange(len(n)) + 1, example_start=np.cumsum(n) - n,
        inputs=split(rng.integers(1, num_items + 1, P)), targets=split(rng.integers(1, num_items + 1, P)),
        topk_ids=split(rng.integers(1, num_items + 1, (P, k))),
        topk_logits=split(logits), lse=split(logits[:, 0] + rng.uniform(1, 2, P).astype(np.float32)), sampled=None, shard_name="part-00000.parquet",
    )
    return table, spec


@pytest.mark.parametrize("max_len", [2, 4, 9])
def test_batch_from_store_keeps_each_rows_last_positions(max_len):
    table, spec = store_table([5, 1, 9, 3])
    table = table.slice(1, 3)  # a slice, as the reader hands out (offsets not starting at 0)
    batch = batch_from_store(table, spec, max_len)
    whole = sl.decode_positions(table, spec)
    offsets = whole["row_offsets"].tolist()
    rows = table.to_pylist()
    width = min(max(len(r["inputs"]) for r in rows), max_len)
    assert torch.equal(batch.inputs, left_pad([r["inputs"] for r in rows], width))
    assert torch.equal(batch.targets, left_pad([r["targets"] for r in rows], width))
    kept = [p for a, b in zip(offsets[:-1], offsets[1:]) for p in range(max(a, b - max_len), b)]
    for key in ("topk_ids", "topk_logits", "lse"):
        assert torch.equal(batch.soft[key], whole[key][kept]), key
    # One soft label per real input position, in the same (row-major) order as the model's logits.
    assert int((batch.inputs != 0).sum()) == len(kept)
    assert batch.rows == [101, 102, 103]


def test_batch_from_store_of_an_empty_share_still_has_one_padding_row():
    table, spec = store_table([4, 2])
    batch = batch_from_store(table.slice(0, 0), spec, 8)
    assert batch.inputs.tolist() == [[0]] and batch.targets.tolist() == [[0]] and batch.rows == []
    assert batch.soft["topk_ids"].shape == (0, 3)


@pytest.mark.parametrize("max_len", [1, 3, 50])
def test_batch_from_dataset_is_next_item_pairs_of_usable_histories(max_len):
    histories = [[4, 5, 6, 7, 8], [9], [], [1, 2], [3, 4, 5]]
    table = pa.table({"user": pa.array([10, 11, 12, 13, 14], pa.int32()), "items": pa.array(histories, pa.list_(pa.int32()))})
    batch = batch_from_dataset(table.slice(1), max_len)
    usable = [h for h in histories[1:] if len(h) >= 2]  # a history of < 2 items has no next-item pair
    width = min(max(len(h) - 1 for h in usable), max_len)
    inputs, targets = next_item_batch(usable, width)
    assert torch.equal(batch.inputs, inputs) and torch.equal(batch.targets, targets)
    assert batch.rows == [11, 12, 13, 14] and batch.soft is None
    assert batch_from_dataset(table.slice(1, 2), max_len).inputs.tolist() == [[0]]  # no usable row


def test_left_pad_flat_follows_sliced_offsets_and_matches_left_pad():
    rng = np.random.default_rng(3)
    seqs = [rng.integers(1, 99, n) for n in rng.integers(0, 12, 40)]
    values = np.concatenate([[77, 78]] + seqs)  # two values before the first row: offsets start at 2
    offsets = 2 + np.concatenate([[0], np.cumsum([len(s) for s in seqs])])
    for width in (1, 5, 12, 20):
        assert torch.equal(torch.from_numpy(left_pad_flat(values, offsets, width)), left_pad(seqs, width))
    with pytest.raises(ValueError, match="must be >= 1"):
        left_pad_flat(np.array([3, 0, 2]), np.array([0, 3]), 3)
    assert left_pad_flat(np.array([3, 0, 2]), np.array([0, 3]), 1).tolist() == [[2]]  # the 0 is outside the window


def test_position_logits_bf16_autocast_returns_fp32_logits_close_to_the_fp32_forward():
    """The GPU path's bf16 forward, exercised with CPU autocast: fp32 logits and fp32 gradients."""
    from distill.config import ModelConfig
    from distill.model import SequentialRecommender
    from distill.training import PositionLogits

    torch.manual_seed(0)
    model = SequentialRecommender(ModelConfig(d_model=32, num_layers=1, num_heads=2, ffn_dim=64, max_len=8, dropout=0.0), 50)
    inputs = torch.tensor([[0, 0, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 9]])
    fp32 = PositionLogits(model)(inputs)
    mixed = PositionLogits(model, bf16=True)(inputs)
    assert fp32.dtype == mixed.dtype == torch.float32 and mixed.shape == fp32.shape == (14, 51)
    assert not torch.equal(mixed, fp32)  # autocast really ran in bf16 ...
    torch.testing.assert_close(mixed, fp32, rtol=0.05, atol=0.05)  # ... to bf16 precision
    mixed.logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_batch_from_store_marks_the_positions_of_augmented_rows():
    spec = sl.StoreSpec(num_items=30, k=3, value_dtype="fp16", num_sampled=0, max_len=6, augmented_rows=True)
    rng = np.random.default_rng(0)
    n = np.array([5, 3, 6])
    augmented = np.array([False, True, False])
    P = int(n.sum())
    split = lambda a: np.split(a, np.cumsum(n)[:-1])  # noqa: E731
    targets = [t * (not a) for t, a in zip(split(rng.integers(1, 31, P)), augmented)]
    logits = -np.sort(-rng.normal(0, 3, (P, 3)), axis=1).astype(np.float32)
    table = sl.encode_rows(spec, seq_index=np.arange(3), users=np.arange(3) + 1, example_start=np.cumsum(n) - n,
                           inputs=split(rng.integers(1, 31, P)), targets=targets, topk_ids=split(rng.integers(1, 31, (P, 3))),
                           topk_logits=split(logits), lse=split(logits[:, 0] + 1), sampled=None, shard_name="part-00000.parquet",
                           augmented=augmented)
    batch = batch_from_store(table, spec, max_len=4)  # windows of the last 4 positions: 4 + 3 + 4
    assert batch.augmented.tolist() == [False] * 4 + [True] * 3 + [False] * 4
    assert "augmented" not in batch.soft
    # The augmented row's real positions have target 0: no hard target reaches the loss from it.
    real_targets = batch.targets[batch.inputs != 0]
    assert (real_targets[batch.augmented] == 0).all() and (real_targets[~batch.augmented] != 0).all()


def test_rating_batch_from_store_rebuilds_whole_sequences_aligned_with_the_labels():
    from cluster.student_batches import rating_batch_from_store
    from distill.rating_model import RatingModel
    from distill.config import ModelConfig

    spec = sl.StoreSpec(num_items=30, k=5, value_dtype="fp32", num_sampled=0, max_len=8, num_levels=5)
    rng = np.random.default_rng(1)
    sequences = [(rng.integers(1, 31, n + 1), rng.integers(1, 6, n + 1)) for n in (4, 1, 7)]
    log_probs = [np.log(rng.dirichlet(np.ones(5), len(items) - 1)).astype(np.float32) for items, _ in sequences]
    n = np.array([len(i) - 1 for i, _ in sequences])
    table = sl.encode_rating_rows(spec, np.arange(3), np.arange(3), np.cumsum(n) - n, [i[:-1] for i, _ in sequences],
                                  [i[1:] for i, _ in sequences], [v[:-1] for _, v in sequences], [v[1:] for _, v in sequences],
                                  log_probs, "part-00000.parquet")
    max_len = 3  # shorter than two rows: each keeps its last 3 positions (4 pairs), labels alike
    batch = rating_batch_from_store(table, spec, max_len)
    assert torch.equal(batch.inputs, left_pad([i for i, _ in sequences], max_len + 1))
    assert torch.equal(batch.targets, left_pad([v for _, v in sequences], max_len + 1))
    kept = np.concatenate([lp[-max_len:] for lp in log_probs])
    np.testing.assert_allclose(batch.soft["log_probs"].numpy(), kept)
    # The model's positions, row-major, are the labels' positions: targets are the kept target levels.
    model = RatingModel(ModelConfig(d_model=8, num_layers=1, num_heads=1, ffn_dim=16, max_len=max_len), 30, 5)
    logits, targets, valid = model.sequence_logits(batch.inputs, batch.targets)
    assert int(valid.sum()) == len(kept)
    assert targets[valid].tolist() == [int(x) - 1 for _, v in sequences for x in v[1:][-max_len:]]
    assert batch.augmented is None

    # A store with augmented rows: their positions are marked, aligned with the labels kept.
    marked = sl.StoreSpec(num_items=30, k=5, value_dtype="fp32", num_sampled=0, max_len=8, num_levels=5, augmented_rows=True)
    table = sl.encode_rating_rows(marked, np.arange(3), np.arange(3), np.cumsum(n) - n, [i[:-1] for i, _ in sequences],
                                  [i[1:] for i, _ in sequences], [v[:-1] for _, v in sequences], [v[1:] for _, v in sequences],
                                  log_probs, "part-00000.parquet", augmented=np.array([True, False, True]))
    batch = rating_batch_from_store(table, marked, max_len)
    assert batch.augmented.tolist() == [True] * 3 + [False] * 1 + [True] * 3 and "augmented" not in batch.soft
    np.testing.assert_allclose(batch.soft["log_probs"].numpy(), kept)


def test_rating_batch_from_dataset_skips_single_ratings_and_keeps_the_window():
    from cluster.student_batches import rating_batch_from_dataset

    table = pa.table({"user": [1, 2, 3], "items": [[4, 5, 6, 7], [8], [9, 10]], "levels": [[1, 2, 3, 4], [5], [2, 2]]})
    batch = rating_batch_from_dataset(table, max_len=2)
    assert batch.inputs.tolist() == [[5, 6, 7], [0, 9, 10]]
    assert batch.targets.tolist() == [[2, 3, 4], [0, 2, 2]]
    assert batch.soft is None


def test_a_distilled_students_source_names_the_labels_it_learns_from():
    """A student of a top-64 store is not finished for a top-128 one (nor another dtype, sampled labels or
    augmentation); the rating task's labels have no k, so precompute.k does not concern its students."""
    from cluster.config import build_config
    from cluster.student_batches import student_source

    def source(*overrides):
        return student_source("teacher-fp", build_config({}, list(overrides)), None)

    base = source()
    assert base.startswith("teacher-fp+") and source() == base
    others = [source("precompute.k=128"), source("precompute.dtype=fp32"), source("precompute.num_sampled=4"),
              source("precompute.augment.ratio=1")]
    assert len({base, *others}) == 5
    assert source("precompute.augment.ratio=1", "distill.augmented=skip") == base  # augmented rows not read
    assert source("run.task=rating", "precompute.k=128") == source("run.task=rating")
