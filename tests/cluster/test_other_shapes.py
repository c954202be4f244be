"""Datasets of other shapes through a shipped config with only data.path changed (and tiny-sized models):
the plan sizes the example shards and the store for them, and the whole pipeline runs."""

from __future__ import annotations

import json

import pytest

from bench.other_shapes import SHARED_DATA, write_ml100k, write_synthetic
from cluster.cli import main
from cluster.config import load_config
from cluster.plan import build_plan
from conftest import ROOT

pytestmark = pytest.mark.integration

# configs/tiny.yaml-sized models (the shipped config's are for ML-1M), short budgets.
TINY_MODELS = [
    "teacher.model.d_model=32", "teacher.model.ffn_dim=64", "teacher.model.max_len=20", "teacher.train.epochs=1",
    "teacher.train.warmup_steps=0", "student.model.max_len=20", "student.train.epochs=1", "student.train.warmup_steps=0",
    "scaling.max_failures=0",
]


def _shape(name, tmp_path):
    if name == "ml100k":
        if not (SHARED_DATA / "ml-100k" / "u.data").exists():
            pytest.skip(f"needs {SHARED_DATA}/ml-100k/u.data (not redistributable, so not in the repository)")
        return write_ml100k(tmp_path / "ml100k.txt")
    return write_synthetic(tmp_path / "few-users.txt", num_users=200, num_items=5000, clusters=50)


@pytest.mark.parametrize("shape", ["synthetic-200x5000", pytest.param("ml100k", marks=pytest.mark.realdata)])
def test_another_shape_through_the_ml1m_config(ray_session, tmp_path, shape):
    """200 users x 5,000 items, and ML-100k as `user item` lines (943 users, 1,682 items)."""
    data = _shape(shape, tmp_path)
    overrides = [f"data.path={data}", f"run.run_dir={tmp_path / 'run'}", *TINY_MODELS]
    assert main(["pipeline", "--config", str(ROOT / "configs" / "ml1m.yaml"), *overrides]) == 0
    plan = build_plan(load_config(ROOT / "configs" / "ml1m.yaml", overrides).with_absolute_paths())
    if shape == "synthetic-200x5000":  # 64-row groups would fill a quarter of the batch; the plan chose smaller ones
        assert plan.layout.store_row_group_size < 64 and plan.layout.data_row_group_size < 64
    assert plan.layout.fill["distill"] >= 0.9 and plan.layout.fill["baseline"] >= 0.9
    metrics = json.loads((tmp_path / "run" / "report" / "metrics.json").read_text())
    assert set(metrics["models"]) == {"popularity", "teacher", "student_kd", "student_baseline"}
    assert all(stage["action"] == "done" for name, stage in plan.to_dict()["stages"].items() if name != "evaluate")
