"""Distillation losses: pure functions from student logits and stored teacher soft labels.

Conventions (shared by every function here):

* ``student_logits`` is ``(P, C)``, one row per position, ``C = num_items + 1``; column
  0 is padding. It is never a target and is left out of every softmax and
  normaliser (the real items are the columns ``1..C-1``), so whatever the model puts
  there (:meth:`SequentialRecommender.scores` puts the dtype's min) does not matter.
  Item id ``j`` is column ``j``.
* Teacher soft labels, as kept by the soft-label store, per position:

  - ``topk_ids (P, k)`` int64 in ``1..C-1``, sorted by teacher logit, descending;
  - ``topk_logits (P, k)`` the raw teacher logits of those ids (temperature NOT applied);
  - ``lse (P,)`` logsumexp of ALL the teacher's real-item logits at temperature 1;
  - optionally ``sampled_ids / sampled_counts / sampled_logits (P, S)``: ids drawn with
    replacement from the teacher's T=1 softmax, their draw counts and raw logits; a slot
    with id 0 or count 0 is unused.

  Teacher tensors are detached: every loss is differentiable w.r.t. the student only.
* ``mask (P,)`` bool, optional: True = the position counts. ``None`` = all positions.
  :func:`distillation_loss` uses ``targets != 0``. Masked rows are dropped before any
  arithmetic, so they may hold anything (garbage ids, NaN logits) without effect.
* Every loss returns ``(loss_sum, count)``: ``loss_sum`` a float32 scalar, the SUM of
  the per-position losses over kept positions, and ``count`` an int64 scalar, the number
  of kept positions. Callers divide by the count summed over all workers, so the
  gradient does not depend on how positions are split among workers. With no kept
  position the sum is exactly 0, still attached to the graph (backward gives zero
  gradients, not NaN).
* Temperature ``T``: teacher ``p_T ∝ exp(teacher_logit / T)``, student
  ``q_T = softmax(s / T)``; divergence losses are multiplied by ``T**2`` (Hinton et al.)
  so the gradient scale does not depend on T. :func:`ranking_distillation` has no
  temperature.
* Arithmetic is float32 whatever the input dtype, with log_softmax/logsumexp;
  zero-probability teacher outcomes are handled by zeroing the probability and its
  log (never ``0 * -inf``).

The top-k "tail" and T != 1
---------------------------
The store keeps the teacher's T=1 normaliser ``lse`` but not the other logits, so the
T=1 tail mass ``m = 1 - sum_topk exp(z_i - lse)`` is known exactly (up to the storage
precision of ``topk_logits``: with fp16 logits a tail smaller than ~1e-3 is noise), but
the tail's mass at another temperature, ``sum_tail exp(z_j / T)``, is not. The
approximation used (:func:`teacher_bucket_log_probs`) takes the ``n = C - 1 - k`` tail
logits to be all equal, to the value that reproduces ``m`` at T=1:
``z_tail = lse + log(m / n)``. This is exact at T=1 for any teacher, and exact at every T
when the tail logits are in fact equal. Otherwise, by the power-mean inequality, it
OVERestimates the tail's share for T > 1 and UNDERestimates it for T < 1 (it is the
maximum-entropy tail consistent with ``m``). The student's tail is always exact: it
has every logit.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Optional

import torch
import torch.nn.functional as F

from distill.model import PAD_ID

Tensor = torch.Tensor

#: The KD terms :func:`distillation_loss` knows; the same names as ``DistillConfig.loss``.
KINDS = ("kl_topk", "kl_topk_tail", "kl_sampled", "reverse_kl", "jsd", "ranking")


# --------------------------------------------------------------------------------------
# Helpers


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not t > 0 or not math.isfinite(t):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return t


def _prepare(
    student_logits: Tensor, mask: Optional[Tensor], per_slot: tuple[Tensor, ...] = (), per_row: tuple[Tensor, ...] = ()
) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor]:
    """Validate shapes, keep the masked-in rows, upcast the student to float32.

    Returns (student (M, C) float32, per-slot teacher tensors (M, *), per-row ones (M,), count).
    """
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be (P, C), got shape {tuple(student_logits.shape)}")
    P, C = student_logits.shape
    if C < 2:
        raise ValueError("student_logits needs at least one real item column (C >= 2)")
    for t in per_slot:
        if t.dim() != 2 or t.shape[0] != P:
            raise ValueError(f"expected a ({P}, k) teacher tensor, got shape {tuple(t.shape)}")
    for t in per_row:
        if t.shape != (P,):
            raise ValueError(f"expected a ({P},) teacher tensor, got shape {tuple(t.shape)}")
    slots = [t.detach() for t in per_slot]
    rows = [t.detach() for t in per_row]
    if mask is None:
        count = torch.tensor(P, dtype=torch.long, device=student_logits.device)
        s = student_logits
    else:
        if mask.shape != (P,):
            raise ValueError(f"mask must be ({P},), got shape {tuple(mask.shape)}")
        keep = mask.to(device=student_logits.device, dtype=torch.bool)
        count = keep.sum()
        s = student_logits[keep]
        slots = [t[keep.to(t.device)] for t in slots]
        rows = [t[keep.to(t.device)] for t in rows]
    return s.float(), [t.to(s.device) for t in slots], [t.to(s.device) for t in rows], count


def _check_topk(student: Tensor, topk_ids: Tensor, topk_logits: Optional[Tensor] = None) -> int:
    k = topk_ids.shape[1]
    if topk_logits is not None and topk_logits.shape != topk_ids.shape:
        raise ValueError(f"topk_logits {tuple(topk_logits.shape)} and topk_ids {tuple(topk_ids.shape)} differ in shape")
    if not 1 <= k <= student.shape[1] - 1:
        raise ValueError(f"k={k} must be in 1..{student.shape[1] - 1} (the number of real items)")
    return k


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Per-row KL(p || q) = sum p (log p - log q); outcomes with p = 0 contribute exactly 0.

    ``log_p`` is the teacher's (no gradient); ``log_q`` must be finite.
    """
    p = log_p.exp()  # exp(-inf) = 0
    safe_log_p = torch.where(p > 0, log_p, torch.zeros_like(log_p))
    return (p * (safe_log_p - log_q)).sum(-1)


