"""Distillation losses against small dense reference implementations."""

import math

import pytest
import torch
import torch.nn.functional as F

from distill.losses import (
    KINDS,
    distillation_loss,
    hard_label_ce,
    jsd_topk,
    kl_sampled,
    kl_topk,
    kl_topk_tail,
    ranking_distillation,
    reverse_kl_topk,
    teacher_bucket_log_probs,
)

MIN32 = torch.finfo(torch.float32).min


# --------------------------------------------------------------------------------------
# Dense references and fixtures


def with_pad(real: torch.Tensor) -> torch.Tensor:
    """(P, C-1) real-item logits -> (P, C) with the padding column as the model fills it."""
    return F.pad(real, (1, 0), value=MIN32)


def soft_labels(teacher: torch.Tensor, k: int) -> dict:
    """What the store keeps, from full (P, C) teacher logits (column 0 = padding)."""
    real = teacher[:, 1:]
    values, cols = real.topk(k, dim=-1)
    return {"topk_ids": cols + 1, "topk_logits": values, "lse": torch.logsumexp(real, dim=-1)}


def dense_kl(teacher: torch.Tensor, student: torch.Tensor, T: float) -> torch.Tensor:
    """Per-row T^2 * KL(p_T || q_T) over the real items."""
    log_p = F.log_softmax(teacher[:, 1:] / T, dim=-1)
    log_q = F.log_softmax(student[:, 1:] / T, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1) * T * T


def dense_ce(teacher: torch.Tensor, student: torch.Tensor, T: float) -> torch.Tensor:
    """Per-row T^2 * H(p_T, q_T) over the real items."""
    p = F.softmax(teacher[:, 1:] / T, dim=-1)
    return -(p * F.log_softmax(student[:, 1:] / T, dim=-1)).sum(-1) * T * T


def dense_buckets(logits: torch.Tensor, ids: torch.Tensor, T: float) -> torch.Tensor:
    """(P, k+1) exact probabilities of the top-k ids and the rest, from full logits."""
    p = F.softmax(logits[:, 1:] / T, dim=-1)
    top = p.gather(1, ids - 1)
    return torch.cat([top, 1 - top.sum(-1, keepdim=True)], dim=1)


