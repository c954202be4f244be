"""bench.rating_teacher_probe's pieces on a hand-made u.data (no real data): the split, the factorisation
teacher's labels, and that a distilled student follows its teacher's labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.rating_teacher_probe import (STUDENT, FactorisationRating, factorisation_labels, fit_sequence_model, load_splits,
                                        split_log_probs, split_nll)


def _write_udata(folder, rows):
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))


def test_the_split_is_leave_one_out_in_time_order(tmp_path):
    # user 1 rates items 3, 1, 4, 2 (times out of file order), user 2 rates 5, 6, 7
    _write_udata(tmp_path, [(1, 4, 2, 30), (1, 3, 5, 10), (2, 5, 1, 1), (1, 1, 4, 20), (2, 6, 2, 2), (1, 2, 3, 40), (2, 7, 3, 3)])
    train_rows, train, valid, test, num_users, num_items = load_splits(tmp_path)
    assert (num_users, num_items) == (3, 8)
    assert sorted(map(tuple, train_rows[:, :3].tolist())) == [(1, 1, 4), (1, 3, 5), (2, 5, 1)]
    assert train.items[0, -2:].tolist() == [3, 1] and train.levels[0, -2:].tolist() == [5, 4]
    assert train.items[1, -1].item() == 5 and train.items[1, -2].item() == 0
    assert valid.target_items.tolist() == [4, 6] and valid.target_levels.tolist() == [1, 1]  # levels 0..4
    assert test.target_items.tolist() == [2, 7] and test.target_levels.tolist() == [2, 2]
    assert test.items[0, -3:].tolist() == [3, 1, 4]  # the test history holds the validation pair
    assert valid.items[0, -2:].tolist() == [3, 1] and valid.items[0, -3].item() == 0


def test_factorisation_labels_score_each_position_s_next_item_for_its_user(tmp_path):
    _write_udata(tmp_path, [(u, i, 1 + (u + i) % 5, i) for u in (1, 2) for i in range(1, 7)])
    _, train, *_ = load_splits(tmp_path)
    model = FactorisationRating(num_users=3, num_items=7, dim=4, mean=3.0).eval()
    labels = factorisation_labels(model, train)
    assert labels.shape == (2, train.items.shape[1] - 1, 5)
    assert torch.allclose(labels.exp().sum(-1), torch.ones(labels.shape[:2]))
    with torch.no_grad():  # user 2's last training position: the rating of its last training item
        expected = torch.log_softmax(model(torch.tensor([2]), train.items[1:, -1])[0], -1)
    assert torch.allclose(labels[1, -1], expected[0])


def test_a_student_distilled_from_a_teacher_follows_its_labels_where_its_twin_follows_the_data(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for u in range(1, 9):  # every training rating 1 star; the validation and test ratings 5 stars
        chosen = rng.choice(np.arange(1, 30), 12, replace=False)
        rows += [(u, int(i), 5 if t >= 10 else 1, t) for t, i in enumerate(chosen)]
    _write_udata(tmp_path, rows)
    _, train, valid, _, _, num_items = load_splits(tmp_path)
    always_five = torch.full((len(train.items), train.items.shape[1] - 1, 5), -20.0)
    always_five[..., 4] = 0.0  # a teacher sure of 5 stars everywhere
    fit = dict(lr=0.03, seed=0, epochs=10, patience=10)
    student, nll, epochs = fit_sequence_model(STUDENT, train, valid, num_items, labels=always_five.log_softmax(-1), alpha=0.0, **fit)
    twin, twin_nll, _ = fit_sequence_model(STUDENT, train, valid, num_items, **fit)
    assert epochs == 10 and nll < twin_nll
    assert split_log_probs(student, valid).exp()[:, 4].mean() > 0.8
    assert split_log_probs(twin, valid).exp()[:, 4].mean() < 0.2
    assert split_nll(split_log_probs(student, valid), valid) == pytest.approx(nll)
