import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from distill.config import ModelConfig
from distill.model import SequentialRecommender
from distill.sequences import next_item_batch
from distill.training import (
    lr_ratio,
    NextItemObjective,
    distributed_ranking_eval,
    epoch_permutation,
    lockstep_batches,
    rank_batches,
    training_sequences,
)
from distill.evaluate import evaluate_split, model_scorer


def test_epoch_permutation_is_a_pure_function_of_seed_and_epoch():
    assert np.array_equal(epoch_permutation(50, 1, 2), epoch_permutation(50, 1, 2))
    assert not np.array_equal(epoch_permutation(50, 1, 2), epoch_permutation(50, 1, 3))
    assert sorted(epoch_permutation(50, 1, 2)) == list(range(50))


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_rank_batches_cover_every_row_once_and_global_batches_do_not_depend_on_world(world):
    n, batch = 103, 16
    per_rank = [rank_batches(n, batch, seed=7, epoch=1, rank=r, world=world) for r in range(world)]
    steps = {len(p) for p in per_rank}
    assert steps == {7}  # same number of steps on every rank
    reference = rank_batches(n, batch, 7, 1, 0, 1)
    for s in range(7):
        global_batch = np.concatenate([per_rank[r][s] for r in range(world)])
        assert sorted(global_batch) == sorted(reference[s])
    everything = np.concatenate([b for p in per_rank for b in p])
    assert sorted(everything) == list(range(n))


@pytest.mark.parametrize("n, world, batch", [(10, 3, 2), (7, 2, 4), (1, 4, 3), (0, 2, 5)])
def test_lockstep_batches_same_count_on_every_rank_and_real_rows_exact(n, world, batch):
    plans = [lockstep_batches(n, batch, r, world) for r in range(world)]
    assert len({len(p) for p in plans}) == 1
    real_rows = [int(i) for p in plans for rows, real in p for i in rows[:real]]
    assert sorted(real_rows) == list(range(n))
    assert all(len(rows) == batch for p in plans for rows, _ in p)


def test_objective_sum_matches_cross_entropy_and_counts_targets():
    torch.manual_seed(0)
    model = SequentialRecommender(ModelConfig(d_model=16, num_layers=1, num_heads=2, ffn_dim=32, max_len=6, dropout=0.0), 20)
    inputs, targets = next_item_batch([[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 12, 13]], 6)
    total, count = NextItemObjective(model)(inputs, targets)
    scores = model.scores(model(inputs))
    keep = targets != 0
    ref = torch.nn.functional.cross_entropy(scores[keep], targets[keep], reduction="sum")
    assert int(count) == int(keep.sum()) == 3 + 1 + 6
    assert float(total.detach()) == pytest.approx(float(ref), rel=1e-5)


def test_sampled_objective_is_finite_and_trains():
    torch.manual_seed(0)
    model = SequentialRecommender(ModelConfig(d_model=16, num_layers=1, num_heads=1, ffn_dim=32, max_len=8, dropout=0.0), 30)
    objective = NextItemObjective(model, "sampled", num_negatives=8)
    seqs = [[i % 30 + 1 for i in range(s, s + 8)] for s in range(30)]
    inputs, targets = next_item_batch(seqs, 8)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    first = None
    for _ in range(60):
        total, count = objective(inputs, targets)
        loss = total / count
        first = float(loss) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss) and float(loss) < first * 0.5


def test_training_sequences_truncates_and_drops_single_items():
    table = pa.table({"user": pa.array([1, 2, 3], pa.int32()), "items": pa.array([[1], [1, 2], list(range(1, 11))], type=pa.list_(pa.int32()))})
    seqs = training_sequences(table, max_len=4)
    assert [s.tolist() for s in seqs] == [[1, 2], [6, 7, 8, 9, 10]]


def test_distributed_eval_without_process_group_equals_plain_eval():
    torch.manual_seed(0)
    model = SequentialRecommender(ModelConfig(d_model=16, num_layers=1, num_heads=2, ffn_dim=32, max_len=5, dropout=0.0), 25)
    model.eval()
    rng = np.random.default_rng(0)
    hist = [rng.integers(1, 26, size=rng.integers(1, 9)).tolist() for _ in range(37)]
    split = pa.table({"history": pa.array(hist, type=pa.list_(pa.int32())), "target": pa.array(rng.integers(1, 26, 37), pa.int32())})
    dist = distributed_ranking_eval(model.score_last, split, 25, [5, 10], 8, rank=0, world=1, device="cpu", max_len=5)
    plain = evaluate_split(model_scorer(model, 5), split, 25, [5, 10], batch_size=100)
    for key in ("hr@5", "ndcg@5", "hr@10", "ndcg@10"):
        assert dist[key] == pytest.approx(plain[key])


