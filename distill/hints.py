"""Item-embedding distillation: the student's item vectors, through a learned projection, toward its teacher's.

The soft labels carry what the teacher predicts; its item table carries how it places the
items relative to one another, which a small student learns poorly for the items it sees
rarely (the narrow bands of a mixed-dimension table). This term pulls each student item
vector ``e_s(i)`` (width ``d_s``), mapped by a learned ``W`` (``d_s x d_t``), toward the
teacher's ``e_t(i)``: ``1 - cos(e_s(i) W, e_t(i))``. The projection is what makes it work
across widths (DE-RRD, DLLM2Rec distil through one; unprojected hints can hurt), and the
cosine leaves both tables their own scale. The twin never gets this term: it is part of
what the teacher gives. The projection is used in training only and is not exported.

Each step scores a sample of items (all of them when the catalog is small), drawn from
torch's generator, which the recipe seeds per step: a resumed run draws the same items.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Items scored per step: all of them up to this many, a uniform sample of this many above.
HINT_ITEMS_PER_STEP = 4096


def embedding_hint_loss(student_vectors: torch.Tensor, projection: torch.Tensor, teacher_vectors: torch.Tensor) -> torch.Tensor:
    """Sum over rows of ``1 - cos(student_vectors @ projection, teacher_vectors)``.

    Args:
        student_vectors: (N, d_s) the student's vectors of N items.
        projection: (d_s, d_t) the learned map into the teacher's space.
        teacher_vectors: (N, d_t) the teacher's vectors of the same items.

    Returns:
        Scalar sum (0 for N = 0), in [0, 2N]. A zero vector on either side counts as
        orthogonal (distance 1), not as NaN.
    """
    mapped = F.normalize((student_vectors @ projection).float(), dim=-1)
    target = F.normalize(teacher_vectors.float(), dim=-1)
    return (1.0 - (mapped * target).sum(-1)).sum()


def hint_items(num_scores: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The item ids one step scores: every real item (1..C-1) for a small catalog, else a uniform sample."""
    if num_scores - 1 <= HINT_ITEMS_PER_STEP:
        return torch.arange(1, num_scores)
    return torch.randint(1, num_scores, (HINT_ITEMS_PER_STEP,), generator=generator)


class ItemEmbeddingHint(nn.Module):
    """The learned projection, and the teacher's item table it aims at (a constant, not a buffer:
    it is neither saved with the student nor broadcast by DDP)."""

    def __init__(self, student_dim: int, teacher_items: torch.Tensor):
        super().__init__()
        if teacher_items.dim() != 2:
            raise ValueError(f"the teacher's item table must be (items, width), got shape {tuple(teacher_items.shape)}")
        self.teacher_items = teacher_items.detach().float()
        # std 1/sqrt(d_s): a projected vector starts at its input's scale (the cosine ignores it anyway).
        self.projection = nn.Parameter(torch.randn(student_dim, teacher_items.shape[1]) / student_dim ** 0.5)

    def to(self, *args, **kwargs) -> "ItemEmbeddingHint":
        moved = super().to(*args, **kwargs)
        moved.teacher_items = self.teacher_items.to(*args, **kwargs)
        return moved

    def forward(self, student_vectors: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, d_s) student vectors of ``items`` (N,) -> (sum of the hint over them, N)."""
        if int(items.max()) >= self.teacher_items.shape[0]:
            raise ValueError(f"item id {int(items.max())} is past the teacher's table of {self.teacher_items.shape[0]} rows")
        total = embedding_hint_loss(student_vectors, self.projection, self.teacher_items[items.to(self.teacher_items.device)])
        return total, torch.tensor(items.numel(), device=total.device)