# A student whose top-k holds more than this share of its mass gets its tail from the exact
# full-row logsumexp (see _student_log_probs); below it, log(1 - top-k mass) is accurate to ~1e-4.
_PEAKED_TOP_MASS = 0.999


def _student_log_probs(s: Tensor, ids: Tensor, temperature: float, with_tail: bool) -> Tensor:
    """Student log q_T at ``ids`` (M, k), plus the exact tail bucket as a last column when ``with_tail``.

    The normaliser is over the real items 1..C-1 (column 0 excluded).
    """
    scaled = s[:, 1:] if temperature == 1.0 else s[:, 1:] / temperature  # (M, C-1): column j-1 is item j
    log_norm = torch.logsumexp(scaled, dim=-1, keepdim=True)  # (M, 1)
    top = scaled.gather(1, ids - 1) - log_norm  # (M, k)
    if not with_tail:
        return top
    # The tail is log(1 - top-k mass): k values per row instead of a second masked pass over the
    # whole catalog (that pass nearly doubled a training step). It loses precision only when the
    # top-k holds almost all the mass; those rows (rare) take the exact masked logsumexp. The
    # torch.where keeps their unused cheap branch finite, so no NaN leaks into the gradient.
    log_top_mass = torch.logsumexp(top, dim=-1, keepdim=True)
    peaked = log_top_mass > math.log(_PEAKED_TOP_MASS)  # (M, 1)
    safe = torch.where(peaked, torch.full_like(log_top_mass, -1.0), log_top_mass)
    tail = torch.log(-torch.expm1(safe))
    rows = peaked.squeeze(1).nonzero().squeeze(1)
    if rows.numel():
        sub = scaled[rows]
        in_top = torch.zeros_like(sub, dtype=torch.bool).scatter_(1, ids[rows] - 1, True)
        # Every row has at least one tail item here (k < C - 1), so this logsumexp is finite.
        exact = torch.logsumexp(sub.masked_fill(in_top, float("-inf")), dim=-1, keepdim=True) - log_norm[rows]
        tail = torch.where(peaked, torch.zeros_like(tail).index_put((rows,), exact), tail)
    return torch.cat([top, tail], dim=1)