def test_a_checkpoint_from_other_settings_is_refused():
    from distill.training import check_checkpoint_stage

    check_checkpoint_stage({"stage_fingerprint": "abc"}, "abc", "ray/student/checkpoint_1")
    check_checkpoint_stage({}, "abc", "ray/student/checkpoint_1")  # made before fingerprints existed
    with pytest.raises(ValueError, match=r"ray/student/checkpoint_1 was made with other training settings"):
        check_checkpoint_stage({"stage_fingerprint": "xyz"}, "abc", "ray/student/checkpoint_1")


# --------------------------------------------------------------------------------------
# Learning-rate schedule


def test_lr_ratio_warmup_then_constant():
    assert [lr_ratio(s, 100, 4, "constant") for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_ratio(0, 100, 0, "constant") == 1.0
    assert lr_ratio(0, 100, 0, "cosine") == 0.0 and lr_ratio(1, 100, 0, "cosine") == 0.5


def test_lr_ratio_cosine_decays_to_zero_and_stays_there():
    ratios = [lr_ratio(s, 20, 5, "cosine") for s in range(25)]
    assert ratios[0] == 0.0 and ratios[5] < 1.0 and ratios[5] == pytest.approx(1.0, abs=0.02)
    assert all(a > b for a, b in zip(ratios[5:19], ratios[6:20]))  # strictly decreasing after warm-up
    assert ratios[19] == pytest.approx(0.0, abs=1e-12) and ratios[24] == ratios[19]  # the last planned step is 0
    assert ratios[12] == pytest.approx((1 + math.cos(math.pi * 8 / 15)) / 2)
    assert [lr_ratio(s, 20, 1, "constant") for s in range(3)] == [0.0, 0.5, 1.0]  # warm-ups last >= 2 steps


@pytest.mark.parametrize("schedule, warmup", [("cosine", 0), ("cosine", 1), ("cosine", 7), ("constant", 1), ("constant", 7)])
def test_lr_ratio_matches_deepspeed_schedulers(schedule, warmup):
    """The students' schedule is the teacher's (DeepSpeed's WarmupCosineLR / WarmupLR, linear warm-up)."""
    from deepspeed.runtime.lr_schedules import WarmupCosineLR, WarmupLR

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    if schedule == "cosine":
        ds = WarmupCosineLR(optimizer, total_num_steps=40, warmup_num_steps=max(warmup, 1), warmup_min_ratio=0.0,
                            cos_min_ratio=0.0, warmup_type="linear")
    else:
        ds = WarmupLR(optimizer, warmup_min_lr=0.0, warmup_max_lr=0.5, warmup_num_steps=warmup, warmup_type="linear")
    for step in range(45):
        ds.step(step)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * lr_ratio(step, 40, warmup, schedule), abs=1e-9), step


def test_lr_ratio_rejects_unknown_schedules():
    with pytest.raises(ValueError, match="unknown lr schedule 'linear'"):
        lr_ratio(0, 10, 0, "linear")


def test_mixed_loss_normalises_each_term_by_its_own_count():
    from distill.training import mixed_loss

    hard, kd = torch.tensor(6.0, requires_grad=True), torch.tensor(10.0, requires_grad=True)
    terms = {"hard": (hard, torch.tensor(3)), "kd": (kd, torch.tensor(5))}  # augmented rows: more KD positions
    loss, local = mixed_loss(terms, 0.25, 1, torch.device("cpu"))
    assert float(loss) == pytest.approx(0.25 * 6 / 3 + 0.75 * 10 / 5) and local == pytest.approx(float(loss))
    loss.backward()
    assert float(hard.grad) == pytest.approx(0.25 / 3) and float(kd.grad) == pytest.approx(0.75 / 5)
    baseline, _ = mixed_loss({"hard": (torch.tensor(6.0), torch.tensor(0))}, 1.0, 1, torch.device("cpu"))
    assert float(baseline) == 6.0  # no position anywhere: the sum (0 in practice) over 1, never a division by 0
