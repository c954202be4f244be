"""Decoupled knowledge distillation (Zhao et al., CVPR 2022) on the stored top-k + tail buckets.

Classical KD's KL splits into a *target* term (TCKD: does the student give the true next
item the teacher's probability?) and a *non-target* term (NCKD: among the other items, does
it rank them as the teacher does, the "dark knowledge"), and the split shows that the
non-target term is weighted by ``1 - p_target``: suppressed exactly where the teacher is
confident. DKD weights the two apart. Conventions as in :mod:`distill.losses`.

The buckets are those of :func:`distill.losses_topk.kl_topk_tail`: the teacher's top-k ids
and one tail bucket. A target outside the top-k is split out of the tail: the student's
probability of it is exact; the teacher's is the tail's mass shared equally over the tail
items (the same equal-tail assumption the tail bucket makes at T != 1).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from distill.losses_topk import _kl_rows, _tail_buckets
from distill.model import PAD_ID

Tensor = torch.Tensor
NEG_INF = float("-inf")


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0 (x = 0 gives -inf)."""
    return torch.log(-torch.expm1(x.clamp(max=0.0)))


def _with_target_bucket(log_p: Tensor, log_q: Tensor, s: Tensor, ids: Tensor, targets: Tensor, temperature: float):
    """The (k + 2) buckets: top-k, the target when it is outside the top-k, and the rest of the tail.

    Returns (log_p, log_q, target column (M,), has_target (M,)).
    """
    M, k = ids.shape
    num_items = s.shape[1] - 1
    has_target = targets != PAD_ID
    in_top = ids == targets[:, None]  # (M, k)
    inside = in_top.any(dim=1)
    target_col = torch.where(inside, in_top.float().argmax(dim=1), torch.full_like(targets, k))
    outside = has_target & ~inside
    if k == num_items:  # no tail: every target is among the k ids (column 0 stands in for rows without one)
        return log_p, log_q, torch.where(inside, target_col, torch.zeros_like(target_col)), has_target
    n_tail = num_items - k
    tail_p, tail_q = log_p[:, -1], log_q[:, -1]
    # Only rows whose target is outside the top-k use the split; the others get placeholder values that keep
    # every branch finite (torch.where sends a zero gradient into the branch not taken, and 0 * inf is NaN).
    scaled = s[:, 1:] / temperature
    q_t = scaled.gather(1, (targets.clamp(min=1) - 1)[:, None]).squeeze(1) - torch.logsumexp(scaled, dim=-1)
    # Teacher: the tail's mass shared equally over its n_tail items (log share <= 0; 0 when the tail is one item,
    # whose rest is then empty: probability 0, handled by the KL). Student: its exact probability of the target,
    # kept just below its bucket so the rest stays finite.
    share_p = torch.full_like(tail_p, -math.log(n_tail))
    share_q = torch.where(outside, (q_t - tail_q).clamp(max=-1e-6), torch.full_like(q_t, -1.0))
    out_p = torch.where(outside, tail_p + share_p, torch.full_like(tail_p, NEG_INF))
    out_q = torch.where(outside, tail_q + share_q, torch.full_like(tail_q, -1e4))  # -1e4: no mass where unused
    rest_p = torch.where(outside, tail_p + _log1mexp(share_p), tail_p)
    rest_q = torch.where(outside, tail_q + _log1mexp(share_q), tail_q)
    log_p = torch.cat([log_p[:, :-1], out_p[:, None], rest_p[:, None]], dim=1)
    log_q = torch.cat([log_q[:, :-1], out_q[:, None], rest_q[:, None]], dim=1)
    return log_p, log_q, target_col, has_target


def dkd_topk_tail(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logits: Tensor,
    lse: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    *,
    target_weight: float = 1.0,
    nontarget_weight: float = 8.0,
    mask: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """``T^2 * (target_weight * TCKD + nontarget_weight * NCKD)`` per position, summed.

    TCKD is ``KL([p_t, 1 - p_t] || [q_t, 1 - q_t])`` for the target t; NCKD is the KL of the
    two distributions over the non-target buckets, each renormalised. A position with
    target 0 (a teacher-labelled augmented row: no true next item) has no target class:
    TCKD is 0 and NCKD is the KL over all buckets (:func:`kl_topk_tail`'s).
    ``target_weight = nontarget_weight = 1`` is not KL (the weight ``1 - p_t`` is gone);
    the paper's defaults are 1 and 8.

    Args:
        targets: (P,) int64, the true next item (0 = none).
        Others as :func:`distill.losses_topk.kl_topk_tail`.
    """
    if targets.shape != student_logits.shape[:1]:
        raise ValueError(f"targets must be ({student_logits.shape[0]},), got {tuple(targets.shape)}")
    keep = mask if mask is not None else None
    log_p, log_q, count, T = _tail_buckets(student_logits, topk_ids, topk_logits, lse, temperature, keep)
    s = student_logits.float() if keep is None else student_logits[keep.to(student_logits.device)].float()
    ids = topk_ids if keep is None else topk_ids[keep.to(topk_ids.device)]
    t = (targets if keep is None else targets[keep.to(targets.device)]).to(s.device)
    log_p, log_q, col, has_target = _with_target_bucket(log_p, log_q, s, ids.to(s.device), t, T)

    # TCKD over the binary (target, not target).
    lp_t, lq_t = log_p.gather(1, col[:, None]).squeeze(1), log_q.gather(1, col[:, None]).squeeze(1)
    binary_p = torch.stack([lp_t, _log1mexp(lp_t)], dim=1)
    # A student all but certain of the target (q_t rounds to 1) would make log(1 - q_t) -inf: held at log(1e-7).
    lq_t = lq_t.clamp(max=math.log1p(-1e-7))
    binary_q = torch.stack([lq_t, _log1mexp(lq_t)], dim=1)
    tckd = torch.where(has_target, _kl_rows(binary_p, binary_q), torch.zeros_like(lp_t))

    # NCKD: the target's column removed (rows with a target), both sides renormalised.
    drop = torch.zeros_like(log_p, dtype=torch.bool).scatter_(1, col[:, None], True) & has_target[:, None]
    if log_p.shape[1] > ids.shape[1]:  # the "target outside" column means nothing on rows without one
        drop[:, ids.shape[1]] |= ~(has_target & (col == ids.shape[1]))
    nt_p = torch.log_softmax(log_p.masked_fill(drop, NEG_INF), dim=1)
    nt_q = torch.log_softmax(log_q.masked_fill(drop, -1e4), dim=1)
    nckd = _kl_rows(nt_p, nt_q)
    return ((target_weight * tckd + nontarget_weight * nckd).sum()) * (T * T), count