def pair(P=6, C=30, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = with_pad(torch.randn(P, C - 1, generator=g) * scale)
    student = with_pad(torch.randn(P, C - 1, generator=g) * scale)
    return teacher, student.requires_grad_(True)


def all_kd(student, soft, T, mask=None):
    """Every KD loss on the same inputs, by kind name."""
    ids, z, lse = soft["topk_ids"], soft["topk_logits"], soft["lse"]
    return {
        "kl_topk": kl_topk(student, ids, z, T, mask=mask),
        "kl_topk_tail": kl_topk_tail(student, ids, z, lse, T, mask=mask),
        "reverse_kl": reverse_kl_topk(student, ids, z, T, mask=mask),
        "jsd": jsd_topk(student, ids, z, lse, T, mask=mask),
        "ranking": ranking_distillation(student, ids, K=min(5, ids.shape[1]), negative_weight=0.5, mask=mask),
    }


def sampled_soft(teacher: torch.Tensor, num_draws: int, generator: torch.Generator) -> dict:
    """One slot per draw (count 1), drawn from the teacher's T=1 softmax."""
    probs = F.softmax(teacher[:, 1:], dim=-1)
    ids = torch.multinomial(probs, num_draws, replacement=True, generator=generator) + 1
    return {
        "sampled_ids": ids,
        "sampled_counts": torch.ones(ids.shape),
        "sampled_logits": teacher.gather(1, ids),
        "lse": torch.logsumexp(teacher[:, 1:], dim=-1),
    }


# --------------------------------------------------------------------------------------
# Top-k divergences


@pytest.mark.parametrize("T", [1.0, 2.0, 0.5])
def test_full_topk_equals_dense_kl(T):
    teacher, student = pair()
    soft = soft_labels(teacher, k=teacher.shape[1] - 1)  # every real item
    ref = dense_kl(teacher, student, T).sum()
    for fn in (
        lambda: kl_topk(student, soft["topk_ids"], soft["topk_logits"], T),
        lambda: kl_topk_tail(student, soft["topk_ids"], soft["topk_logits"], soft["lse"], T),
    ):
        loss, count = fn()
        assert count.item() == teacher.shape[0] and count.dtype == torch.int64
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
        g, = torch.autograd.grad(loss, student)
        g_ref, = torch.autograd.grad(ref, student, retain_graph=True)
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


def test_kl_topk_is_the_renormalised_variant():
    teacher, student = pair()
    soft = soft_labels(teacher, k=7)
    ids = soft["topk_ids"]
    p = F.softmax(teacher.gather(1, ids) / 2.0, dim=-1)
    log_q = F.log_softmax(student.gather(1, ids) / 2.0, dim=-1)
    ref = (p * (p.log() - log_q)).sum() * 4.0
    loss, _ = kl_topk(student, ids, soft["topk_logits"], 2.0)
    torch.testing.assert_close(loss, ref)


def test_kl_topk_tail_equals_dense_bucket_kl_at_T1():
    teacher, student = pair(C=40)
    soft = soft_labels(teacher, k=6)
    p = dense_buckets(teacher, soft["topk_ids"], 1.0)
    q = dense_buckets(student, soft["topk_ids"], 1.0)
    ref = (p * (p.log() - q.log())).sum()
    loss, _ = kl_topk_tail(student, soft["topk_ids"], soft["topk_logits"], soft["lse"], 1.0)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    # The teacher side is exact at T=1: the stored values reproduce the true buckets.
    log_p = teacher_bucket_log_probs(soft["topk_logits"], soft["lse"], 39, 1.0)
    torch.testing.assert_close(log_p.exp(), p, rtol=1e-5, atol=1e-7)


def test_student_tail_is_exact_for_peaked_and_spread_rows_with_finite_gradients():
    # Rows 0-1: the student puts > 99.9% (even all, in fp32) of its mass on the teacher's top-k,
    # where log(1 - top mass) is useless; rows 2-3 are ordinary. Both must match float64.
    C, k = 50, 5
    teacher, student = pair(P=4, C=C, seed=3)
    soft = soft_labels(teacher, k)
    with torch.no_grad():
        for row, gap in ((0, 12.0), (1, 40.0)):
            student[row, soft["topk_ids"][row]] += gap
    for T in (1.0, 2.0):
        loss, _ = kl_topk_tail(student, soft["topk_ids"], soft["topk_logits"], soft["lse"], T)
        (g,) = torch.autograd.grad(loss, student)
        s64 = student.detach().double().requires_grad_(True)
        log_q = F.log_softmax(s64[:, 1:] / T, dim=-1)
        top = log_q.gather(1, soft["topk_ids"] - 1)
        in_top = torch.zeros_like(log_q, dtype=torch.bool).scatter_(1, soft["topk_ids"] - 1, True)
        tail = torch.logsumexp(log_q.masked_fill(in_top, float("-inf")), dim=-1, keepdim=True)
        log_p = teacher_bucket_log_probs(soft["topk_logits"], soft["lse"], C - 1, T).double()
        ref = (log_p.exp() * (log_p - torch.cat([top, tail], dim=1))).sum() * T * T
        (g_ref,) = torch.autograd.grad(ref, s64)
        assert torch.isfinite(g).all()
        torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(g.double(), g_ref, rtol=1e-3, atol=1e-5)


def test_teacher_tail_at_T_not_1_is_exact_for_equal_tail_logits_and_biased_as_documented():
    k, n_items = 5, 30
    g = torch.Generator().manual_seed(1)
    top = torch.sort(torch.randn(4, k, generator=g) + 3.0, descending=True).values
    # Equal tail logits: the approximation is exact at every T.
    flat_tail = with_pad(torch.cat([top, torch.full((4, n_items - k), 0.5)], dim=1))
    soft = soft_labels(flat_tail, k)
    for T in (0.5, 2.0, 4.0):
        got = teacher_bucket_log_probs(soft["topk_logits"], soft["lse"], n_items, T).exp()
        torch.testing.assert_close(got, dense_buckets(flat_tail, soft["topk_ids"], T), rtol=1e-5, atol=1e-6)
    # Spread-out tail: exact at T=1, tail over-estimated for T > 1, under-estimated for T < 1.
    spread = with_pad(torch.cat([top, torch.linspace(-4.0, 1.0, n_items - k).expand(4, -1)], dim=1))
    soft = soft_labels(spread, k)
    tail = lambda T: teacher_bucket_log_probs(soft["topk_logits"], soft["lse"], n_items, T).exp()[:, -1]  # noqa: E731
    exact = lambda T: dense_buckets(spread, soft["topk_ids"], T)[:, -1]  # noqa: E731
    torch.testing.assert_close(tail(1.0), exact(1.0), rtol=1e-5, atol=1e-7)
    assert (tail(2.0) > exact(2.0)).all()
    assert (tail(0.5) < exact(0.5)).all()


def test_teacher_tail_rounding_to_zero_is_safe():
    # fp16-stored logits can make the top-k mass exceed 1 by rounding: tail clamps to 0.
    z = torch.tensor([[5.0, 1.0]])
    lse = torch.logsumexp(z, dim=-1) - 1e-3  # slightly inconsistent store
    log_p = teacher_bucket_log_probs(z, lse, 10, 2.0)
    assert torch.isfinite(log_p[:, :2]).all() and log_p[0, 2] == float("-inf")
    torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(1))
    student = with_pad(torch.randn(1, 10)).requires_grad_(True)
    ids = torch.tensor([[1, 2]])
    for fn in (kl_topk_tail, jsd_topk):
        loss, _ = fn(student, ids, z, lse, 2.0)
        g, = torch.autograd.grad(loss, student)
        assert torch.isfinite(loss) and torch.isfinite(g).all()