def teacher_bucket_log_probs(topk_logits: Tensor, lse: Tensor, num_items: int, temperature: float) -> Tensor:
    """The teacher's log-probabilities over the top-k ids plus one tail bucket, at temperature T.

    Args:
        topk_logits: (M, k) raw teacher logits of the top-k ids.
        lse: (M,) logsumexp of all the teacher's real-item logits at T=1.
        num_items: number of real items, ``C - 1``.
        temperature: T.

    Returns:
        (M, k + 1) log-probabilities (the last column is the tail), or (M, k) when
        ``k == num_items`` (no tail). At T=1 these are exactly ``z_i - lse`` and
        ``log(1 - sum exp(z_i - lse))``; for T != 1 the tail logits are assumed equal
        (see the module docstring). A tail mass that rounds to <= 0 (e.g. fp16-stored
        logits of a very peaked teacher) becomes a zero-probability tail, and the
        result is renormalised, so it always sums to 1.
    """
    z = topk_logits.float()
    k = z.shape[1]
    n_tail = num_items - k
    if n_tail == 0:
        return F.log_softmax(z / temperature, dim=-1)
    lse = lse.float()
    log_top_mass = torch.logsumexp(z - lse[:, None], dim=-1)  # log of the top-k's T=1 mass
    # log(1 - exp(a)) for a <= 0; a >= 0 (rounding) gives log(0) = -inf.
    log_tail_mass = torch.log(-torch.expm1(log_top_mass.clamp(max=0.0)))
    # n equal tail logits z_tail with n * exp(z_tail - lse) = m; their summed weight at T.
    z_tail = lse + log_tail_mass - math.log(n_tail)
    tail_logit = math.log(n_tail) + z_tail / temperature  # -inf when m = 0
    return F.log_softmax(torch.cat([z / temperature, tail_logit[:, None]], dim=1), dim=-1)


# --------------------------------------------------------------------------------------
# Divergences on the teacher's top-k


