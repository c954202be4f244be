"""Pieces of data-parallel training that do not depend on Ray: batch plans, the
next-item objective as one module (so ZeRO-3 gathers every weight it touches
inside a forward), and distributed full-ranking evaluation.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from distill.evaluate import left_pad_list_array
from distill.metrics import RankingAccumulator, seen_mask, target_ranks
from distill.hints import ItemEmbeddingHint
from distill.losses import term_weights
from distill.model import PAD_ID, SequentialRecommender


def epoch_permutation(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The global sample order of an epoch: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def rank_batches(num_rows: int, global_batch: int, seed: int, epoch: int, rank: int, world: int) -> list[np.ndarray]:
    """Row indices this rank trains on at each step of an epoch.

    Step s covers rows ``perm[s*B:(s+1)*B]`` of the epoch permutation and rank r takes
    every W-th of them, so the global batch does not depend on W. Every rank gets the
    same number of steps (ZeRO-3 needs all ranks in every forward); a rank may get an
    empty share on a short last step.
    """
    perm = epoch_permutation(num_rows, seed, epoch)
    steps = math.ceil(num_rows / global_batch)
    return [perm[s * global_batch : (s + 1) * global_batch][rank::world] for s in range(steps)]


def lockstep_batches(num_rows: int, batch_size: int, rank: int, world: int) -> list[tuple[np.ndarray, int]]:
    """Rows ``rank::world`` in batches; every rank gets ``ceil(ceil(N/W)/B)`` batches.

    Returns ``(row indices, number of real rows)`` per batch. A batch with fewer real
    rows than ``batch_size`` is padded by repeating its first row (or row 0), so the
    forward still runs; callers drop everything past the real rows.
    """
    mine = np.arange(rank, num_rows, world)
    num_batches = math.ceil(math.ceil(num_rows / world) / batch_size)
    out = []
    for b in range(num_batches):
        rows = mine[b * batch_size : (b + 1) * batch_size]
        real = len(rows)
        if real < batch_size:
            filler = rows[0] if real else 0
            rows = np.concatenate([rows, np.full(batch_size - real, filler, dtype=rows.dtype)])
        out.append((rows, real))
    return out



class NextItemObjective(nn.Module):
    """Wraps a model so that one ``forward`` returns (sum of next-item losses, target count).

    Returning a sum lets the caller normalise by the *global* number of targets, so the
    gradient is the same whatever the worker count.
    """

    def __init__(self, model: SequentialRecommender, loss: str = "full_ce", num_negatives: int = 256):
        super().__init__()
        self.model = model
        self.loss = loss
        self.num_negatives = num_negatives

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model(inputs)  # (B, L, d)
        keep = targets != PAD_ID
        h, t = hidden[keep], targets[keep]  # (M, d), (M,)
        if self.loss == "full_ce":
            logits = self.model.scores(h)  # (M, C); the padding column is never the target
            total = F.cross_entropy(logits.float(), t, reduction="sum")
        else:
            total = self._sampled(h, t)
        return total, keep.sum()

    def _sampled(self, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Sampled softmax with uniform shared negatives and logQ correction (see objectives.py)."""
        num_classes = self.model.num_scores
        negatives = torch.randint(1, num_classes, (self.num_negatives,), device=h.device)
        # Look rows up through the embedding module so ZeRO-3 gathers the table.
        pos = (h * self.model.item_vectors(t)).sum(-1, keepdim=True)
        neg = h @ self.model.item_vectors(negatives).T - math.log(self.num_negatives / (num_classes - 1))
        neg = neg.masked_fill(negatives[None, :] == t[:, None], float("-inf"))
        logits = torch.cat([pos, neg], dim=1).float()
        return F.cross_entropy(logits, torch.zeros_like(t), reduction="sum")


def mixed_loss(
    terms: dict[str, tuple[torch.Tensor, torch.Tensor]], alpha: float, world: int, device: torch.device,
    hint_weight: float = 0.0,
) -> tuple[torch.Tensor, float]:
    """The step's loss from :func:`distill.losses.distillation_terms`: ``alpha * hard + (1 - alpha) * kd``
    (plus ``hint_weight *`` a ``"hint"`` term, :mod:`distill.hints`, when there is one),
    each term's sum divided by its position (or item) count over *all* workers.

    Counting globally keeps the gradient independent of the worker count; the result is
    multiplied by ``world`` because DDP averages gradients over ranks. The two terms have
    their own counts: with teacher-labelled augmented rows the KD term covers more
    positions than the hard one, and a shared count would quietly shrink alpha.
    Returns ``(loss to backpropagate, this worker's mixed per-position loss for logging)``.
    """
    names = list(terms)
    counts = torch.stack([terms[name][1].to(device=device, dtype=torch.float32) for name in names])
    if world > 1:
        torch.distributed.all_reduce(counts)
    weight = {**term_weights(alpha), "hint": float(hint_weight)}
    loss = sum(weight[name] * terms[name][0] * world / counts[i].clamp(min=1.0) for i, name in enumerate(names))
    local = sum(weight[name] * float(terms[name][0].detach()) / max(float(terms[name][1]), 1.0) for name in names)
    return loss, local


def seed_step(seed: int, epoch: int, step: int, rank: int) -> None:
    """Seed torch's generators (dropout) from (seed, epoch, step, rank) before a training step.

    Every step's randomness is then a pure function of where it is, not of the RNG history:
    a run resumed from a checkpoint at step s draws the same dropout masks from step s on as
    the run that never stopped, with no RNG state in the checkpoint (and at any worker count,
    each rank's masks are defined).
    """
    mixed = np.random.SeedSequence([seed, epoch, step, rank]).generate_state(2, np.uint64)
    torch.manual_seed(int(mixed[0] >> np.uint64(1)))


