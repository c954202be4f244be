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

Where things live
-----------------
This module holds these conventions, :data:`KINDS`, the hard-label term
:func:`hard_label_ce`, the KD registry and the dispatcher :func:`distillation_loss`. The
KD terms live in :mod:`distill.losses_topk` (forward KL on the top-k, with or without a
tail bucket, the shared helpers, and the teacher's tail approximation at T != 1) and
:mod:`distill.losses_alt` (reverse KL, JSD, sampled KL, ranking distillation), :mod:`distill.losses_dkd`
(decoupled KD) and :mod:`distill.losses_bands` (plain KD plus KD within popularity bands). Every
public name is re-exported here, so import them from ``distill.losses``.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch

from distill.losses_dkd import dkd_topk_tail
from distill.losses_alt import jsd_topk, kl_sampled, ranking_distillation, reverse_kl_topk
from distill.losses_bands import kl_topk_tail_bands
from distill.losses_topk import (_check_temperature, kl_topk, kl_topk_tail, real_item_logsumexp, select_rows,
                                 teacher_bucket_log_probs)
from distill.model import PAD_ID

__all__ = [
    "KINDS",
    "distillation_loss",
    "distillation_terms",
    "term_weights",
    "dkd_topk_tail",
    "hard_label_ce",
    "jsd_topk",
    "kl_sampled",
    "kl_topk",
    "kl_topk_tail",
    "kl_topk_tail_bands",
    "ranking_distillation",
    "reverse_kl_topk",
    "teacher_bucket_log_probs",
]

Tensor = torch.Tensor

#: The KD terms :func:`distillation_loss` knows; the same names as ``DistillConfig.loss``.
KINDS = ("kl_topk", "kl_topk_tail", "kl_sampled", "reverse_kl", "jsd", "ranking", "dkd", "kl_bands")


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
    all_kept = bool(keep.all())
    logits = select_rows(student_logits, keep, all_kept).float()  # (M, C): column j is item j
    # -log softmax at the target = the real items' logsumexp minus the target's logit (no slice of the
    # logits matrix, whose backward would fill and copy a second one).
    picked = logits.gather(1, select_rows(targets, keep, all_kept)[:, None])
    total = (real_item_logsumexp(logits) - picked).sum()
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
    "dkd": (
        ("topk_ids", "topk_logits", "lse", "targets"),
        lambda s, d, T, o: dkd_topk_tail(s, d["topk_ids"], d["topk_logits"], d["lse"], d["targets"], T, **o),
    ),
    "kl_bands": (
        ("topk_ids", "topk_logits", "lse"),
        lambda s, d, T, o: kl_topk_tail_bands(s, d["topk_ids"], d["topk_logits"], d["lse"], T, **o),
    ),
}
assert tuple(_KD) == KINDS


def term_weights(alpha: float) -> dict[str, float]:
    """The weight of each term of :func:`distillation_terms` in the loss: alpha for the hard label, 1 - alpha for KD."""
    return {"hard": float(alpha), "kd": 1.0 - float(alpha)}


def distillation_terms(
    kind: str,
    alpha: float,
    temperature: float,
    student_logits: Tensor,
    targets: Tensor,
    soft: Optional[Mapping[str, Tensor]],
    augmented: Optional[Tensor] = None,
    **kd_options,
) -> dict[str, tuple[Tensor, Tensor]]:
    """The hard-label and KD terms apart, each as ``(sum, count)`` over the positions it covers.

    Arguments as :func:`distillation_loss`, plus ``augmented`` (P,) bool or None: positions
    of teacher-labelled augmented rows. The KD term covers them; the hard-label term never
    does, whatever their targets hold. Other positions count for both terms when their
    target is not 0. Returns ``{"hard": (sum, count)}`` when alpha > 0 and ``{"kd": (sum,
    count)}`` when alpha < 1: the caller normalises each sum by its own global count and
    mixes ``alpha * hard + (1 - alpha) * kd``.
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
    has_target = targets != PAD_ID
    if augmented is not None:
        if augmented.shape != targets.shape:
            raise ValueError(f"augmented must be (P,) = {tuple(targets.shape)}, got {tuple(augmented.shape)}")
        augmented = augmented.to(device=targets.device, dtype=torch.bool)
    terms: dict[str, tuple[Tensor, Tensor]] = {}
    if alpha > 0.0:
        # hard_label_ce skips target 0: augmented positions become "no target" and are selected out there, once.
        terms["hard"] = hard_label_ce(student_logits, targets if augmented is None else targets.masked_fill(augmented, PAD_ID))
    if alpha < 1.0:
        needed, fn = _KD[kind]
        missing = [name for name in needed if name != "targets" and (soft is None or name not in soft)]
        if missing:
            have = sorted(soft) if soft else []
            raise ValueError(f"distillation loss {kind!r} needs soft labels {missing}; got {have}")
        kd_rows = has_target if augmented is None else has_target | augmented
        if "targets" in needed:  # dkd: the true next item, none (0) on augmented positions
            soft = {**soft, "targets": targets if augmented is None else targets.masked_fill(augmented, PAD_ID)}
        all_kept = bool(kd_rows.all())
        rows = {name: select_rows(t, kd_rows, all_kept) for name, t in soft.items() if name in needed or name == "lse"}
        kd, _ = fn(select_rows(student_logits, kd_rows, all_kept), rows, T, kd_options)
        terms["kd"] = (kd, kd_rows.sum())
    return terms


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
            (:func:`ranking_distillation`, K = min(10, k) unless given), "dkd"
            (:func:`dkd_topk_tail`, decoupled target / non-target terms), "kl_bands"
            (:func:`kl_topk_tail_bands`, plus KD within popularity bands: needs ``item_band``).
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
        all three by the global count. (Both terms cover the same positions here; with
        augmented rows they do not: use :func:`distillation_terms`.)
    """
    terms = distillation_terms(kind, alpha, temperature, student_logits, targets, soft, **kd_options)
    alpha = float(alpha)
    count = (targets != PAD_ID).sum()
    parts = {name: value.detach() for name, (value, _) in terms.items()}
    weights = term_weights(alpha)
    weighted = [value if weights[name] == 1.0 else weights[name] * value for name, (value, _) in terms.items()]
    loss = weighted[0] if len(weighted) == 1 else weighted[0] + weighted[1]
    return loss, count, parts
