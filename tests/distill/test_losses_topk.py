"""Forward KL on the top-k (:mod:`distill.losses_topk`) against dense references."""

import pytest
import torch
import torch.nn.functional as F

from distill.losses_alt import jsd_topk
from distill.losses import hard_label_ce
from distill.losses_topk import kl_topk, kl_topk_tail, real_item_logsumexp, select_rows, teacher_bucket_log_probs

from test_losses import dense_buckets, dense_kl, pair, soft_labels, with_pad


# --------------------------------------------------------------------------------------
# Forward KL on the top-k, with and without a tail bucket


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


def test_kl_topk_tail_equal_logits_zero_at_T1_for_any_tail():
    teacher, _ = pair(C=25)
    soft = soft_labels(teacher, k=4)
    loss, _ = kl_topk_tail(teacher.clone(), soft["topk_ids"], soft["topk_logits"], soft["lse"], 1.0)
    assert abs(loss.item()) < 1e-5


# --------------------------------------------------------------------------------------
# The step's fast paths: no row selection when every row is kept, no slice of the logits


def test_real_item_logsumexp_ignores_column_zero_and_has_the_true_gradient():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 9, generator=g, dtype=torch.float64, requires_grad=True)
    out = real_item_logsumexp(s)
    torch.testing.assert_close(out, torch.logsumexp(s[:, 1:], dim=-1, keepdim=True))
    assert torch.autograd.gradcheck(real_item_logsumexp, (s,))
    grad, = torch.autograd.grad(out.sum(), s)
    assert (grad[:, 0] == 0).all()
    loud = s.detach().clone()
    loud[:, 0] = 1e4  # column 0 (padding) may hold anything
    torch.testing.assert_close(real_item_logsumexp(loud), out.detach())


def test_hard_label_ce_gradient_is_torchs_over_the_real_items():
    g = torch.Generator().manual_seed(1)
    student = torch.randn(10, 12, generator=g, requires_grad=True)
    targets = torch.randint(1, 12, (10,), generator=g)
    targets[3] = 0
    with torch.no_grad():
        student[:, 0] = 50.0  # a loud padding column changes nothing
    loss, count = hard_label_ce(student, targets)
    keep = targets != 0
    ref = F.cross_entropy(student[keep][:, 1:], targets[keep] - 1, reduction="sum")
    torch.testing.assert_close(loss, ref)
    grad, = torch.autograd.grad(loss, student)
    ref_grad, = torch.autograd.grad(ref, student)
    torch.testing.assert_close(grad, ref_grad)
    assert count.item() == 9 and (grad[:, 0] == 0).all() and (grad[3] == 0).all()


def test_select_rows_passes_the_tensor_through_when_every_row_is_kept():
    t = torch.arange(12.0).view(4, 3)
    assert select_rows(t, torch.ones(4, dtype=torch.bool)) is t
    torch.testing.assert_close(select_rows(t, torch.tensor([True, False, True, False])), t[[0, 2]])


def test_a_padding_id_in_the_top_k_is_refused():
    teacher, student = pair()
    soft = soft_labels(teacher, k=4)
    soft["topk_ids"][2, 1] = 0
    with pytest.raises(ValueError, match="real item ids"):
        kl_topk_tail(student, soft["topk_ids"], soft["topk_logits"], soft["lse"], 1.0)
