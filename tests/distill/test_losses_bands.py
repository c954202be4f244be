"""Plain KD plus KD within popularity bands, against a naive per-row, per-band reference."""

import math

import pytest
import torch

from distill.losses import distillation_loss, kl_topk_tail, kl_topk_tail_bands
from test_losses import soft_labels, with_pad


def naive_band_kl(teacher, student, topk_ids, item_band, T):
    """Per row: sum over bands of KL between the teacher's and the student's softmax over the row's top-k items
    of that band, each renormalised within the band (plain Python over rows, bands and items)."""
    out = []
    for r in range(teacher.shape[0]):
        total = 0.0
        for b in sorted(set(item_band[1:].tolist())):
            items = [i for i in topk_ids[r].tolist() if int(item_band[i]) == b]
            if not items:
                continue
            zp = [float(teacher[r, i]) / T for i in items]
            zq = [float(student[r, i]) / T for i in items]
            lp = [z - math.log(sum(math.exp(v) for v in zp)) for z in zp]
            lq = [z - math.log(sum(math.exp(v) for v in zq)) for z in zq]
            total += sum(math.exp(a) * (a - c) for a, c in zip(lp, lq))
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


def _case(P=6, C=30, k=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = with_pad(torch.randn(P, C - 1, generator=g) * 2)
    student = with_pad(torch.randn(P, C - 1, generator=g) * 2)
    item_band = torch.randint(0, 3, (C,), generator=g)
    item_band[0] = -1
    return teacher, student, item_band, soft_labels(teacher, k)


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("weight", [0.5, 2.0])
def test_kl_bands_is_plain_kd_plus_the_weighted_within_band_kl(T, weight):
    teacher, student, item_band, soft = _case()
    got, count = kl_topk_tail_bands(student, soft["topk_ids"], soft["topk_logits"], soft["lse"], T,
                                    item_band=item_band, band_weight=weight)
    given, _ = kl_topk_tail_bands(student, soft["topk_ids"], soft["topk_logits"], soft["lse"], T,
                                  item_band=item_band, band_weight=weight, num_bands=3)
    assert given.item() == got.item()
    plain, _ = kl_topk_tail(student, soft["topk_ids"], soft["topk_logits"], soft["lse"], T)
    bands = naive_band_kl(teacher, student, soft["topk_ids"], item_band, T).sum() * T * T
    assert count == teacher.shape[0]
    assert got.item() == pytest.approx(plain.item() + weight * bands.item(), rel=1e-5, abs=1e-6)
    assert bands.item() > 0.01  # the band term is really there


def test_weight_zero_and_one_band_per_item_are_plain_kd():
    teacher, student, item_band, soft = _case(seed=1)
    plain, _ = kl_topk_tail(student, soft["topk_ids"], soft["topk_logits"], soft["lse"], 1.0)
    off, _ = kl_topk_tail_bands(student, soft["topk_ids"], soft["topk_logits"], soft["lse"], item_band=item_band, band_weight=0.0)
    alone = torch.arange(teacher.shape[1])  # every item its own band: each within-band KL is over one item, 0
    single, _ = kl_topk_tail_bands(student, soft["topk_ids"], soft["topk_logits"], soft["lse"], item_band=alone)
    assert off.item() == pytest.approx(plain.item(), rel=1e-6) and single.item() == pytest.approx(plain.item(), rel=1e-5)


def test_a_student_with_the_teachers_order_inside_each_band_adds_nothing():
    """Inside a band only the ratios matter: a student equal to the teacher plus a constant per band has
    within-band KL 0, whatever it does between bands."""
    teacher, _, item_band, soft = _case(seed=2)
    shift = torch.tensor([0.0, 3.0, -2.0])
    student = teacher + torch.where(item_band >= 0, shift[item_band.clamp(min=0)], torch.zeros(()))
    band = naive_band_kl(teacher, student, soft["topk_ids"], item_band, 1.0)
    assert band.abs().max().item() < 1e-9
    got, _ = kl_topk_tail_bands(student, soft["topk_ids"], soft["topk_logits"], soft["lse"], item_band=item_band, band_weight=5.0)
    plain, _ = kl_topk_tail(student, soft["topk_ids"], soft["topk_logits"], soft["lse"], 1.0)
    assert got.item() == pytest.approx(plain.item(), rel=1e-5, abs=1e-6)


def test_mask_rows_absent_bands_and_gradients():
    teacher, student, item_band, soft = _case(P=8, seed=3)
    item_band[:] = 0
    item_band[soft["topk_ids"][0, 0]] = 2  # band 2: one item, in row 0's top-k only; band 1 empty everywhere
    mask = torch.tensor([True, False, True, True, False, True, True, True])
    s = student.clone().requires_grad_(True)
    got, count = kl_topk_tail_bands(s, soft["topk_ids"], soft["topk_logits"], soft["lse"], item_band=item_band, mask=mask)
    plain, _ = kl_topk_tail(student, soft["topk_ids"], soft["topk_logits"], soft["lse"], mask=mask)
    bands = naive_band_kl(teacher[mask], student[mask], soft["topk_ids"][mask], item_band, 1.0).sum()
    assert count == int(mask.sum()) and got.item() == pytest.approx(plain.item() + bands.item(), rel=1e-5)
    got.backward()
    assert torch.isfinite(s.grad).all() and s.grad[~mask].abs().max() == 0 and s.grad[mask].abs().max() > 0


def test_through_the_dispatcher_and_bad_arguments():
    teacher, student, item_band, soft = _case(seed=4)
    targets = torch.randint(1, teacher.shape[1], (teacher.shape[0],))
    loss, count, parts = distillation_loss("kl_bands", 0.0, 1.0, student, targets, soft, item_band=item_band, band_weight=1.0)
    direct, _ = kl_topk_tail_bands(student, soft["topk_ids"], soft["topk_logits"], soft["lse"], item_band=item_band)
    assert loss.item() == pytest.approx(direct.item(), rel=1e-6) and count == teacher.shape[0]
    with pytest.raises(ValueError, match="item_band must be"):
        kl_topk_tail_bands(student, soft["topk_ids"], soft["topk_logits"], soft["lse"], item_band=item_band[:-1])
    with pytest.raises(ValueError, match="band_weight"):
        kl_topk_tail_bands(student, soft["topk_ids"], soft["topk_logits"], soft["lse"], item_band=item_band, band_weight=-1.0)
