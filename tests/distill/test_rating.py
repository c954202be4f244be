"""The rating task's loss and metrics against dense references and hand computations; the rating model's shapes and causality."""

from __future__ import annotations

import math

import pytest
import torch

from distill.config import ModelConfig
from distill.rating import (expected_calibration_error, per_example_errors, rating_kd_loss, rating_loss, rating_metrics,
                            smoothed_histogram)
from distill.rating_model import RatingModel


def reference_kd(student_logits, teacher_log_probs, t):
    """T^2 * KL(p_T || q_T) row by row, in plain Python."""
    total = 0.0
    for s_row, t_row in zip(student_logits.tolist(), teacher_log_probs.tolist()):
        p = [math.exp(v / t) for v in t_row]
        q = [math.exp(v / t) for v in s_row]
        p = [v / sum(p) for v in p]
        q = [v / sum(q) for v in q]
        total += t * t * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    return total / len(student_logits)


def test_kd_of_a_distribution_with_itself_is_zero_at_any_temperature():
    logits = torch.randn(7, 5)
    for t in (0.5, 1.0, 4.0):
        assert rating_kd_loss(logits, torch.log_softmax(logits, -1), t).item() == pytest.approx(0.0, abs=1e-6)
        # The student's logits may be shifted by any constant: the same distribution.
        assert rating_kd_loss(logits + 3.0, torch.log_softmax(logits, -1), t).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("t", [0.5, 1.0, 2.0, 5.0])
def test_kd_matches_the_dense_reference_with_temperature_scaling(t):
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 5), torch.log_softmax(torch.randn(6, 5) * 2, -1)
    assert rating_kd_loss(student, teacher, t).item() == pytest.approx(reference_kd(student, teacher, t), rel=1e-5)


def test_kd_gradient_matches_finite_differences_and_the_closed_form():
    torch.manual_seed(1)
    student = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(4, 5, dtype=torch.float64), -1)
    # rating_kd_loss computes in float32; check the gradient of the same formula in float64.
    def kd64(s):
        p = torch.log_softmax(teacher / 2.0, -1)
        return ((p.exp() * (p - torch.log_softmax(s / 2.0, -1))).sum(-1) * 4.0).mean()

    assert torch.autograd.gradcheck(kd64, (student,))
    # Closed form: d/ds of T^2 KL(p_T || q_T) = T (q_T - p_T) per row, / N for the mean.
    loss = rating_kd_loss(student.float(), teacher.float(), 2.0)
    grad, = torch.autograd.grad(loss, student)
    want = 2.0 * (torch.softmax(student / 2.0, -1) - torch.softmax(teacher / 2.0, -1)) / 4
    assert torch.allclose(grad, want.detach(), atol=1e-5)


def test_rating_loss_mixes_hard_and_kd_with_alpha_on_the_hard_label():
    torch.manual_seed(2)
    student, teacher, targets = torch.randn(8, 5), torch.log_softmax(torch.randn(8, 5), -1), torch.randint(0, 5, (8,))
    ce = torch.nn.functional.cross_entropy(student, targets)
    kd = rating_kd_loss(student, teacher, 3.0)
    assert rating_loss(student, targets, teacher, 0.3, 3.0).item() == pytest.approx((0.3 * ce + 0.7 * kd).item(), rel=1e-6)
    assert rating_loss(student, targets, None, 0.3, 3.0).item() == pytest.approx(ce.item(), rel=1e-6)  # the twin


def test_metrics_against_hand_computation():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    probs = torch.tensor([[0.0, 0.0, 0.0, 0.5, 0.5],    # expects 4.5, top level 4 (ties: the first max)
                          [0.1, 0.2, 0.4, 0.2, 0.1],    # expects 3.0, top level 3
                          [0.0, 0.0, 0.0, 0.0, 1.0]])   # expects 5.0, top level 5
    targets = torch.tensor([4, 2, 0])                   # true ratings 5, 3, 1
    m = rating_metrics(probs, targets, values)
    errors = [4.5 - 5, 3.0 - 3, 5.0 - 1]
    assert m["rmse"] == pytest.approx(math.sqrt(sum(e * e for e in errors) / 3))
    assert m["mae"] == pytest.approx(sum(abs(e) for e in errors) / 3)
    assert m["nll"] == pytest.approx((-math.log(0.5) - math.log(0.4) - math.log(1e-12)) / 3)
    assert m["accuracy"] == pytest.approx(1 / 3)  # row 1 right; row 0 picks level 4 (first max), wrong
    # ECE, 10 bins: confidences 0.5 (bin 5, wrong), 0.4 (bin 4, right), 1.0 (bin 9, wrong).
    assert m["ece"] == pytest.approx((abs(0 - 0.5) + abs(1 - 0.4) + abs(0 - 1.0)) / 3)
    assert per_example_errors(probs, targets, values)["squared_error"].tolist() == pytest.approx([0.25, 0.0, 16.0])


def test_a_calibrated_predictor_has_near_zero_ece():
    torch.manual_seed(3)
    probs = torch.softmax(torch.randn(20000, 5), -1)
    targets = torch.multinomial(probs, 1).squeeze(1)  # outcomes drawn from the predictions themselves
    assert expected_calibration_error(probs, targets) < 0.02
    assert expected_calibration_error(probs, (targets + 1) % 5) > 0.1


