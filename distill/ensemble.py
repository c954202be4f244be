"""A teacher ensemble's distribution: the mixture of its members' next-item distributions.

Averaging probabilities (not logits) keeps each member's full distribution: an item one
member is sure of and another has never seen gets half the first's mass, where a logit
average would let one member's scale drown the other.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def ensemble_log_probs(scores: Sequence[torch.Tensor]) -> torch.Tensor:
    """``log(mean_m softmax(scores_m))`` over the real items, for M members' (..., C) scores.

    Column 0 (padding) is left out of every softmax and holds the dtype's min in the result,
    as the model's own scores do. The result is a log-probability vector (its logsumexp over
    the real items is 0), usable wherever raw teacher logits are: top-k, the log-normaliser,
    sampling.
    """
    if not scores:
        raise ValueError("an ensemble needs at least one member's scores")
    shapes = {tuple(s.shape) for s in scores}
    if len(shapes) != 1:
        raise ValueError(f"ensemble members' scores differ in shape: {sorted(shapes)}")
    real = torch.stack([torch.log_softmax(s[..., 1:].float(), dim=-1) for s in scores])  # (M, ..., C-1)
    mixed = torch.logsumexp(real, dim=0) - math.log(len(scores))
    pad = torch.full_like(mixed[..., :1], torch.finfo(mixed.dtype).min)
    return torch.cat([pad, mixed], dim=-1)
