"""Training losses against straightforward references."""

import pytest
import torch
import torch.nn.functional as F

from distill.config import ModelConfig
from distill.model import SequentialRecommender
from distill.objectives import full_ce_from_hidden, full_softmax_ce, sampled_softmax_ce


def test_full_softmax_ce_equals_torch_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(20, 9, requires_grad=True)
    targets = torch.randint(0, 9, (20,))
    targets[:5] = 0  # some ignored rows
    ours = full_softmax_ce(logits, targets)
    ref = F.cross_entropy(logits, targets, ignore_index=0)
    torch.testing.assert_close(ours, ref)
    g_ours, = torch.autograd.grad(ours, logits)
    g_ref, = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g_ours, g_ref)


def test_all_ignored_gives_zero_with_a_graph_not_nan():
    logits = torch.randn(4, 5, requires_grad=True)
    loss = full_softmax_ce(logits, torch.zeros(4, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()  # still differentiable, e.g. for an empty shard on one worker
    assert torch.count_nonzero(logits.grad) == 0


def test_full_ce_from_hidden_matches_model_scores():
    torch.manual_seed(0)
    model = SequentialRecommender(ModelConfig(d_model=8, num_layers=1, num_heads=2, ffn_dim=16, max_len=6), 11).eval()
    inputs = torch.tensor([[0, 0, 3, 4, 5, 6], [0, 0, 0, 0, 0, 9]])
    targets = torch.tensor([[0, 0, 4, 5, 6, 7], [0, 0, 0, 0, 0, 2]])
    hidden = model(inputs)
    via_scores = full_softmax_ce(model.scores(hidden).flatten(0, 1), targets.flatten())
    via_hidden = full_ce_from_hidden(hidden, model.item_emb.weight, targets)
    torch.testing.assert_close(via_hidden, via_scores)


def _toy(num_items=20, d=8, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g)
    item_emb = torch.randn(num_items + 1, d, generator=g) * 0.3
    targets = torch.randint(1, num_items + 1, (n,), generator=g)
    return hidden, item_emb, targets


def test_sampled_softmax_is_finite_and_reproducible():
    hidden, item_emb, targets = _toy()
    targets[:3] = 0
    a = sampled_softmax_ce(hidden, item_emb, targets, 16, torch.Generator().manual_seed(1))
    b = sampled_softmax_ce(hidden, item_emb, targets, 16, torch.Generator().manual_seed(1))
    assert torch.isfinite(a) and a.item() > 0
    assert a.item() == b.item()


def test_sampled_softmax_approaches_full_softmax_with_many_negatives():
    hidden, item_emb, targets = _toy()
    full = full_softmax_ce(F.pad(hidden @ item_emb[1:].T, (1, 0), value=float("-inf")), targets)
    sampled = sampled_softmax_ce(hidden, item_emb, targets, 20_000, torch.Generator().manual_seed(0))
    torch.testing.assert_close(sampled, full, rtol=0.02, atol=0)


def test_sampled_softmax_with_a_popularity_proposal_approaches_full_softmax():
    hidden, item_emb, targets = _toy()
    q = torch.linspace(1, 5, item_emb.shape[0])
    q[0] = 0
    log_q = (q / q.sum()).log()
    full = full_softmax_ce(F.pad(hidden @ item_emb[1:].T, (1, 0), value=float("-inf")), targets)
    sampled = sampled_softmax_ce(hidden, item_emb, targets, 20_000, torch.Generator().manual_seed(0), log_q)
    torch.testing.assert_close(sampled, full, rtol=0.02, atol=0)
    with pytest.raises(ValueError, match="padding"):
        sampled_softmax_ce(hidden, item_emb, targets, 4, None, torch.zeros(item_emb.shape[0]))


def test_negative_equal_to_target_is_masked():
    # One real item: every negative is the target itself, so all are masked and the
    # positive is alone in its softmax: the loss is exactly 0.
    hidden = torch.randn(5, 4)
    item_emb = torch.randn(2, 4)
    targets = torch.ones(5, dtype=torch.long)
    assert sampled_softmax_ce(hidden, item_emb, targets, 8, torch.Generator().manual_seed(0)).item() == 0.0


def test_sampled_softmax_trains_a_toy_problem():
    """Learn item embeddings so each fixed query vector ranks its own item first."""
    torch.manual_seed(0)
    num_items, d = 30, 16
    queries = torch.randn(num_items, d)
    targets = torch.arange(1, num_items + 1)
    item_emb = torch.nn.Parameter(torch.randn(num_items + 1, d) * 0.01)
    opt = torch.optim.Adam([item_emb], lr=0.05)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(100):
        loss = sampled_softmax_ce(queries, item_emb, targets, 8, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.25 * sum(losses[:10]) / 10
    top1 = (queries @ item_emb[1:].detach().T).argmax(-1) + 1
    assert (top1 == targets).float().mean() >= 0.9