def test_smoothed_histogram_is_a_distribution_that_keeps_every_level_possible():
    prior = torch.tensor([0.1, 0.1, 0.2, 0.3, 0.3])
    h = smoothed_histogram(torch.tensor([4, 4, 3]), 5, prior, strength=2.0)
    assert h.sum().item() == pytest.approx(1.0) and (h > 0).all()
    assert h.tolist() == pytest.approx([(0 + 0.2) / 5, 0.2 / 5, 0.4 / 5, (1 + 0.6) / 5, (2 + 0.6) / 5])


def test_the_rating_model_is_causal_and_scores_every_position_with_a_history():
    torch.manual_seed(4)
    cfg = ModelConfig(d_model=16, num_layers=1, num_heads=2, ffn_dim=32, max_len=8, dropout=0.0)
    model = RatingModel(cfg, num_items=30, num_levels=5).eval()
    items = torch.tensor([[0, 0, 3, 7, 9, 2], [4, 5, 6, 7, 8, 9]])
    levels = torch.tensor([[0, 0, 5, 1, 3, 4], [1, 2, 3, 4, 5, 1]])
    logits, targets, valid = model.sequence_logits(items, levels)
    assert logits.shape == (2, 5, 5) and targets[0].tolist() == [0, 4, 0, 2, 3]
    assert valid[0].tolist() == [False, False, True, True, True] and valid[1].all()
    # Changing the last rating changes no prediction before it (causality), but the model sees ratings.
    changed = levels.clone()
    changed[:, -1] = 2
    logits2, _, _ = model.sequence_logits(items, changed)
    assert torch.allclose(logits[:, :-1], logits2[:, :-1], atol=1e-6)
    earlier = levels.clone()
    earlier[:, 3] = 1 if levels[0, 3] != 1 else 2
    assert not torch.allclose(model.sequence_logits(items, earlier)[0][:, -1], logits[:, -1])
    # predict() on a history and a target = the training logits at that position.
    pred = model.predict(items[:, :-1], levels[:, :-1], items[:, -1])
    assert torch.allclose(pred, logits[:, -1], atol=1e-5)


def test_the_parameter_formula_counts_the_rating_model():
    from distill.sizing import count_parameters

    for cfg in (ModelConfig(d_model=16, num_layers=2, num_heads=2, ffn_dim=32, max_len=8),
                ModelConfig(d_model=24, num_layers=1, num_heads=2, ffn_dim=48, max_len=10,
                            item_dims=[{"items": 10, "dim": 24}, {"dim": 8}])):
        model = RatingModel(cfg, num_items=40, num_levels=5)
        assert count_parameters(cfg, 40, 5) == sum(p.numel() for p in model.parameters())


def test_rating_terms_mix_to_the_rating_loss_and_an_empty_share_sums_to_zero():
    from distill.rating import rating_loss, rating_terms

    torch.manual_seed(0)
    logits, teacher = torch.randn(7, 5), torch.log_softmax(torch.randn(7, 5), -1)
    targets = torch.randint(0, 5, (7,))
    terms = rating_terms(logits, targets, teacher, alpha=0.3, temperature=2.0)
    mixed = 0.3 * terms["hard"][0] / terms["hard"][1] + 0.7 * terms["kd"][0] / terms["kd"][1]
    torch.testing.assert_close(mixed, rating_loss(logits, targets, teacher, 0.3, 2.0))
    assert set(rating_terms(logits, targets, None, alpha=1.0)) == {"hard"}
    empty = rating_terms(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), torch.zeros(0, 5), alpha=0.3)
    assert all(float(total) == 0.0 and float(count) == 0.0 for total, count in empty.values())


def test_augmented_positions_reach_the_kd_term_and_never_the_hard_label_term():
    from distill.rating import rating_kd_loss, rating_terms

    torch.manual_seed(1)
    logits, teacher = torch.randn(6, 5), torch.log_softmax(torch.randn(6, 5), -1)
    targets = torch.randint(0, 5, (6,))
    augmented = torch.tensor([False, True, False, True, True, False])
    terms = rating_terms(logits, targets, teacher, alpha=0.5, temperature=2.0, augmented=augmented)
    real = ~augmented
    # The hard term: the cross-entropy of the real positions only, whatever the augmented ones' levels say.
    torch.testing.assert_close(terms["hard"][0], torch.nn.functional.cross_entropy(logits[real], targets[real], reduction="sum"))
    assert float(terms["hard"][1]) == 3.0
    other_levels = torch.where(augmented, (targets + 1) % 5, targets)  # every augmented position changed, no other
    assert bool((other_levels != targets)[augmented].all()) and torch.equal(other_levels[real], targets[real])
    assert torch.equal(rating_terms(logits, other_levels, teacher, 0.5, 2.0, augmented)["hard"][0], terms["hard"][0])
    # The KD term: every position, augmented ones included.
    torch.testing.assert_close(terms["kd"][0] / terms["kd"][1], rating_kd_loss(logits, teacher, 2.0))
    assert float(terms["kd"][1]) == 6.0
    with pytest.raises(ValueError, match="augmented must be"):
        rating_terms(logits, targets, teacher, 0.5, 2.0, augmented[:4])
