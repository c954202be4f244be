"""Hard-label training losses for the teacher and the no-distillation baseline.

All functions are pure: they take tensors and return a scalar loss, the mean over
positions whose target is not the ignore id 0. Item ids index rows of ``item_emb``
(C = num_items + 1 rows, row 0 = padding). Losses are computed in float32 whatever the
input dtype, because a softmax over thousands of items in bf16 loses too much precision.

Under ZeRO-3 the ``item_emb`` weight handed in must be gathered (e.g. inside
``deepspeed.zero.GatheredParameters``); :meth:`SequentialRecommender.scores` followed by
:func:`full_softmax_ce` needs no such care.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from distill.model import PAD_ID


def _mean_over(total: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``total`` / number of kept rows; no kept rows gives 0 (still attached to the graph), not NaN."""
    return total / keep.sum().clamp(min=1)


def full_softmax_ce(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = PAD_ID) -> torch.Tensor:
    """Softmax cross-entropy over the full catalog.

    Args:
        logits: (N, C) scores, e.g. ``model.scores(hidden).flatten(0, -2)``.
        targets: (N,) int64 item ids; ``ignore_index`` positions are skipped.
        ignore_index: the id meaning "no target".

    Returns:
        Scalar mean over non-ignored rows (0 if there are none). Equal to
        ``F.cross_entropy(logits, targets, ignore_index=ignore_index)`` where that is defined.
    """
    keep = targets != ignore_index
    # Select rows first: only the kept rows are upcast to float32.
    total = F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum")
    return _mean_over(total, keep)


def full_ce_from_hidden(hidden: torch.Tensor, item_emb: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Full-catalog cross-entropy computed only where there is a target.

    Same value as ``full_softmax_ce(model.scores(hidden).flatten(0, 1), targets.flatten())``
    for a model whose output matrix is ``item_emb``, but it never materialises logits for
    padding positions (with left padding, often most of a batch), and it drops the
    padding column by scoring against ``item_emb[1:]`` instead of masking it.

    Args:
        hidden: (B, L, d) hidden states.
        item_emb: (C, d) output item matrix, row 0 = padding.
        targets: (B, L) int64, 0 = ignore.

    Returns:
        Scalar mean over positions with ``targets != 0`` (0 if there are none).
    """
    keep = targets != PAD_ID
    h = hidden[keep]  # (M, d), M = number of real targets
    logits = h @ item_emb[1:].T  # (M, C - 1): column j is item j + 1
    total = F.cross_entropy(logits.float(), targets[keep] - 1, reduction="sum")
    return _mean_over(total, keep)


def sampled_softmax_ce(
    hidden: torch.Tensor,
    item_emb: torch.Tensor,
    targets: torch.Tensor,
    num_negatives: int,
    generator: Optional[torch.Generator] = None,
    item_log_q: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Sampled softmax: the positive against K sampled negatives, with logQ correction.

    One set of K negatives is drawn per call and shared by all N positions (each
    position still sees K negatives). Per-position negatives would gather an
    (N, K, d) tensor, which for a large teacher (d = 2048, N = batch x length) does
    not fit; shared ones cost a single (K, d) gather and an (N, K) matmul.

    Negatives are drawn with replacement from the proposal q: uniform over the real
    items 1..C-1 by default, or ``exp(item_log_q)`` if given. A negative equal to a
    row's target is masked out of that row ("accidental hit").

    logQ correction: a negative's logit s_j becomes ``s_j - log(K * q_j)``, the positive's
    logit is left as is. Then ``sum_k exp(corrected s_k)`` over the K draws is an
    importance-sampling estimate of ``sum_{j != target} exp(s_j)``, so the loss
    approaches the full-softmax cross-entropy as K grows. (With uniform q the correction
    is the constant ``log(K / (C - 1))``; it does not cancel, because the positive is not
    corrected: it rescales the negatives' mass to that of the whole catalog.)

    Args:
        hidden: (N, d) hidden states at the positions to train.
        item_emb: (C, d) output item matrix, row 0 = padding.
        targets: (N,) int64 item ids in 1..C-1; 0 = ignore.
        num_negatives: K, draws per call.
        generator: RNG for the draws (on the device they are drawn on); None = global RNG.
        item_log_q: optional (C,) log proposal probabilities; entry 0 must be -inf
            (padding is never drawn). Defaults to uniform over 1..C-1.

    Returns:
        Scalar mean over rows with ``targets != 0`` (0 if there are none).
    """
    num_classes = item_emb.shape[0]
    if num_classes < 2:
        raise ValueError("item_emb needs at least one real item (C >= 2)")
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
    draw_device = generator.device if generator is not None else torch.device("cpu")

    if item_log_q is None:
        negatives = torch.randint(1, num_classes, (num_negatives,), generator=generator, device=draw_device)
        neg_log_q = torch.full((num_negatives,), -math.log(num_classes - 1), device=hidden.device)
    else:
        if item_log_q.shape != (num_classes,):
            raise ValueError(f"item_log_q must have shape ({num_classes},), got {tuple(item_log_q.shape)}")
        probs = item_log_q.float().exp().to(draw_device)
        if probs[PAD_ID] != 0:
            raise ValueError("item_log_q[0] must be -inf: the padding id cannot be a negative")
        negatives = torch.multinomial(probs, num_negatives, replacement=True, generator=generator)
        neg_log_q = item_log_q.float().to(hidden.device)[negatives.to(hidden.device)]
    negatives = negatives.to(hidden.device)

    keep = targets != PAD_ID
    h = hidden[keep].float()  # (M, d)
    pos = targets[keep]  # (M,)
    pos_logits = (h * item_emb[pos].float()).sum(-1, keepdim=True)  # (M, 1)
    neg_logits = h @ item_emb[negatives].float().T  # (M, K)
    neg_logits = neg_logits - (math.log(num_negatives) + neg_log_q)  # logQ correction
    accidental_hit = negatives.unsqueeze(0) == pos.unsqueeze(1)  # (M, K)
    neg_logits = neg_logits.masked_fill(accidental_hit, float("-inf"))

    # The positive sits in column 0; it is always finite, so no row is all -inf.
    logits = torch.cat([pos_logits, neg_logits], dim=1)  # (M, 1 + K)
    zeros = torch.zeros(len(pos), dtype=torch.long, device=hidden.device)
    total = F.cross_entropy(logits, zeros, reduction="sum")
    return _mean_over(total, keep)
