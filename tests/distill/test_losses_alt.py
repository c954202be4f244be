"""Reverse KL, JSD, sampled KL and ranking distillation (:mod:`distill.losses_alt`) against dense references."""

import math

import torch
import torch.nn.functional as F

from distill.losses_alt import jsd_topk, kl_sampled, ranking_distillation, reverse_kl_topk

from test_losses import dense_buckets, dense_ce, dense_kl, pair, sampled_soft, soft_labels, with_pad


# --------------------------------------------------------------------------------------
# Reverse KL and JSD on the top-k


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
