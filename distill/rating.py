"""The rating task's math: a distribution over a user's rating of an item, its distillation loss and its metrics.

A rating model outputs logits over ``R`` rating levels (level ``r`` in ``0..R-1`` stands for the
rating value ``values[r]``, e.g. 1..5 stars). The teacher's knowledge is its whole distribution
``p(y|x)`` (R numbers: no top-k), stored as log-probabilities. The student matches it by
temperature-scaled KL, mixed with the hard label's cross-entropy:

    loss = alpha * CE(q, y) + (1 - alpha) * T^2 * KL(p_T || q_T),   p_T = softmax(log p / T)

the same convention as the next-item task (alpha weighs the hard label; the T^2 keeps the KD
gradient's scale independent of T, Hinton et al. 2015).

Metrics of a predicted distribution ``q`` against the true level: RMSE and MAE of the expected
rating ``sum_r q_r values[r]``, NLL, accuracy of the most likely level, and the expected
calibration error of that top level's probability (equal-width confidence bins).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def rating_kd_loss(student_logits: Tensor, teacher_log_probs: Tensor, temperature: float = 1.0,
                   weights: Optional[Tensor] = None) -> Tensor:
    """Mean over rows of ``T^2 * KL(p_T || q_T)``; ``teacher_log_probs`` (N, R) are the teacher's log p at T = 1.
    ``weights`` (N,) optionally weigh the rows (e.g. 0 for rows without a teacher label)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    teacher_t = F.log_softmax(teacher_log_probs.float() / temperature, dim=-1)
    student_t = F.log_softmax(student_logits.float() / temperature, dim=-1)
    per_row = (teacher_t.exp() * (teacher_t - student_t)).sum(dim=-1) * temperature**2
    if weights is None:
        return per_row.mean()
    return (per_row * weights).sum() / weights.sum().clamp(min=1)


def rating_loss(student_logits: Tensor, targets: Tensor, teacher_log_probs: Optional[Tensor], alpha: float,
                temperature: float = 1.0) -> Tensor:
    """``alpha * CE + (1 - alpha) * T^2 KL``; without a teacher (the twin) the plain cross-entropy."""
    hard = F.cross_entropy(student_logits.float(), targets)
    if teacher_log_probs is None:
        return hard
    return alpha * hard + (1 - alpha) * rating_kd_loss(student_logits, teacher_log_probs, temperature)


def rating_terms(student_logits: Tensor, targets: Tensor, teacher_log_probs: Optional[Tensor], alpha: float,
                 temperature: float = 1.0, augmented: Optional[Tensor] = None) -> dict[str, tuple[Tensor, Tensor]]:
    """The hard-label and KD terms of :func:`rating_loss` apart, each as ``(sum over positions, count)``, the
    form :func:`distill.training.mixed_loss` mixes across workers: ``{"hard"}`` when alpha > 0, ``{"kd"}``
    when alpha < 1 (``teacher_log_probs`` (P, R) required then). ``augmented`` (P,) bool marks positions
    of teacher-labelled augmented rows: the KD term covers them, the hard term never does."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    count = torch.tensor(float(len(targets)), device=student_logits.device)
    terms = {}
    if alpha > 0:
        real = torch.ones_like(targets, dtype=torch.bool) if augmented is None else ~augmented.to(torch.bool)
        if real.shape != targets.shape:
            raise ValueError(f"augmented must be (P,) = {tuple(targets.shape)}, got {tuple(real.shape)}")
        hard = F.cross_entropy(student_logits.float(), targets, reduction="none")
        terms["hard"] = ((hard * real).sum(), real.sum().to(count.dtype))
    if alpha < 1:
        if teacher_log_probs is None:
            raise ValueError("alpha < 1 needs the teacher's log-probabilities")
        ones = torch.ones(len(targets), device=student_logits.device)  # weighted: an empty share sums to 0, not NaN
        terms["kd"] = (rating_kd_loss(student_logits, teacher_log_probs, temperature, ones) * len(targets), count)
    return terms


def expected_rating(probs: Tensor, values: Tensor) -> Tensor:
    """(N, R) probabilities, (R,) rating values -> (N,) the mean rating under each distribution."""
    return probs @ values.to(probs.dtype)


def per_example_errors(probs: Tensor, targets: Tensor, values: Tensor) -> dict[str, Tensor]:
    """Each example's squared and absolute error of the expected rating, its NLL, and whether its top level is right
    (per example, for paired bootstrap comparisons of two models)."""
    probs = probs.double()
    error = expected_rating(probs, values) - values.double()[targets]
    true_prob = probs.gather(1, targets[:, None]).squeeze(1)
    return {"squared_error": error.square(), "absolute_error": error.abs(),
            "nll": -torch.log(true_prob.clamp(min=1e-12)), "correct": (probs.argmax(dim=1) == targets).double()}


def expected_calibration_error(probs: Tensor, targets: Tensor, bins: int = 10) -> float:
    """Top-level ECE: sum over equal-width confidence bins of (share of examples) * |accuracy - mean confidence|."""
    if len(targets) == 0:
        return 0.0
    confidence, predicted = probs.double().max(dim=1)
    correct = (predicted == targets).double()
    which = (confidence * bins).long().clamp(max=bins - 1)  # a confidence of exactly 1.0 belongs to the last bin
    per_bin = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, correct - confidence)
    return float(per_bin.abs().sum() / len(targets))


def rating_metrics(probs: Tensor, targets: Tensor, values: Tensor, bins: int = 10) -> dict[str, float]:
    """RMSE, MAE, NLL, accuracy and ECE of predicted distributions ``probs`` (N, R) against true levels (N,)."""
    errors = per_example_errors(probs, targets, values)
    return {"rmse": float(errors["squared_error"].mean().sqrt()), "mae": float(errors["absolute_error"].mean()),
            "nll": float(errors["nll"].mean()), "accuracy": float(errors["correct"].mean()),
            "ece": expected_calibration_error(probs, targets, bins), "num_examples": int(len(targets))}


def smoothed_histogram(levels: Tensor, num_levels: int, prior: Tensor, strength: float = 1.0) -> Tensor:
    """A distribution over levels from observed ``levels``: counts plus ``strength`` pseudo-counts spread as ``prior``
    (so a user or item seen once does not get probability 0 for the other levels: NLL stays finite)."""
    counts = torch.bincount(levels, minlength=num_levels).double()
    return (counts + strength * prior.double()) / (counts.sum() + strength)
