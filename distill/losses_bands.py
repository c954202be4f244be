"""Plain KD plus KD within each popularity band of the teacher's top-k (after UnKD, Chen et al., WSDM 2023).

On ML-1M the teacher leads a 1/10 student trained alone by 6% on test targets among the head items and by 75%
on tail ones, and plain KD hands the student a tenth of the tail lead (README, *Where the teacher's lead is*).
One reason: in the teacher's top-k the popular items hold most of the mass, so the KL's gradient is spent on
them, and how the teacher orders the tail items among themselves carries almost no weight. UnKD distils within
popularity groups instead. Here each band's term is added to the plain top-k + tail KL (which keeps the
between-band mass the student needs for its head items):

    T^2 * [ KL(p || q) over the top-k + tail buckets
            + band_weight * sum_b KL(p_b || q_b) ]

where ``p_b`` and ``q_b`` are the teacher's and the student's distributions over the row's top-k items of band b,
each renormalised within the band (a band with fewer than two of them adds 0). Conventions as in
:mod:`distill.losses`.
"""

from __future__ import annotations

from typing import Optional

import torch

from distill.losses_topk import _kl_rows, _tail_buckets

Tensor = torch.Tensor


def band_kl(
    student_topk: Tensor, teacher_topk: Tensor, topk_bands: Tensor, num_bands: int, temperature: float
) -> Tensor:
    """Per row, the sum over bands of KL(p_b || q_b) on the top-k items of each band (renormalised within it).

    Args:
        student_topk, teacher_topk: (M, k) logits at the row's top-k ids.
        topk_bands: (M, k) the band of each of those ids (0..num_bands-1).
    Returns (M,).
    """
    total = torch.zeros(student_topk.shape[0], dtype=torch.float32, device=student_topk.device)
    s, z = student_topk.float() / temperature, teacher_topk.float() / temperature
    for b in range(num_bands):
        inside = topk_bands == b
        # Items outside the band get -inf on both sides: probability 0 there, which _kl_rows counts as 0. A row with
        # none of the band's items would be all -inf (NaN): it keeps every item, and its term is then set to 0.
        empty = ~inside.any(dim=1)
        keep = inside | empty[:, None]
        log_p = torch.log_softmax(z.masked_fill(~keep, float("-inf")), dim=-1)
        log_q = torch.log_softmax(s.masked_fill(~keep, float("-inf")), dim=-1)
        kl = _kl_rows(log_p, torch.where(keep, log_q, torch.zeros_like(log_q)))
        total = total + torch.where(empty, torch.zeros_like(kl), kl)
    return total


def kl_topk_tail_bands(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logits: Tensor,
    lse: Tensor,
    temperature: float = 1.0,
    *,
    item_band: Tensor,
    band_weight: float = 1.0,
    num_bands: Optional[int] = None,
    mask: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """:func:`distill.losses_topk.kl_topk_tail` plus ``band_weight`` times the within-band KL (module docstring).

    Args:
        student_logits, topk_ids, topk_logits, lse, temperature, mask: as for ``kl_topk_tail``.
        item_band: (C,) int64, the popularity band of every item id (column 0, the padding, any value), e.g.
            :func:`distill.metrics.popularity_band` of the training counts.
        band_weight: >= 0; 0 is plain ``kl_topk_tail``.
        num_bands: the bands in ``item_band`` (0..num_bands-1); None reads it from ``item_band``, a device sync
            that a training loop avoids by giving it.
    Returns ``(loss_sum, count)``.
    """
    if band_weight < 0:
        raise ValueError(f"band_weight must be >= 0, got {band_weight}")
    if item_band.dim() != 1 or item_band.shape[0] != student_logits.shape[-1]:
        raise ValueError(f"item_band must be ({student_logits.shape[-1]},), one band per item column, got {tuple(item_band.shape)}")
    log_p, log_q, count, T = _tail_buckets(student_logits, topk_ids, topk_logits, lse, temperature, mask)
    rows = _kl_rows(log_p, log_q)
    if band_weight > 0:
        keep = None if mask is None else mask.to(device=student_logits.device, dtype=torch.bool)
        s = student_logits if keep is None else student_logits[keep]
        ids = (topk_ids if keep is None else topk_ids[keep.to(topk_ids.device)]).to(s.device)
        z = (topk_logits if keep is None else topk_logits[keep.to(topk_logits.device)]).to(s.device).detach()
        bands = item_band.to(s.device)[ids]
        if num_bands is None:
            num_bands = int(item_band[1:].max()) + 1
        rows = rows + band_weight * band_kl(s.gather(1, ids), z, bands, num_bands, T)
    return rows.sum() * (T * T), count