def test_equal_logits_give_zero():
    teacher, _ = pair(C=25)
    # Equal tail logits so that the T != 1 tail approximation is exact (see above).
    real = teacher[:, 1:].abs()  # the top 8 are then the first 8 columns (all > -1)
    real[:, 8:] = -1.0
    teacher = with_pad(real)
    soft = soft_labels(teacher, k=8)
    for T in (1.0, 2.0):
        student = teacher.clone().requires_grad_(True)
        losses = all_kd(student, soft, T)
        for name in ("kl_topk", "kl_topk_tail", "reverse_kl", "jsd"):
            loss, _ = losses[name]
            assert abs(loss.item()) < 1e-5, (name, T, loss.item())
            g, = torch.autograd.grad(loss, student)
            assert g.abs().max() < 1e-5, (name, T)


def test_kl_topk_tail_equal_logits_zero_at_T1_for_any_tail():
    teacher, _ = pair(C=25)
    soft = soft_labels(teacher, k=4)
    loss, _ = kl_topk_tail(teacher.clone(), soft["topk_ids"], soft["topk_logits"], soft["lse"], 1.0)
    assert abs(loss.item()) < 1e-5


def test_reverse_kl_matches_reference():
    teacher, student = pair()
    soft = soft_labels(teacher, k=9)
    ids, T = soft["topk_ids"], 1.5
    log_p = F.log_softmax(teacher.gather(1, ids) / T, dim=-1)
    log_q = F.log_softmax(student.gather(1, ids) / T, dim=-1)
    ref = (log_q.exp() * (log_q - log_p)).sum() * T * T
    loss, _ = reverse_kl_topk(student, ids, soft["topk_logits"], T)
    torch.testing.assert_close(loss, ref)


