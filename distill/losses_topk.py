"""Forward KL on the teacher's top-k soft labels, and the helpers every distillation loss shares.

Owns :func:`kl_topk` (KL on the renormalised top-k), :func:`kl_topk_tail` (KL on the top-k
plus one tail bucket), the teacher's bucket distribution :func:`teacher_bucket_log_probs`
with its tail approximation at T != 1 (below), and the package-internal helpers (argument
checks, masking, the row-wise KL, the student's top-k/tail log-probabilities) that
:mod:`distill.losses_alt` and :mod:`distill.losses` also use. Shapes, masking, the
``(loss_sum, count)`` return and the temperature conventions are documented in
:mod:`distill.losses`, which re-exports the public names.

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
from typing import Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


# --------------------------------------------------------------------------------------
# Helpers


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not t > 0 or not math.isfinite(t):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return t


def select_rows(t: Tensor, keep: Tensor, all_kept: Optional[bool] = None) -> Tensor:
    """``t[keep]``, or ``t`` itself when every row is kept (the common case: no augmented rows, every position
    with a target). Indexing copies a (P, C) logits matrix and its backward fills a zero one: a quarter of a
    student's step on CPU. ``all_kept``: the caller's ``bool(keep.all())`` (a host sync on GPU), computed once."""
    if all_kept is None:
        all_kept = bool(keep.all())
    return t if all_kept else t[keep.to(t.device)]


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
        count, all_kept = keep.sum(), bool(keep.all())
        s = select_rows(student_logits, keep, all_kept)
        slots = [select_rows(t, keep, all_kept) for t in slots]
        rows = [select_rows(t, keep, all_kept) for t in rows]
    return s.float(), [t.to(s.device) for t in slots], [t.to(s.device) for t in rows], count


def _check_topk(student: Tensor, topk_ids: Tensor, topk_logits: Optional[Tensor] = None) -> int:
    k = topk_ids.shape[1]
    if topk_logits is not None and topk_logits.shape != topk_ids.shape:
        raise ValueError(f"topk_logits {tuple(topk_logits.shape)} and topk_ids {tuple(topk_ids.shape)} differ in shape")
    if not 1 <= k <= student.shape[1] - 1:
        raise ValueError(f"k={k} must be in 1..{student.shape[1] - 1} (the number of real items)")
    # The ids index the student's columns directly: an id 0 would read the padding column, not fail.
    if topk_ids.numel() and int(topk_ids.min()) < 1:
        raise ValueError(f"topk_ids must be real item ids 1..{student.shape[1] - 1}, got {int(topk_ids.min())}")
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


class _RealItemLogSumExp(torch.autograd.Function):
    """``logsumexp(s[:, 1:])`` whose gradient is written straight into an (M, C) matrix (0 in column 0).

    Autograd's slice would allocate a zero (M, C) gradient and copy the (M, C-1) one into it: two more
    passes over the logits matrix, the largest tensor of a student's step. The gradient is autograd's own
    formula for logsumexp, ``grad * exp(s - lse)``.
    """

    @staticmethod
    def forward(ctx, s: Tensor) -> Tensor:
        lse = torch.logsumexp(s[:, 1:], dim=-1, keepdim=True)
        ctx.save_for_backward(s, lse)
        return lse

    @staticmethod
    @torch.autograd.function.once_differentiable  # its in-place backward has no gradient of its own
    def backward(ctx, grad: Tensor) -> Tensor:
        s, lse = ctx.saved_tensors
        out = (s - lse).exp_().mul_(grad)
        out[:, 0] = 0.0
        return out


def real_item_logsumexp(s: Tensor) -> Tensor:
    """(M, C) logits -> (M, 1) logsumexp over the real items (columns 1..C-1); column 0 gets no gradient."""
    return _RealItemLogSumExp.apply(s)


def _student_log_probs(s: Tensor, ids: Tensor, temperature: float, with_tail: bool) -> Tensor:
    """Student log q_T at ``ids`` (M, k), plus the exact tail bucket as a last column when ``with_tail``.

    The normaliser is over the real items 1..C-1 (column 0 excluded).
    """
    scaled = s if temperature == 1.0 else s / temperature  # (M, C): column j is item j (ids >= 1: _check_topk)
    log_norm = real_item_logsumexp(scaled)  # (M, 1)
    top = scaled.gather(1, ids) - log_norm  # (M, k)
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
        sub = scaled[rows, 1:]  # (R, C-1): column j-1 is item j
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
# Forward KL on the teacher's top-k


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
        ``(loss_sum, count)`` (see :mod:`distill.losses`). Equals the dense
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
