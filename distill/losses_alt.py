"""The KD terms other than forward KL: reverse KL and JSD on the top-k, sampled KL, ranking.

Owns :func:`reverse_kl_topk` (mode-seeking KL on the renormalised top-k), :func:`jsd_topk`
(Jensen–Shannon over the top-k + tail buckets of :mod:`distill.losses_topk`),
:func:`kl_sampled` (random-sampling KD from sampled teacher ids) and
:func:`ranking_distillation` (Tang & Wang 2018). Conventions are documented in
:mod:`distill.losses`, which re-exports these; the shared helpers come from
:mod:`distill.losses_topk`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from distill.losses_topk import _check_temperature, _check_topk, _kl_rows, _prepare, _student_log_probs, _tail_buckets
from distill.model import PAD_ID

Tensor = torch.Tensor


# --------------------------------------------------------------------------------------
# Reverse KL and JSD on the teacher's top-k


def reverse_kl_topk(
    student_logits: Tensor, topk_ids: Tensor, topk_logits: Tensor, temperature: float = 1.0, *, mask: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """Reverse KL on the top-k renormalised distributions: ``T^2 * KL(q̂_T || p̂_T)``.

    ``p̂_T``, ``q̂_T`` as in :func:`distill.losses_topk.kl_topk` (both restricted to the
    teacher's top-k ids and renormalised there). No tail bucket: the stored fp16 top-k logits make a tiny
    teacher tail round to 0, and the reverse KL of a student with any tail mass against
    a zero teacher tail is infinite. Consequently mass the student puts outside the
    top-k is not penalised by this term (the hard-label term still sees it).
    Mode-seeking: the student is pushed to concentrate on the teacher's largest modes.

    Args:
        student_logits: (P, C), column 0 = padding.
        topk_ids: (P, k) int64 in 1..C-1.
        topk_logits: (P, k) raw teacher logits (must be finite).
        temperature: T > 0.
        mask: optional (P,) bool, True = counted.

    Returns:
        ``(loss_sum, count)``.
    """
    T = _check_temperature(temperature)
    s, (ids, z), _, count = _prepare(student_logits, mask, (topk_ids, topk_logits))
    _check_topk(s, ids, z)
    log_p = F.log_softmax(z.float() / T, dim=-1)
    log_q = F.log_softmax(s.gather(1, ids) / T, dim=-1)
    rows = (log_q.exp() * (log_q - log_p)).sum(-1)
    return rows.sum() * (T * T), count


def jsd_topk(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logits: Tensor,
    lse: Tensor,
    temperature: float = 1.0,
    *,
    mask: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Jensen–Shannon divergence over the top-k + tail buckets, times T^2.

    ``JSD(p, q) = KL(p || m) / 2 + KL(q || m) / 2`` with ``m = (p + q) / 2``, natural log,
    for the (k + 1)-bucket distributions of :func:`distill.losses_topk.kl_topk_tail` (same tail
    approximation for the teacher at T != 1). Symmetric, >= 0, and at most ``log 2`` per
    position before the ``T^2`` factor; finite even where the teacher's tail is 0.

    Args:
        student_logits: (P, C), column 0 = padding.
        topk_ids: (P, k) int64 in 1..C-1.
        topk_logits: (P, k) raw teacher logits.
        lse: (P,) teacher logsumexp over all real items at T=1.
        temperature: T > 0.
        mask: optional (P,) bool, True = counted.

    Returns:
        ``(loss_sum, count)``.
    """
    log_p, log_q, count, T = _tail_buckets(student_logits, topk_ids, topk_logits, lse, temperature, mask)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)  # finite: log_q is
    rows = 0.5 * _kl_rows(log_p, log_m) + 0.5 * (log_q.exp() * (log_q - log_m)).sum(-1)
    return rows.sum() * (T * T), count


# --------------------------------------------------------------------------------------
# Sampled soft labels


