"""bench.distill_table: the README's ML-1M table is built from the result files."""

from __future__ import annotations

import json

import pytest

from bench.distill_table import table


def result(kd: float, base: float, **distill) -> dict:
    return {
        "commit": "abc1234",
        "params_share": 0.094,
        "distill": {"loss": "kl_topk_tail", "alpha": 0.5, "temperature": 1.0, **distill},
        "student_model": {"d_model": 48, "num_layers": 1, "item_dims": [{"items": 4, "dim": 48}, {"dim": 8}]},
        "student_train": {"epochs": 40, "batch_size": 16, "lr": 0.004, "lr_schedule": "cosine", "patience": 0},
        "workers": 1,
        "test": {"teacher": {"ndcg@10": 0.2}, "student_kd": {"ndcg@10": kd, "params": 81136},
                 "student_baseline": {"ndcg@10": base}},
        "kd_over_baseline_paired_bootstrap": {"gain": kd / base - 1, "ci95_low": -0.01, "ci95_high": 0.03},
        "students": {"student_kd": {"train_seconds": 3500.4}, "student_baseline": {"train_seconds": 1718.0}},
    }


def test_one_row_per_result_with_its_numbers(tmp_path):
    (tmp_path / "distill_a.json").write_text(json.dumps(result(0.19, 0.18)))
    (tmp_path / "distill_b.json").write_text(json.dumps(result(0.17, 0.18, loss="reverse_kl")))
    (tmp_path / "teacher_x.json").write_text("{}")  # other benchmarks are not read
    lines = table(tmp_path, "distill_").splitlines()
    assert len(lines) == 2 + 2
    a, b = lines[2], lines[3]
    assert "`distill_a.json`" in a and "0.1900 (95.0%)" in a and "0.1800 (90.0%)" in a
    assert "+5.6% (-1.0% to +3.0%)" in a and "3,500 / 1,718" in a and "81,136 (9.4%)" in a
    assert "reverse_kl, 0.5, 1" in b and "-5.6%" in b and "40 ep, batch 16, cosine, lr 0.004, 1 worker |" in b


def test_a_file_that_is_not_a_distill_result_is_named(tmp_path):
    (tmp_path / "distill_bad.json").write_text(json.dumps({"commit": "x"}))
    with pytest.raises(ValueError, match=r"distill_bad\.json.*missing key"):
        table(tmp_path, "distill_")
    with pytest.raises(FileNotFoundError, match="no distill_"):
        table(tmp_path / "empty", "distill_")
