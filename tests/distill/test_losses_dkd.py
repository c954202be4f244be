"""Decoupled KD against a dense reference on the full catalog."""

import pytest
import torch
import torch.nn.functional as F

from distill.losses import KINDS, distillation_loss, distillation_terms, dkd_topk_tail, kl_topk_tail
from test_losses import soft_labels, with_pad


def dense_dkd(teacher, student, targets, T, a, b, topk_ids):
    """Per-row T^2 (a TCKD + b NCKD) from full (P, C) logits (column 0 = padding), over the classes the
    store can tell apart: each top-k id, the target when outside them, and the rest of the catalog."""
    p, q = F.softmax(teacher[:, 1:] / T, -1), F.softmax(student[:, 1:] / T, -1)
    out = []
    for r in range(p.shape[0]):
        top, t = topk_ids[r].tolist(), int(targets[r])
        groups = [[i] for i in top] + ([[t]] if t not in top else [])
        rest = [i for i in range(1, p.shape[1] + 1) if i not in top and i != t]
        groups += [rest] if rest else []
        pg = torch.stack([p[r, [i - 1 for i in g]].sum() for g in groups])
        qg = torch.stack([q[r, [i - 1 for i in g]].sum() for g in groups])
        j = next(n for n, g in enumerate(groups) if g == [t])
        pt, qt = pg[j], qg[j]
        tckd = pt * torch.log(pt / qt) + (1 - pt) * torch.log((1 - pt) / (1 - qt))
        others = torch.ones(len(groups), dtype=torch.bool)
        others[j] = False
        pn, qn = pg[others] / (1 - pt), qg[others] / (1 - qt)
        nckd = (pn * torch.log(pn / qn)).sum()
        out.append((a * tckd + b * nckd) * T * T)
    return torch.stack(out)


def teacher_with_flat_tail(P, C, k, seed):
    """Teacher logits whose items outside the top-k are all equal: the equal-tail assumption is then exact."""
    g = torch.Generator().manual_seed(seed)
    real = torch.full((P, C - 1), -1.0)
    top = torch.randn(P, k, generator=g) * 2 + 3
    cols = torch.stack([torch.randperm(C - 1, generator=g)[:k] for _ in range(P)])
    real.scatter_(1, cols, top)
    return with_pad(real)


@pytest.mark.parametrize("k", [5, 29])  # 29 = the whole catalog (no tail)
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_dkd_equals_the_dense_reference_with_targets_inside_and_outside_the_top_k(k, T):
    P, C = 8, 30
    teacher = teacher_with_flat_tail(P, C, k, seed=k)
    g = torch.Generator().manual_seed(1)
    student = with_pad(torch.randn(P, C - 1, generator=g) * 2).requires_grad_(True)
    soft = soft_labels(teacher, k)
    targets = torch.randint(1, C, (P,), generator=g)
    targets[0] = soft["topk_ids"][0, 0]  # one target inside the top-k for sure
    if k < C - 1:
        outside = [i for i in range(1, C) if i not in soft["topk_ids"][1].tolist()]
        targets[1] = outside[0]  # and one outside it
    loss, count = dkd_topk_tail(student, soft["topk_ids"], soft["topk_logits"], soft["lse"], targets, T,
                                target_weight=1.5, nontarget_weight=4.0)
    ref = dense_dkd(teacher, student, targets, T, 1.5, 4.0, soft["topk_ids"]).sum()
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-5)
    assert int(count) == P
    g_ours, = torch.autograd.grad(loss, student)
    g_ref, = torch.autograd.grad(ref, student)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-3, atol=1e-5)


