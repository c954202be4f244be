"""Starting a student's item table from the teacher's principal item directions."""

import pytest
import torch

from distill.config import ModelConfig
from distill.model import INIT_STD, SequentialRecommender
from distill.teacher_init import init_item_table_from_teacher, principal_item_vectors

NUM_ITEMS = 40


def teacher_items(rank: int, width: int = 16, seed: int = 0) -> torch.Tensor:
    """(NUM_ITEMS + 1, width) rows spanning a ``rank``-dimensional affine subspace; row 0 padding."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(NUM_ITEMS, rank, generator=g) @ torch.randn(rank, width, generator=g) + torch.randn(width, generator=g)
    return torch.cat([torch.zeros(1, width), rows])


def test_principal_vectors_keep_the_teachers_geometry_up_to_scale():
    items = teacher_items(rank=6)
    out = principal_item_vectors(items, width=6)
    assert out.shape == (NUM_ITEMS + 1, 6) and torch.count_nonzero(out[0]) == 0
    assert out[1:].std().item() == pytest.approx(INIT_STD, rel=1e-3)
    # All of the data's variance lies in 6 directions: distances between items are kept, up to one scale.
    def distances(x):
        return torch.cdist(x[1:].double(), x[1:].double(), compute_mode="donot_use_mm_for_euclid_dist")

    d_teacher, d_student = distances(items), distances(out)
    scale = d_student.sum() / d_teacher.sum()
    torch.testing.assert_close(d_student, d_teacher * scale, rtol=1e-3, atol=1e-5)


def test_principal_vectors_refuse_a_student_wider_than_the_teacher():
    with pytest.raises(ValueError, match="wider"):
        principal_item_vectors(teacher_items(rank=4, width=8), width=12)


def test_a_uniform_table_gets_the_principal_vectors():
    model = SequentialRecommender(ModelConfig(d_model=8, num_layers=1, num_heads=2, ffn_dim=16, max_len=5), NUM_ITEMS)
    items = teacher_items(rank=10)
    init_item_table_from_teacher(model, items)
    torch.testing.assert_close(model.item_emb.weight, principal_item_vectors(items, 8))
    assert model.output.weight is model.item_emb.weight  # still tied


def test_each_band_of_a_mixed_table_gets_its_items_compressed_by_its_own_directions():
    cfg = ModelConfig(d_model=8, num_layers=1, num_heads=2, ffn_dim=16, max_len=5,
                      item_dims=[{"items": 10, "dim": 8}, {"items": 3, "dim": 4}, {"dim": 3}])
    model = SequentialRecommender(cfg, NUM_ITEMS)
    model.item_table.set_item_order(torch.randperm(NUM_ITEMS + 1).float())
    items = teacher_items(rank=10)
    init_item_table_from_teacher(model, items)
    target = principal_item_vectors(items, 8)
    with torch.no_grad():
        got = model.item_table()
    by_row = torch.argsort(model.item_table.item_row)[1:]  # item ids, most popular first
    torch.testing.assert_close(got[by_row[:10]], target[by_row[:10]])  # the full-width band: exact
    # 3 items in a 4-wide band: rank 3 <= 4, so also exact.
    torch.testing.assert_close(got[by_row[10:13]], target[by_row[10:13]], rtol=1e-4, atol=1e-6)
    # 27 items 3 wide: the best rank-3 approximation, better than any random 3-dim projection.
    rest, approx = target[by_row[13:]], got[by_row[13:]]
    assert torch.linalg.matrix_rank(approx) <= 3
    q = torch.linalg.qr(torch.randn(8, 3)).Q
    assert (rest - approx).norm() < (rest - rest @ q @ q.T).norm() < rest.norm()


def test_a_teacher_of_another_catalog_is_refused():
    model = SequentialRecommender(ModelConfig(d_model=8, num_layers=1, num_heads=2, ffn_dim=16, max_len=5), NUM_ITEMS + 5)
    with pytest.raises(ValueError, match="rows"):
        init_item_table_from_teacher(model, teacher_items(rank=4))