def kl_sampled(
    student_logits: Tensor,
    sampled_ids: Tensor,
    sampled_counts: Tensor,
    sampled_logits: Tensor,
    lse: Optional[Tensor] = None,
    temperature: float = 1.0,
    *,
    mask: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Random-sampling KD (Anshumann et al., ACL 2025, "Sparse Logit Sampling").

    Returns the CROSS-ENTROPY form ``T^2 * H(p_T, q_T)`` estimated from N draws
    ``j ~ p`` (the teacher's softmax at T=1): ``-T^2 * sum_j pi_j log q_T(j)`` over the
    drawn ids, with the student's full softmax at T (over all real items). It differs
    from ``T^2 * KL(p_T || q_T)`` by ``T^2 * H(p_T)``, a constant w.r.t. the student, so
    the gradients are those of the KL; the value itself is not a KL (it is not 0 at
    q = p).

    Weights: ``pi_j = (c_j / N) * w_j`` with importance weights
    ``w_j = p_T(j) / p(j) ∝ exp(z_j (1/T - 1))``.

    * T = 1: ``w_j = 1``, ``pi_j = c_j / N`` and the estimate is UNBIASED for
      ``H(p, q)`` (and its gradient for ``q - p``).
    * T != 1: ``p_T``'s normaliser is unknown, so the weights are SELF-NORMALISED over the
      drawn slots: ``pi_j = c_j exp(z_j (1/T - 1)) / sum_l c_l exp(z_l (1/T - 1))``.
      Consistent (exact as N -> inf) but biased for finite N; ``lse`` cancels and is
      not needed (it is accepted, and shape-checked, for a uniform call signature).

    Args:
        student_logits: (P, C), column 0 = padding.
        sampled_ids: (P, S) int64, 0 = unused slot. Repeated ids are allowed (their
            slots add up), so both "one slot per draw" and "unique ids + counts" work.
        sampled_counts: (P, S) draw counts (float or int), 0 for unused slots.
        sampled_logits: (P, S) raw teacher logits of ``sampled_ids`` (ignored at unused slots).
        lse: optional (P,) teacher T=1 log-normaliser; unused (see above).
        temperature: T > 0.
        mask: optional (P,) bool, True = counted.

    Returns:
        ``(loss_sum, count)``. A kept position with no draws contributes 0.
    """
    T = _check_temperature(temperature)
    per_row = (lse,) if lse is not None else ()
    s, (ids, counts, z), _, count = _prepare(student_logits, mask, (sampled_ids, sampled_counts, sampled_logits), per_row)
    if not (ids.shape == counts.shape == z.shape):
        raise ValueError("sampled_ids, sampled_counts and sampled_logits must have the same (P, S) shape")
    counts = counts.float()
    used = (ids != PAD_ID) & (counts > 0)
    safe_ids = torch.where(used, ids, torch.ones_like(ids))
    log_c = torch.log(torch.where(used, counts, torch.ones_like(counts)))
    if T == 1.0:
        log_w = log_c
    else:
        safe_z = torch.where(used, z.float(), torch.zeros_like(counts))
        log_w = log_c + safe_z * (1.0 / T - 1.0)
    log_w = log_w.masked_fill(~used, float("-inf"))
    has_draws = used.any(dim=-1, keepdim=True)
    log_norm = torch.logsumexp(log_w, dim=-1, keepdim=True)
    log_norm = torch.where(has_draws, log_norm, torch.zeros_like(log_norm))
    pi = (log_w - log_norm).exp()  # exactly 0 at unused slots, sums to 1 over used ones

    log_q = _student_log_probs(s, safe_ids, T, with_tail=False)  # (M, S), finite
    rows = -(pi * log_q).sum(-1)
    return rows.sum() * (T * T), count


# --------------------------------------------------------------------------------------
# Ranking distillation


def ranking_distillation(
    student_logits: Tensor,
    topk_ids: Tensor,
    K: int = 10,
    lambda_: float = 1.0,
    *,
    negative_weight: float = 0.0,
    mask: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Ranking Distillation (Tang & Wang, KDD 2018), position-importance weighting.

    The teacher's top-K items are weighted positives for the student:
    ``loss = -sum_{r=1..K} w_r log sigmoid(s_{id_r})`` with ``w_r ∝ exp(-r / lambda_)``
    normalised to sum to 1 (as in the authors' code; defaults K=10, lambda=1 are theirs).

    Implemented: the static position-importance weights only. Not implemented: the
    paper's dynamic "ranking discrepancy" weights (which need sampled estimates of the
    student's ranks). The paper's negative term belongs to its hard-label ranking loss;
    here the hard label is the softmax CE of :func:`distill.losses.hard_label_ce`. Optionally
    (``negative_weight > 0``) this adds ``negative_weight * mean_j -log sigmoid(-s_j)``
    over all real items j outside the top-K, which keeps the positives-only term from
    raising every score. No temperature and no T^2 factor.

    Args:
        student_logits: (P, C), column 0 = padding.
        topk_ids: (P, k) int64 in 1..C-1, teacher order; the first K columns are used.
        K: 1 <= K <= k.
        lambda_: > 0, sharpness of the position weights (small = top-heavy).
        negative_weight: >= 0, weight of the optional negative term.
        mask: optional (P,) bool, True = counted.

    Returns:
        ``(loss_sum, count)``.
    """
    if lambda_ <= 0:
        raise ValueError(f"lambda_ must be > 0, got {lambda_}")
    if negative_weight < 0:
        raise ValueError(f"negative_weight must be >= 0, got {negative_weight}")
    s, (ids,), _, count = _prepare(student_logits, mask, (topk_ids,))
    k = _check_topk(s, ids)
    if not 1 <= K <= k:
        raise ValueError(f"K={K} must be in 1..k={k}")
    ids = ids[:, :K]
    ranks = torch.arange(1, K + 1, dtype=torch.float32, device=s.device)
    weights = torch.softmax(-ranks / lambda_, dim=0)  # exp(-r/lambda) / sum
    rows = -(F.logsigmoid(s.gather(1, ids)) * weights).sum(-1)
    num_negatives = s.shape[1] - 1 - K
    if negative_weight > 0 and num_negatives > 0:
        real = s[:, 1:]
        is_positive = torch.zeros_like(real, dtype=torch.bool).scatter_(1, ids - 1, True)
        neg = -F.logsigmoid(-real).masked_fill(is_positive, 0.0).sum(-1) / num_negatives
        rows = rows + negative_weight * neg
    return rows.sum(), count
