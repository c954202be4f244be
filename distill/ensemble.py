"""A teacher ensemble's distribution: the mixture of its members' next-item distributions.

Averaging probabilities (not logits) keeps each member's full distribution: an item one
member is sure of and another has never seen gets half the first's mass, where a logit
average would let one member's scale drown the other.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch


def ensemble_log_probs(scores: Iterable[torch.Tensor]) -> torch.Tensor:
    """``log(mean_m softmax(scores_m))`` over the real items, for M members' (..., C) scores.

    ``scores`` may be a generator: members are folded in one at a time, so only one member's
    scores and the running mixture are alive at once. Column 0 (padding) is left out of every
    softmax and holds the dtype's min in the result, as the model's own scores do. The result
    is a log-probability vector (its logsumexp over the real items is 0), usable wherever raw
    teacher logits are: top-k, the log-normaliser, sampling.
    """
    mixed = mixture_log_probs(torch.log_softmax(member[..., 1:].float(), dim=-1) for member in scores)
    pad = torch.full_like(mixed[..., :1], torch.finfo(mixed.dtype).min)
    return torch.cat([pad, mixed], dim=-1)


def mixture_log_probs(log_probs: Iterable[torch.Tensor]) -> torch.Tensor:
    """``log(mean_m p_m)`` of M members' (..., R) log-probabilities (e.g. rating distributions), folded in one at a time."""
    mixed, count, shape = None, 0, None
    for log_p in log_probs:
        if mixed is None:
            mixed, shape = log_p.float(), tuple(log_p.shape)
        elif tuple(log_p.shape) != shape:
            raise ValueError(f"ensemble members' scores differ in shape: {shape} and {tuple(log_p.shape)}")
        else:
            mixed = torch.logaddexp(mixed, log_p.float())
        count += 1
    if mixed is None:
        raise ValueError("an ensemble needs at least one member's scores")
    return mixed - math.log(count)
