"""Distillation losses against small dense reference implementations: the shared references,
properties every KD term must have (masking, dtypes, gradients), the hard-label term and the
dispatcher of :mod:`distill.losses`.

The dense references and fixtures here are also imported by ``test_losses_topk.py`` and
``test_losses_alt.py`` (the tests of :mod:`distill.losses_topk` and :mod:`distill.losses_alt`).
"""

import pytest
import torch
import torch.nn.functional as F

from distill.losses import (
    KINDS,
    distillation_loss,
    distillation_terms,
    dkd_topk_tail,
    hard_label_ce,
    jsd_topk,
    kl_sampled,
    kl_topk,
    kl_topk_tail,
    kl_topk_tail_bands,
    ranking_distillation,
    reverse_kl_topk,
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


def kd_options(kind: str, student: torch.Tensor) -> dict:
    """The options a kind cannot do without: kl_bands needs every item's band (three bands, by id)."""
    return {"item_band": torch.arange(student.shape[1]) % 3} if kind == "kl_bands" else {}


def all_kd(student, soft, T, mask=None):
    """Every KD loss on the same inputs, by kind name."""
    ids, z, lse = soft["topk_ids"], soft["topk_logits"], soft["lse"]
    return {
        "kl_bands": kl_topk_tail_bands(student, ids, z, lse, T, mask=mask, **kd_options("kl_bands", student)),
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
# Properties of every KD term: zero at equality, masking, dtypes, gradients, arguments


def test_equal_logits_give_zero():
    teacher, _ = pair(C=25)
    # Equal tail logits so that the T != 1 tail approximation is exact (see test_losses_topk.py).
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
        loss, count, _ = distillation_loss(kind, 0.5, 2.0, student, targets, full, **kd_options(kind, student))
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
        "dkd": dkd_topk_tail(s, sub["topk_ids"], sub["topk_logits"], sub["lse"], targets[keep], T)[0],
        "kl_bands": kl_topk_tail_bands(s, sub["topk_ids"], sub["topk_logits"], sub["lse"], T, **kd_options("kl_bands", s))[0],
    }
    hard, _ = hard_label_ce(student, targets)
    for kind in KINDS:
        kd, count, parts = distillation_loss(kind, 0.0, T, student, targets, soft, **kd_options(kind, student))
        torch.testing.assert_close(kd, direct[kind])
        assert set(parts) == {"kd"} and count.item() == int(keep.sum())
        for alpha in (0.25, 0.5, 0.9):
            mixed, _, parts = distillation_loss(kind, alpha, T, student, targets, soft, **kd_options(kind, student))
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


def test_augmented_positions_never_reach_the_hard_label_term():
    """Teacher-labelled augmented positions: KD only. Their targets are given real ids here on purpose
    (the store writes 0): the hard term must ignore them anyway, and its gradient there must be 0."""
    student, targets, soft = _batch(P=10)
    augmented = torch.zeros(10, dtype=torch.bool)
    augmented[[0, 1, 6, 7]] = True  # 0 holds target 0 (as the store writes); 1, 6, 7 hold ids
    assert (targets[[1, 6, 7]] != 0).all()
    real = ~augmented & (targets != 0)
    kd_rows = augmented | (targets != 0)
    for kind in KINDS:
        terms = distillation_terms(kind, 0.5, 2.0, student, targets, soft, augmented, **kd_options(kind, student))
        hard, hard_count = hard_label_ce(student[real], targets[real])
        torch.testing.assert_close(terms["hard"][0], hard)
        assert int(terms["hard"][1]) == int(real.sum()) == 5  # position 3: no target, not augmented
        if kind == "dkd":  # the true next item matters to DKD: none on augmented positions
            kd_ref, _ = dkd_topk_tail(student[kd_rows], soft["topk_ids"][kd_rows], soft["topk_logits"][kd_rows],
                                      soft["lse"][kd_rows], targets.masked_fill(augmented, 0)[kd_rows], 2.0)
        else:
            kd_ref, _, _ = distillation_loss(kind, 0.0, 2.0, student[kd_rows], torch.ones(int(kd_rows.sum()), dtype=torch.long),
                                          {n: t[kd_rows] for n, t in soft.items()}, **kd_options(kind, student))
        torch.testing.assert_close(terms["kd"][0], kd_ref)
        assert int(terms["kd"][1]) == int(kd_rows.sum()) == 9
        grad, = torch.autograd.grad(terms["hard"][0], student)
        assert (grad[augmented] == 0).all() and (grad[real].abs().sum(1) > 0).all(), kind
    # Without augmented positions, the terms are distillation_loss's, position for position.
    terms = distillation_terms("kl_topk_tail", 0.3, 1.0, student, targets, soft)
    mixed, _, _ = distillation_loss("kl_topk_tail", 0.3, 1.0, student, targets, soft)
    torch.testing.assert_close(0.3 * terms["hard"][0] + 0.7 * terms["kd"][0], mixed)
    with pytest.raises(ValueError, match="augmented must be"):
        distillation_terms("kl_topk", 0.5, 1.0, student, targets, soft, augmented[:3])


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
