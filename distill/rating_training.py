"""Training and validation pieces of the rating task (the next-item task's are in :mod:`distill.training`).

A training sequence is a user's time-ordered (item, rating level) pairs; every position with a
history is a training example: the rating of its item given the pairs before it
(:meth:`distill.rating_model.RatingModel.sequence_logits`).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from distill.evaluate import left_pad_list_array
from distill.rating import per_example_errors
from distill.rating_model import RatingModel
from distill.sequences import left_pad_flat
from distill.training import lockstep_batches

RatingSequence = tuple[np.ndarray, np.ndarray]  # (items, levels), oldest first


def rating_training_sequences(train: pa.Table, max_len: int) -> list[RatingSequence]:
    """Users' training (items, levels) with at least 2 pairs (one example), the most recent ``max_len + 1``."""
    return rating_sequences_with_users(train, max_len)[1]


def rating_sequences_with_users(train: pa.Table, max_len: int) -> tuple[np.ndarray, list[RatingSequence]]:
    """(users, sequences): as :func:`rating_training_sequences`, with each sequence's user id, in table order."""
    items, levels = train.column("items").combine_chunks(), train.column("levels").combine_chunks()
    offsets = items.offsets.to_numpy()
    item_values = items.flatten().to_numpy(zero_copy_only=False)
    level_values = levels.flatten().to_numpy(zero_copy_only=False)
    keep = np.flatnonzero(np.diff(offsets) >= 2)
    users = train.column("user").to_numpy()[keep].astype(np.int64)
    windows = [(max(offsets[i], offsets[i + 1] - max_len - 1), offsets[i + 1]) for i in keep]
    return users, [(item_values[s:e], level_values[s:e]) for s, e in windows]


def rating_batch(seqs: list[RatingSequence], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(items, levels), each (B, max_len + 1) int64, left-padded with 0 (a whole sequence: inputs and targets)."""
    width = max_len + 1
    lengths = np.array([min(len(items), width) for items, _ in seqs])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    items = np.concatenate([s[0][-n:] for s, n in zip(seqs, lengths)]).astype(np.int64)
    levels = np.concatenate([s[1][-n:] for s, n in zip(seqs, lengths)]).astype(np.int64)
    return torch.from_numpy(left_pad_flat(items, offsets, width)), torch.from_numpy(left_pad_flat(levels, offsets, width))


class RatingObjective(nn.Module):
    """The teacher's (and the twin's) loss: cross-entropy of each position's rating. ``forward`` returns
    ``(sum of losses, number of examples)`` so that ranks can weigh their shares of a global batch."""

    def __init__(self, model: RatingModel):
        super().__init__()
        self.model = model

    def forward(self, items: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, targets, valid = self.model.sequence_logits(items, levels)
        total = F.cross_entropy(logits[valid].float(), targets[valid], reduction="sum")
        return total, valid.sum()


class RatingPositions(nn.Module):
    """The student's forward on whole (B, W) sequences of items and levels: (P, R) fp32 logits and (P,) target levels
    of the real positions, row-major. One module, so DDP sees every weight in forward."""

    def __init__(self, model: RatingModel, bf16: bool = False):
        super().__init__()
        self.model, self.bf16 = model, bf16

    def forward(self, items: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(items.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits, targets, valid = self.model.sequence_logits(items, levels)
        return logits[valid].float(), targets[valid]


def split_examples(split: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A valid/test table's (histories (N, L), history levels (N, L), target items (N,), target levels 0..R-1 (N,))."""
    return (left_pad_list_array(split.column("history")), left_pad_list_array(split.column("history_levels")),
            split.column("target").to_numpy().astype(np.int64), split.column("target_level").to_numpy().astype(np.int64) - 1)


def rating_probs(model: RatingModel, split: pa.Table, batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(N, R) predicted rating distributions of every row of a valid/test table, in row order."""
    histories, levels, targets, _ = split_examples(split)
    out = []
    with torch.no_grad():
        for start in range(0, len(targets), batch_size):
            rows = slice(start, start + batch_size)
            logits = model.predict(torch.from_numpy(histories[rows]).to(device), torch.from_numpy(levels[rows]).to(device),
                                   torch.from_numpy(targets[rows]).to(device))
            out.append(torch.softmax(logits.float(), dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, model.num_levels)


def distributed_rating_eval(model: RatingModel, split: pa.Table, values: list[float], batch_size: int, rank: int, world: int,
                            device: torch.device | str) -> dict[str, float]:
    """Validation RMSE, MAE, NLL and accuracy over ``split``, rows dealt to ranks in lockstep (ZeRO-3's collectives
    need every rank to run the same forwards); sums all-reduced."""
    import torch.distributed as dist

    histories, levels, targets, true_levels = split_examples(split)
    value_tensor = torch.tensor(values, dtype=torch.float64)
    sums = torch.zeros(5, dtype=torch.float64)  # squared error, absolute error, nll, correct, count
    for rows, real in lockstep_batches(len(targets), batch_size, rank, world):
        with torch.no_grad():
            logits = model.predict(torch.from_numpy(histories[rows]).to(device), torch.from_numpy(levels[rows]).to(device),
                                   torch.from_numpy(targets[rows]).to(device))
        if real:
            errors = per_example_errors(torch.softmax(logits[:real].float(), -1).cpu(), torch.from_numpy(true_levels[rows][:real]),
                                        value_tensor)
            sums += torch.stack([errors[k].sum() for k in ("squared_error", "absolute_error", "nll", "correct")]
                                + [torch.tensor(float(real), dtype=torch.float64)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    count = max(float(sums[4]), 1.0)
    return {"rmse": float((sums[0] / count).sqrt()), "mae": float(sums[1] / count), "nll": float(sums[2] / count),
            "accuracy": float(sums[3] / count)}
