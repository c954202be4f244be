"""bench.teacher_confidence's statistics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from bench.teacher_confidence import FitStats


def test_statistics_of_two_positions_match_a_hand_computation():
    # Catalog of 4 items; the teacher keeps its top-2. Position 0: logits (ln 4, ln 2, 0, 0) over items
    # 1..4, so p = (1/2, 1/4, 1/8, 1/8), lse = ln 8; target item 1 (the top-1). Position 1: uniform
    # logits 0, lse = ln 4, top-2 = items 3 and 4, target item 2 (outside the top-2: p counted 0).
    stats = FitStats()
    topk_ids = torch.tensor([[1, 2], [3, 4]])
    topk_logits = torch.tensor([[math.log(4), math.log(2)], [0.0, 0.0]])
    lse = torch.tensor([math.log(8), math.log(4)])
    stats.add(torch.tensor([1, 2]), topk_ids, topk_logits, lse, p_target=torch.tensor([0.5, 0.0]))
    r = stats.result()
    assert r["positions"] == 2
    assert r["mean_p_target"] == pytest.approx(0.25)
    assert r["mean_top1"] == pytest.approx(0.5) and r["mean_in_topk"] == pytest.approx(0.5)
    assert r["mean_topk_mass"] == pytest.approx((0.75 + 0.5) / 2)
    # Renormalised top-2: (2/3, 1/3) and (1/2, 1/2).
    h0 = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert r["mean_topk_entropy"] == pytest.approx((h0 + math.log(2)) / 2)


def test_no_positions_give_zero_means_not_an_error():
    assert FitStats().result() == {"positions": 0, "mean_p_target": 0.0, "mean_top1": 0.0, "mean_in_topk": 0.0,
                                   "mean_topk_mass": 0.0, "mean_topk_entropy": 0.0}