def test_dkd_at_one_one_weights_plus_its_coupling_is_kl_and_no_target_rows_are_plain_kl():
    # Without a target (augmented rows) DKD is b * KL over the buckets.
    P, C, k = 6, 30, 5
    teacher = teacher_with_flat_tail(P, C, k, seed=3)
    student = with_pad(torch.randn(P, C - 1, generator=torch.Generator().manual_seed(4)))
    soft = soft_labels(teacher, k)
    none = torch.zeros(P, dtype=torch.long)
    dkd, _ = dkd_topk_tail(student, soft["topk_ids"], soft["topk_logits"], soft["lse"], none, 1.0, nontarget_weight=3.0)
    kl, _ = kl_topk_tail(student, soft["topk_ids"], soft["topk_logits"], soft["lse"], 1.0)
    torch.testing.assert_close(dkd, 3.0 * kl)


def test_dkd_through_the_dispatcher_and_augmented_positions():
    assert "dkd" in KINDS
    P, C, k = 6, 30, 5
    teacher = teacher_with_flat_tail(P, C, k, seed=5)
    student = with_pad(torch.randn(P, C - 1, generator=torch.Generator().manual_seed(6))).requires_grad_(True)
    soft = soft_labels(teacher, k)
    targets = torch.randint(1, C, (P,), generator=torch.Generator().manual_seed(7))
    kd, _, _ = distillation_loss("dkd", 0.0, 1.0, student, targets, soft, target_weight=1.0, nontarget_weight=8.0)
    torch.testing.assert_close(kd, dense_dkd(teacher, student, targets, 1.0, 1.0, 8.0, soft["topk_ids"]).sum(), rtol=1e-4, atol=1e-5)
    # An augmented position has no target for DKD either, whatever its targets column holds.
    augmented = torch.tensor([False, False, False, True, True, True])
    terms = distillation_terms("dkd", 0.5, 1.0, student, targets, soft, augmented)
    real, _ = dkd_topk_tail(student[:3], soft["topk_ids"][:3], soft["topk_logits"][:3], soft["lse"][:3], targets[:3])
    aug, _ = dkd_topk_tail(student[3:], soft["topk_ids"][3:], soft["topk_logits"][3:], soft["lse"][3:], torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(terms["kd"][0], real + aug)


def test_dkd_gradients_stay_finite_for_confident_students_and_one_item_tails():
    """Regression: a student surer of an in-top-k target than of the whole tail, one all but certain,
    a tail of one item with the target in it, and rows without a target never give NaN."""
    C = 30
    cases = []
    for k, boost in ((5, 4.0), (29, 40.0), (28, 0.0)):
        P = 4
        teacher = teacher_with_flat_tail(P, C, k, seed=11 + k)
        soft = soft_labels(teacher, k)
        real = torch.randn(P, C - 1, generator=torch.Generator().manual_seed(k))
        targets = soft["topk_ids"][:, 0].clone()
        if k == 28:  # the one item outside the top-k is the target
            targets[:2] = torch.tensor([[i for i in range(1, C) if i not in row] for row in soft["topk_ids"][:2].tolist()]).squeeze(1)
        real.scatter_add_(1, (targets - 1)[:, None], torch.full((P, 1), boost))
        targets[-1] = 0  # and a row without a target
        cases.append((k, with_pad(real).requires_grad_(True), soft, targets))
    for k, student, soft, targets in cases:
        loss, _ = dkd_topk_tail(student, soft["topk_ids"], soft["topk_logits"], soft["lse"], targets, 1.0)
        grad, = torch.autograd.grad(loss, student)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), k
    # Where it is finite the math is unchanged: the reference still holds for the k=28 (one-item tail) case.
    k, student, soft, targets = cases[2]
    teacher = teacher_with_flat_tail(4, C, k, seed=11 + k)
    loss, _ = dkd_topk_tail(student[:3], soft["topk_ids"][:3], soft["topk_logits"][:3], soft["lse"][:3], targets[:3], 1.0)
    torch.testing.assert_close(loss, dense_dkd(teacher[:3], student[:3], targets[:3], 1.0, 1.0, 8.0, soft["topk_ids"][:3]).sum(),
                               rtol=1e-3, atol=1e-4)