def lr_ratio(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """The learning rate at optimiser step ``step`` (0-based) as a fraction of the configured lr.

    Linear warm-up from 0 over ``warmup_steps``, then 1 (``"constant"``) or a cosine
    from 1 down to 0 at ``total_steps`` (``"cosine"``; it stays at 0 past the end).
    The same formula as DeepSpeed's ``WarmupLR`` / ``WarmupCosineLR`` (linear warm-up,
    of at least 2 steps when there is one, always for the cosine; floor 0), which the teacher uses. A pure function of the step, so a resumed or
    resized run needs no scheduler state in its checkpoint.
    """
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"unknown lr schedule {schedule!r}: expected 'constant' or 'cosine'")
    if schedule == "cosine" or warmup_steps > 0:
        warmup_steps = max(warmup_steps, 2)  # as DeepSpeed's schedulers (WarmupCosineLR always warms up)
    if step < warmup_steps:
        return step / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps + 1) / max(1, total_steps - warmup_steps))
    return (1.0 + math.cos(math.pi * progress)) / 2.0


def check_checkpoint_stage(saved_state: dict, fingerprint: str, where: str) -> None:
    """Refuse to resume a checkpoint that other training settings made (see ``distill.config.stage_fingerprint``).

    Checkpoints from before fingerprints were recorded carry none and are accepted.
    """
    recorded = saved_state.get("stage_fingerprint")
    if recorded is not None and recorded != fingerprint:
        raise ValueError(
            f"the checkpoint at {where} was made with other training settings (stage fingerprint {recorded}, "
            f"this run's {fingerprint}); resuming it would mix two configurations. Use another run.run_dir, "
            "or delete the old stage's output and checkpoints to start it over"
        )


def training_sequences(train: pa.Table, max_len: int) -> list[np.ndarray]:
    """Users' training histories with at least 2 items (one next-item pair), most recent max_len+1 items."""
    return training_sequences_with_users(train, max_len)[1]


def training_sequences_with_users(train: pa.Table, max_len: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """(users, sequences): as :func:`training_sequences`, with each sequence's user id, in table order."""
    lists = train.column("items").combine_chunks()
    all_users = train.column("user").to_numpy()
    offsets = lists.offsets.to_numpy()
    values = lists.flatten().to_numpy(zero_copy_only=False)
    users, seqs = [], []
    for user, start, end in zip(all_users, offsets[:-1], offsets[1:]):
        if end - start >= 2:
            users.append(user)
            seqs.append(values[max(start, end - max_len - 1) : end])
    return np.asarray(users, dtype=np.int64), seqs


def distributed_ranking_eval(
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    split: pa.Table,
    num_items: int,
    ks: list[int] | tuple[int, ...],
    batch_size: int,
    rank: int,
    world: int,
    device: torch.device | str,
    max_len: int,
) -> dict[str, float]:
    """Seen-filtered HR@K / NDCG@K over ``split``, users dealt round-robin to ranks.

    Every rank runs the same number of forward passes (see :func:`lockstep_batches`),
    which ZeRO-3's collectives require. Sums are all-reduced.
    """
    import torch.distributed as dist

    acc = RankingAccumulator(ks)
    for rows, real in lockstep_batches(split.num_rows, batch_size, rank, world):
        chunk = split.take(pa.array(rows))
        histories = torch.from_numpy(left_pad_list_array(chunk.column("history"))).to(device)
        targets = torch.from_numpy(chunk.column("target").to_numpy().astype(np.int64)).to(device)
        with torch.no_grad():
            scores = score_fn(histories[:, -max_len:]).float()
        if real:
            exclude = seen_mask(histories[:real], num_items + 1)
            acc.add(target_ranks(scores[:real], targets[:real], exclude=exclude).cpu())
    keys = sorted(acc.sums)
    totals = torch.tensor([acc.sums[k] for k in keys] + [acc.count], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    count = max(float(totals[-1]), 1.0)
    return {k: float(v) / count for k, v in zip(keys, totals[:-1])}


class PositionLogits(nn.Module):
    """Student logits at the real positions only: (B, L) -> (P, C), fp32. One module, so DDP sees every weight in forward.

    ``bf16``: the forward (chiefly the (P, d) x (d, C) catalog matmul, the student's largest
    cost) runs under bf16 autocast; the logits come back as fp32, so the losses' softmax over
    the catalog stays fp32. The weights and the optimiser stay fp32 either way.
    """

    def __init__(self, model: SequentialRecommender, bf16: bool = False, hint: Optional[ItemEmbeddingHint] = None):
        super().__init__()
        self.model = model
        self.bf16 = bf16
        self.hint = hint  # item-embedding distillation (distill.embedding_hint): its projection trains under DDP too

    def forward(self, inputs: torch.Tensor, hint_items: Optional[torch.Tensor] = None):
        """-> (P, C) logits; with ``hint_items`` (the hint's items this step), ``(logits, (hint sum, count))``."""
        with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            hidden = self.model(inputs)
            logits = self.model.scores(hidden[inputs != PAD_ID])
        if hint_items is None:
            return logits.float()
        return logits.float(), self.hint(self.model.item_vectors(hint_items.to(inputs.device)), hint_items)