def kl_topk(
    student_logits: Tensor, topk_ids: Tensor, topk_logits: Tensor, temperature: float = 1.0, *, mask: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """Forward KL on the top-k, "top-k renormalised" variant: ``T^2 * KL(p̂_T || q̂_T)``.

    ``p̂_T`` is the teacher's softmax at T over its own top-k ids only (renormalised over
    them) and ``q̂_T`` the student's softmax at T restricted to the same k ids and
    renormalised over them. Mass the student puts outside the top-k is not penalised
    (see :func:`kl_topk_tail` for the variant that does). Needs neither ``lse`` nor a
    full-catalog softmax of the student: it only reads k student logits per row.

    Args:
        student_logits: (P, C), column 0 = padding.
        topk_ids: (P, k) int64 in 1..C-1.
        topk_logits: (P, k) raw teacher logits of ``topk_ids``.
        temperature: T > 0.
        mask: optional (P,) bool, True = counted.

    Returns:
        ``(loss_sum, count)`` (see the module docstring). Equals the dense
        ``T^2 * KL(p_T || q_T)`` over the whole catalog when k = C - 1.
    """
    T = _check_temperature(temperature)
    s, (ids, z), _, count = _prepare(student_logits, mask, (topk_ids, topk_logits))
    _check_topk(s, ids, z)
    log_p = F.log_softmax(z.float() / T, dim=-1)
    log_q = F.log_softmax(s.gather(1, ids) / T, dim=-1)
    return _kl_rows(log_p, log_q).sum() * (T * T), count


def _tail_buckets(student_logits, topk_ids, topk_logits, lse, temperature, mask):
    """Teacher and student log-probabilities over the (k + 1) buckets: (log_p, log_q, count, T)."""
    T = _check_temperature(temperature)
    s, (ids, z), (lse_,), count = _prepare(student_logits, mask, (topk_ids, topk_logits), (lse,))
    k = _check_topk(s, ids, z)
    num_items = s.shape[1] - 1
    log_p = teacher_bucket_log_probs(z, lse_, num_items, T)
    log_q = _student_log_probs(s, ids, T, with_tail=k < num_items)
    return log_p, log_q, count, T


def kl_topk_tail(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logits: Tensor,
    lse: Tensor,
    temperature: float = 1.0,
    *,
    mask: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Forward KL over k + 1 outcomes: the teacher's top-k ids and one "tail" bucket.

    ``T^2 * KL(p_T || q_T)`` where both distributions are over
    ``{id_1, ..., id_k, rest of the catalog}``. The student side is exact (its tail is the
    logsumexp over the non-top-k real items). The teacher side is exact at T=1; at
    T != 1 its tail uses the equal-tail-logits approximation described in the module
    docstring and :func:`teacher_bucket_log_probs`. With k = C - 1 there is no tail and
    this is the dense ``T^2 * KL(p_T || q_T)`` at every T.

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
    return _kl_rows(log_p, log_q).sum() * (T * T), count


def reverse_kl_topk(
    student_logits: Tensor, topk_ids: Tensor, topk_logits: Tensor, temperature: float = 1.0, *, mask: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """Reverse KL on the top-k renormalised distributions: ``T^2 * KL(q̂_T || p̂_T)``.

    ``p̂_T``, ``q̂_T`` as in :func:`kl_topk` (both restricted to the teacher's top-k ids and
    renormalised there). No tail bucket: the stored fp16 top-k logits make a tiny
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
    for the (k + 1)-bucket distributions of :func:`kl_topk_tail` (same tail
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
    here the hard label is the softmax CE of :func:`hard_label_ce`. Optionally
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


# --------------------------------------------------------------------------------------
# Hard labels and the mix


def hard_label_ce(student_logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Full-softmax cross-entropy over the real items, ignoring positions with target 0.

    Args:
        student_logits: (P, C), column 0 = padding (excluded from the softmax).
        targets: (P,) int64 in 0..C-1; 0 = ignore the position.

    Returns:
        ``(loss_sum, count)``: the summed CE over positions with a target and their
        number. Equals ``F.cross_entropy(student_logits, targets, ignore_index=0,
        reduction="sum")`` when column 0 holds a very negative value.
    """
    if student_logits.dim() != 2 or targets.shape != student_logits.shape[:1]:
        raise ValueError(
            f"expected student_logits (P, C) and targets (P,), got {tuple(student_logits.shape)} and {tuple(targets.shape)}"
        )
    keep = targets != PAD_ID
    logits = student_logits[keep].float()[:, 1:]  # (M, C-1): column j-1 is item j
    total = F.cross_entropy(logits, targets[keep] - 1, reduction="sum")
    return total, keep.sum()


# (needed soft-label keys, function(student, soft, T, options) -> (sum, count))
_KD: dict[str, tuple[tuple[str, ...], Callable[..., tuple[Tensor, Tensor]]]] = {
    "kl_topk": (("topk_ids", "topk_logits"), lambda s, d, T, o: kl_topk(s, d["topk_ids"], d["topk_logits"], T, **o)),
    "kl_topk_tail": (
        ("topk_ids", "topk_logits", "lse"),
        lambda s, d, T, o: kl_topk_tail(s, d["topk_ids"], d["topk_logits"], d["lse"], T, **o),
    ),
    "kl_sampled": (
        ("sampled_ids", "sampled_counts", "sampled_logits"),
        lambda s, d, T, o: kl_sampled(
            s, d["sampled_ids"], d["sampled_counts"], d["sampled_logits"], d.get("lse"), T, **o
        ),
    ),
    "reverse_kl": (
        ("topk_ids", "topk_logits"),
        lambda s, d, T, o: reverse_kl_topk(s, d["topk_ids"], d["topk_logits"], T, **o),
    ),
    "jsd": (
        ("topk_ids", "topk_logits", "lse"),
        lambda s, d, T, o: jsd_topk(s, d["topk_ids"], d["topk_logits"], d["lse"], T, **o),
    ),
    "ranking": (
        ("topk_ids",),
        lambda s, d, T, o: ranking_distillation(
            s, d["topk_ids"], **{"K": min(10, d["topk_ids"].shape[1]), **o}
        ),
    ),
}
assert tuple(_KD) == KINDS


def distillation_loss(
    kind: str,
    alpha: float,
    temperature: float,
    student_logits: Tensor,
    targets: Tensor,
    soft: Optional[Mapping[str, Tensor]],
    **kd_options,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """``alpha * hard_CE + (1 - alpha) * KD(kind)``, summed over positions with a target.

    Args:
        kind: one of :data:`KINDS` (= ``DistillConfig.loss``): "kl_topk" (:func:`kl_topk`),
            "kl_topk_tail" (:func:`kl_topk_tail`), "kl_sampled" (:func:`kl_sampled`),
            "reverse_kl" (:func:`reverse_kl_topk`), "jsd" (:func:`jsd_topk`), "ranking"
            (:func:`ranking_distillation`, K = min(10, k) unless given).
        alpha: weight of the hard-label term in [0, 1]. ``alpha == 1`` never reads
            ``soft`` (it may be None or empty: the no-teacher baseline); ``alpha == 0``
            skips the hard-label term.
        temperature: T > 0 for the KD term (ignored by "ranking").
        student_logits: (P, C), column 0 = padding.
        targets: (P,) int64; 0 = the position is ignored by BOTH terms.
        soft: soft labels by store column name, each with P rows: "topk_ids",
            "topk_logits", "lse", "sampled_ids", "sampled_counts", "sampled_logits";
            only those ``kind`` needs are read.
        **kd_options: passed to the KD function (e.g. ``K``, ``lambda_``,
            ``negative_weight`` for "ranking").

    Returns:
        ``(loss_sum, count, parts)``: the mixed sum, the number of positions with a
        target, and the detached unweighted sums of the computed terms,
        ``parts["hard"]`` (if alpha > 0) and ``parts["kd"]`` (if alpha < 1). Normalise
        all three by the global count.
    """
    if kind not in _KD:
        raise ValueError(f"unknown distillation loss {kind!r}; valid kinds: {', '.join(KINDS)}")
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    T = _check_temperature(temperature)
    if student_logits.dim() != 2 or targets.shape != student_logits.shape[:1]:
        raise ValueError(
            f"expected student_logits (P, C) and targets (P,), got {tuple(student_logits.shape)} and {tuple(targets.shape)}"
        )
    keep = targets != PAD_ID
    count = keep.sum()
    s = student_logits[keep]  # select once; the terms below then see only kept rows
    parts: dict[str, Tensor] = {}
    terms = []
    if alpha > 0.0:
        hard, _ = hard_label_ce(s, targets[keep])
        parts["hard"] = hard.detach()
        terms.append(hard if alpha == 1.0 else alpha * hard)
    if alpha < 1.0:
        needed, fn = _KD[kind]
        missing = [name for name in needed if soft is None or name not in soft]
        if missing:
            have = sorted(soft) if soft else []
            raise ValueError(f"distillation loss {kind!r} needs soft labels {missing}; got {have}")
        rows = {name: t[keep.to(t.device)] for name, t in soft.items() if name in needed or name == "lse"}
        kd, _ = fn(s, rows, T, kd_options)
        parts["kd"] = kd.detach()
        terms.append(kd if alpha == 0.0 else (1.0 - alpha) * kd)
    loss = terms[0] if len(terms) == 1 else terms[0] + terms[1]
    return loss, count, parts
