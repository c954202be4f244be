"""Start a distilled student's item table from its teacher's (embedding transfer).

The teacher's item vectors already place similar items together. A student narrower than
the teacher cannot copy them, but it can start from their top principal directions: the
``width``-dimensional projection that keeps the most of the teacher's item geometry. The
student's other weights start as usual; only the item table (uniform, or every band of a
mixed-dimension table) is replaced, and only at the start of training (never on resume).
The baseline student never gets this: it is part of what the teacher gives.
"""

from __future__ import annotations

import torch

from distill.model import INIT_STD, SequentialRecommender


def principal_item_vectors(teacher_items: torch.Tensor, width: int, std: float = INIT_STD) -> torch.Tensor:
    """The teacher's item vectors in their top-``width`` principal directions.

    Args:
        teacher_items: (C, d_t) the teacher's item table; row 0 is padding and is ignored.
        width: the student's d_model, ``<= d_t``.
        std: overall standard deviation of the result (the student's usual init scale), so
            the first steps behave as with a random table.

    Returns:
        (C, width) float32, row 0 zero: centred rows ``(x - mean) @ V[:, :width]`` rescaled.
    """
    items = teacher_items[1:].double()
    if width > items.shape[1]:
        raise ValueError(f"the student is wider ({width}) than the teacher's item vectors ({items.shape[1]})")
    centred = items - items.mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    projected = centred @ vh[:width].T
    projected = projected * (std / projected.std().clamp(min=1e-12))
    return torch.cat([projected.new_zeros(1, width), projected]).float()


@torch.no_grad()
def init_item_table_from_teacher(model: SequentialRecommender, teacher_items: torch.Tensor) -> None:
    """Overwrite ``model``'s item table with :func:`principal_item_vectors` of ``teacher_items``.

    A mixed-dimension table must have its item order set first (``set_item_order``): each
    band gets its items' target vectors compressed to the band's width by that band's own
    principal directions (which become its projection).
    """
    if teacher_items.shape[0] != model.num_scores:
        raise ValueError(f"teacher item table has {teacher_items.shape[0]} rows, the student's catalog {model.num_scores}")
    target = principal_item_vectors(teacher_items, model.cfg.d_model)
    if model.item_table is None:
        model.item_emb.weight.copy_(target)
        return
    table = model.item_table
    ids_by_row = torch.argsort(table.item_row)[1:]  # item ids in row order (row 0 is padding)
    start = 0
    for b, (n, dim) in enumerate(table.bands):
        rows = target[ids_by_row[start : start + n]].double()
        band = getattr(table, f"band{b}")
        if dim == table.d_model:
            band.copy_(rows)
        else:
            _, _, vh = torch.linalg.svd(rows, full_matrices=False)
            k = min(dim, vh.shape[0])  # a band with fewer items than its width has rank <= n
            band.zero_()
            band[:, :k] = (rows @ vh[:k].T).float()
            getattr(table, f"proj{b}")[:k] = vh[:k].float()
        start += n
