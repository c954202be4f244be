"""Item-embedding distillation (distill.hints) against a naive reference, and its place in the student's forward."""

import math

import pytest
import torch

from distill.config import ModelConfig
from distill.hints import HINT_ITEMS_PER_STEP, ItemEmbeddingHint, embedding_hint_loss, hint_items
from distill.model import SequentialRecommender
from distill.training import PositionLogits, mixed_loss



def naive_hint(student, projection, teacher) -> float:
    total = 0.0
    for s, t in zip(student.tolist(), teacher.tolist()):
        mapped = [sum(s[i] * projection[i][j] for i in range(len(s))) for j in range(len(projection[0]))]
        norm_m = math.sqrt(sum(v * v for v in mapped))
        norm_t = math.sqrt(sum(v * v for v in t))
        total += 1.0 - sum(a * b for a, b in zip(mapped, t)) / (norm_m * norm_t)
    return total


def test_hint_loss_matches_the_naive_cosine_distance():
    g = torch.Generator().manual_seed(0)
    student, projection, teacher = torch.randn(7, 3, generator=g), torch.randn(3, 5, generator=g), torch.randn(7, 5, generator=g)
    got = embedding_hint_loss(student, projection, teacher)
    assert float(got) == pytest.approx(naive_hint(student, projection.tolist(), teacher), rel=1e-5)
    # Scale-free on both sides; zero exactly when the projected vectors point where the teacher's do.
    assert float(embedding_hint_loss(3 * student, projection, 0.1 * teacher)) == pytest.approx(float(got), rel=1e-5)
    aligned = embedding_hint_loss(student, projection, 2.0 * (student @ projection))
    assert float(aligned) == pytest.approx(0.0, abs=1e-5)
    assert float(embedding_hint_loss(student[:0], projection, teacher[:0])) == 0.0


def test_hint_loss_has_no_nan_on_a_zero_vector():
    loss = embedding_hint_loss(torch.zeros(2, 3, requires_grad=True), torch.randn(3, 4), torch.randn(2, 4))
    assert torch.isfinite(loss) and float(loss.detach()) == pytest.approx(2.0)


def test_hint_items_are_the_whole_small_catalog_or_a_seeded_sample():
    assert hint_items(11).tolist() == list(range(1, 11))
    big = HINT_ITEMS_PER_STEP * 3
    first = hint_items(big, torch.Generator().manual_seed(5))
    again = hint_items(big, torch.Generator().manual_seed(5))
    assert len(first) == HINT_ITEMS_PER_STEP and torch.equal(first, again)
    assert int(first.min()) >= 1 and int(first.max()) < big  # never the padding row


def test_training_the_hint_aligns_the_student_items_with_the_teacher_s():
    torch.manual_seed(0)
    num_items = 30
    model = SequentialRecommender(ModelConfig(d_model=8, num_layers=1, num_heads=1, ffn_dim=16, max_len=6), num_items)
    teacher_items = torch.randn(num_items + 1, 16)
    hint = ItemEmbeddingHint(8, teacher_items)
    forward = PositionLogits(model, hint=hint)
    inputs = torch.tensor([[0, 0, 3, 4, 5, 6]])
    items = hint_items(model.num_scores)
    optimizer = torch.optim.Adam([*model.parameters(), *hint.parameters()], lr=0.05)
    losses = []
    for _ in range(60):
        logits, (total, count) = forward(inputs, items)
        assert logits.shape == (4, num_items + 1) and int(count) == num_items
        loss, _ = mixed_loss({"hint": (total, count)}, alpha=0.5, world=1, device=torch.device("cpu"), hint_weight=1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(total) / num_items)
    # Both sides learn: the projection and the student's table (a random one starts near distance 1).
    assert losses[0] > 0.6 and losses[-1] < 0.5 * losses[0]
    assert hint.projection.grad is not None and model.item_emb.weight.grad is not None
    # Without hint items the forward is the plain one (logits only), as for the twin.
    assert forward(inputs).shape == (4, num_items + 1)


def test_mixed_loss_weights_the_hint_by_its_own_count():
    hard = (torch.tensor(6.0), torch.tensor(3))
    kd = (torch.tensor(4.0), torch.tensor(4))
    hint = (torch.tensor(10.0), torch.tensor(20))
    loss, local = mixed_loss({"hard": hard, "kd": kd, "hint": hint}, alpha=0.25, world=1, device=torch.device("cpu"),
                             hint_weight=0.5)
    expected = 0.25 * 6 / 3 + 0.75 * 4 / 4 + 0.5 * 10 / 20
    assert float(loss) == pytest.approx(expected) and local == pytest.approx(expected)
    # Off (weight 0), the hint adds nothing.
    off, _ = mixed_loss({"hard": hard, "kd": kd, "hint": hint}, alpha=0.25, world=1, device=torch.device("cpu"))
    assert float(off) == pytest.approx(0.25 * 2 + 0.75)