def test_jsd_matches_reference_is_symmetric_and_bounded():
    teacher, student = pair(scale=2.0)
    C = teacher.shape[1]
    # Reference on the (k+1) buckets at T=1.
    soft = soft_labels(teacher, k=5)
    p = dense_buckets(teacher, soft["topk_ids"], 1.0)
    q = dense_buckets(student, soft["topk_ids"], 1.0)
    m = (p + q) / 2
    ref = (0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)).sum()
    loss, _ = jsd_topk(student, soft["topk_ids"], soft["topk_logits"], soft["lse"], 1.0)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    # Symmetric when the buckets are the same for both (k = C - 1: every item its own bucket).
    with torch.no_grad():
        s_as_teacher = soft_labels(student, C - 1)
        # Same top-k ids for both directions: order one by the other's ids.
        ids = soft_labels(teacher, C - 1)["topk_ids"]
        ab, _ = jsd_topk(student, ids, teacher.gather(1, ids), torch.logsumexp(teacher[:, 1:], -1), 2.0)
        ba, _ = jsd_topk(teacher, ids, student.gather(1, ids), s_as_teacher["lse"], 2.0)
    torch.testing.assert_close(ab, ba, rtol=1e-5, atol=1e-6)
    # Bounded by log 2 * T^2 per position, even for nearly disjoint distributions.
    far_t = with_pad(torch.tensor([[50.0, -50.0, -50.0, -50.0]]))
    far_s = with_pad(torch.tensor([[-50.0, 50.0, -50.0, -50.0]]))
    s_far = soft_labels(far_t, 1)
    for T in (1.0, 3.0):
        loss, _ = jsd_topk(far_s, s_far["topk_ids"], s_far["topk_logits"], s_far["lse"], T)
        assert 0 <= loss.item() <= math.log(2) * T * T + 1e-5
    loss, _ = jsd_topk(far_s, s_far["topk_ids"], s_far["topk_logits"], s_far["lse"], 1.0)
    assert loss.item() > 0.99 * math.log(2)


# --------------------------------------------------------------------------------------
# Masking, dtypes, gradients


def test_fully_masked_batch_is_exactly_zero_with_zero_gradient():
    teacher, student = pair(P=4)
    soft = soft_labels(teacher, k=5)
    # Masked rows may hold garbage: ids 0 and NaN logits must not leak in.
    soft["topk_ids"][0] = 0
    soft["topk_logits"][1] = float("nan")
    mask = torch.zeros(4, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    samp = sampled_soft(teacher, 5, g)
    results = dict(all_kd(student, soft, 2.0, mask=mask))
    results["kl_sampled"] = kl_sampled(
        student, samp["sampled_ids"], samp["sampled_counts"], samp["sampled_logits"], samp["lse"], 2.0, mask=mask
    )
    for name, (loss, count) in results.items():
        assert loss.item() == 0.0 and count.item() == 0, name
        g, = torch.autograd.grad(loss, student)
        assert torch.isfinite(g).all() and torch.count_nonzero(g) == 0, name
    targets = torch.zeros(4, dtype=torch.long)
    full = {**soft, **samp}
    for kind in KINDS:
        loss, count, _ = distillation_loss(kind, 0.5, 2.0, student, targets, full)
        assert loss.item() == 0.0 and count.item() == 0
        g, = torch.autograd.grad(loss, student)
        assert torch.count_nonzero(g) == 0


def test_mask_drops_rows():
    teacher, student = pair(P=6)
    soft = soft_labels(teacher, k=5)
    mask = torch.tensor([True, False, True, True, False, True])
    for name, (loss, count) in all_kd(student, soft, 2.0, mask=mask).items():
        sub = {key: v[mask] for key, v in soft.items()}
        ref, ref_count = all_kd(student[mask], sub, 2.0)[name]
        torch.testing.assert_close(loss, ref)
        assert count.item() == ref_count.item() == 4


def test_gradients_finite_for_extreme_and_low_precision_logits():
    g = torch.Generator().manual_seed(3)
    teacher = with_pad(torch.randn(5, 49, generator=g) * 40)
    soft = soft_labels(teacher, k=10)
    soft["topk_logits"] = soft["topk_logits"].half()  # as the store may keep them
    samp = sampled_soft(teacher, 16, g)
    for dtype in (torch.float32, torch.bfloat16):
        student = with_pad(torch.randn(5, 49, generator=g) * 40).to(dtype).requires_grad_(True)
        results = dict(all_kd(student, soft, 0.5))
        results["kl_sampled"] = kl_sampled(
            student, samp["sampled_ids"], samp["sampled_counts"], samp["sampled_logits"], samp["lse"], 3.0
        )
        for name, (loss, _) in results.items():
            assert loss.dtype == torch.float32, name
            grad, = torch.autograd.grad(loss, student)
            assert torch.isfinite(loss) and torch.isfinite(grad).all(), name
            assert grad[:, 0].abs().max() == 0, name  # the padding column never gets a gradient


def test_bad_shapes_and_arguments_raise():
    teacher, student = pair(C=10)
    soft = soft_labels(teacher, k=3)
    with pytest.raises(ValueError):
        kl_topk(student, soft["topk_ids"], soft["topk_logits"], 0.0)
    with pytest.raises(ValueError):
        kl_topk(student[:2], soft["topk_ids"], soft["topk_logits"])
    with pytest.raises(ValueError):
        ranking_distillation(student, soft["topk_ids"], K=4)
    big = torch.arange(1, 11).expand(student.shape[0], -1)
    with pytest.raises(ValueError):  # k larger than the number of real items
        kl_topk(student, big, big.float())


# --------------------------------------------------------------------------------------
# Sampled KD


def test_kl_sampled_unbiased_at_T1_value_and_gradient():
    C, reps, draws = 50, 20000, 8
    g = torch.Generator().manual_seed(0)
    teacher1 = with_pad(torch.randn(1, C - 1, generator=g) * 2)
    student1 = with_pad(torch.randn(1, C - 1, generator=g) * 2)
    teacher = teacher1.expand(reps, -1)
    student = student1.expand(reps, -1).clone().requires_grad_(True)
    samp = sampled_soft(teacher, draws, g)
    loss, count = kl_sampled(student, samp["sampled_ids"], samp["sampled_counts"], samp["sampled_logits"], samp["lse"], 1.0)
    estimate = loss / count
    ref = dense_ce(teacher1, student1, 1.0)[0]
    assert abs(estimate.item() - ref.item()) < 0.02 * ref.item()
    grad, = torch.autograd.grad(loss, student)
    s_ref = student1.clone().requires_grad_(True)
    g_ref, = torch.autograd.grad(dense_ce(teacher1, s_ref, 1.0).sum(), s_ref)
    torch.testing.assert_close(grad.mean(0), g_ref[0], rtol=0, atol=3e-3)
    # Its gradient is that of the KL: the teacher entropy is constant in the student.
    g_kl, = torch.autograd.grad(dense_kl(teacher1, s_ref, 1.0).sum(), s_ref)
    torch.testing.assert_close(g_ref, g_kl, rtol=1e-4, atol=1e-6)


def test_kl_sampled_consistent_at_T2_with_unique_ids_and_counts():
    C, draws, T = 50, 200_000, 2.0
    g = torch.Generator().manual_seed(1)
    teacher = with_pad(torch.randn(2, C - 1, generator=g) * 2)
    student = with_pad(torch.randn(2, C - 1, generator=g) * 2)
    probs = F.softmax(teacher[:, 1:], dim=-1)
    drawn = torch.multinomial(probs, draws, replacement=True, generator=g)
    counts = torch.stack([torch.bincount(row, minlength=C - 1) for row in drawn]).float()  # (2, C-1)
    ids = torch.arange(1, C).expand(2, -1).clone()
    ids[counts == 0] = 0  # never-drawn ids become unused slots
    logits = teacher[:, 1:].clone()
    loss, _ = kl_sampled(student, ids, counts, logits, None, T)
    ref = dense_ce(teacher, student, T).sum()
    assert abs(loss.item() - ref.item()) < 0.01 * ref.item()


def test_kl_sampled_slot_layouts_agree_and_unused_slots_are_ignored():
    g = torch.Generator().manual_seed(2)
    teacher, student = pair(P=3, C=12, seed=2)
    samp = sampled_soft(teacher, 6, g)
    ids, z = samp["sampled_ids"], samp["sampled_logits"]
    for T in (1.0, 2.0):
        per_draw, _ = kl_sampled(student, ids, samp["sampled_counts"], z, None, T)
        # The same draws as unique ids with counts, padded with garbage unused slots.
        rows_ids, rows_counts, rows_z = [], [], []
        for r in range(3):
            uniq, cnt = ids[r].unique(return_counts=True)
            pad = 8 - len(uniq)
            rows_ids.append(torch.cat([uniq, torch.zeros(pad, dtype=torch.long)]))
            rows_counts.append(torch.cat([cnt.float(), torch.zeros(pad)]))
            rows_z.append(torch.cat([teacher[r, uniq], torch.full((pad,), float("nan"))]))
        compact, _ = kl_sampled(student, torch.stack(rows_ids), torch.stack(rows_counts), torch.stack(rows_z), None, T)
        torch.testing.assert_close(compact, per_draw)
    # A kept row without any draw contributes 0 and no NaN.
    empty = torch.zeros(3, 4, dtype=torch.long)
    loss, count = kl_sampled(student, empty, torch.zeros(3, 4), torch.zeros(3, 4), None, 2.0)
    grad, = torch.autograd.grad(loss, student)
    assert loss.item() == 0.0 and count.item() == 3 and torch.count_nonzero(grad) == 0


# --------------------------------------------------------------------------------------
# Ranking distillation


def test_ranking_distillation_value_and_monotonicity():
    teacher, student = pair(P=4, C=20)
    ids = soft_labels(teacher, k=8)["topk_ids"]
    K, lam = 5, 2.0
    w = torch.exp(-torch.arange(1, K + 1) / lam)
    w = w / w.sum()
    ref = -(F.logsigmoid(student.gather(1, ids[:, :K])) * w).sum()
    loss, _ = ranking_distillation(student, ids, K=K, lambda_=lam)
    torch.testing.assert_close(loss, ref)
    # Raising the student's scores of the teacher's top items lowers the loss.
    raised = student.detach().scatter_add(1, ids[:, :K], torch.ones(4, K))
    loss_raised, _ = ranking_distillation(raised, ids, K=K, lambda_=lam)
    assert loss_raised < loss
    # Optional negative term: mean over the real non-top-K items.
    with_neg, _ = ranking_distillation(student, ids, K=K, lambda_=lam, negative_weight=0.5)
    real = student[:, 1:]
    outside = torch.ones_like(real, dtype=torch.bool).scatter(1, ids[:, :K] - 1, False)
    neg = torch.stack([-F.logsigmoid(-real[r][outside[r]]).mean() for r in range(4)]).sum()
    torch.testing.assert_close(with_neg, ref + 0.5 * neg)


# --------------------------------------------------------------------------------------
# Hard labels and the mix


def test_hard_label_ce_matches_torch():
    teacher, student = pair(P=8)
    targets = torch.randint(1, teacher.shape[1], (8,))
    targets[[1, 4]] = 0
    loss, count = hard_label_ce(student, targets)
    ref = F.cross_entropy(student, targets, ignore_index=0, reduction="sum")
    torch.testing.assert_close(loss, ref)
    assert count.item() == 6


def _batch(P=8, C=30, k=6, seed=0):
    teacher, student = pair(P=P, C=C, seed=seed)
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(1, C, (P,), generator=g)
    targets[[0, 3]] = 0
    soft = {**soft_labels(teacher, k), **sampled_soft(teacher, 10, g)}
    return student, targets, soft


def test_alpha_one_is_hard_ce_and_never_reads_soft():
    student, targets, _ = _batch()
    ref, ref_count = hard_label_ce(student, targets)
    for soft in (None, {}):
        for kind in KINDS:
            loss, count, parts = distillation_loss(kind, 1.0, 2.0, student, targets, soft)
            assert loss.item() == ref.item() and count.item() == ref_count.item()
            assert set(parts) == {"hard"}


def test_alpha_zero_is_kd_and_mixing_is_linear():
    student, targets, soft = _batch()
    keep = targets != 0
    sub = {name: v[keep] for name, v in soft.items()}
    s = student[keep]
    T = 2.0
    direct = {
        "kl_topk": kl_topk(s, sub["topk_ids"], sub["topk_logits"], T)[0],
        "kl_topk_tail": kl_topk_tail(s, sub["topk_ids"], sub["topk_logits"], sub["lse"], T)[0],
        "kl_sampled": kl_sampled(s, sub["sampled_ids"], sub["sampled_counts"], sub["sampled_logits"], sub["lse"], T)[0],
        "reverse_kl": reverse_kl_topk(s, sub["topk_ids"], sub["topk_logits"], T)[0],
        "jsd": jsd_topk(s, sub["topk_ids"], sub["topk_logits"], sub["lse"], T)[0],
        "ranking": ranking_distillation(s, sub["topk_ids"], K=6)[0],
    }
    hard, _ = hard_label_ce(student, targets)
    for kind in KINDS:
        kd, count, parts = distillation_loss(kind, 0.0, T, student, targets, soft)
        torch.testing.assert_close(kd, direct[kind])
        assert set(parts) == {"kd"} and count.item() == int(keep.sum())
        for alpha in (0.25, 0.5, 0.9):
            mixed, _, parts = distillation_loss(kind, alpha, T, student, targets, soft)
            torch.testing.assert_close(mixed, alpha * hard + (1 - alpha) * kd)
            torch.testing.assert_close(parts["hard"], hard.detach())
            torch.testing.assert_close(parts["kd"], kd.detach())
            grad, = torch.autograd.grad(mixed, student)
            assert torch.isfinite(grad).all()


def test_ranking_options_pass_through():
    student, targets, soft = _batch()
    a, _, _ = distillation_loss("ranking", 0.0, 1.0, student, targets, soft, K=3, lambda_=5.0)
    keep = targets != 0
    ref, _ = ranking_distillation(student[keep], soft["topk_ids"][keep], K=3, lambda_=5.0)
    torch.testing.assert_close(a, ref)


def test_unknown_kind_and_missing_soft_labels():
    student, targets, soft = _batch()
    with pytest.raises(ValueError, match="kl_topk_tail"):
        distillation_loss("kl_dense", 0.5, 2.0, student, targets, soft)
    with pytest.raises(ValueError, match="kl_topk_tail"):  # even when alpha = 1
        distillation_loss("kl_dense", 1.0, 2.0, student, targets, None)
    with pytest.raises(ValueError, match="lse"):
        distillation_loss("jsd", 0.5, 2.0, student, targets, {"topk_ids": soft["topk_ids"], "topk_logits": soft["topk_logits"]})
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss("jsd", 1.5, 2.0, student, targets, soft)


def test_kinds_match_the_config_schema():
    from typing import get_args

    from distill.config import DistillConfig

    assert set(get_args(DistillConfig.model_fields["loss"].annotation)) == set(KINDS)
