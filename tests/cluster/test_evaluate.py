"""``recdistill evaluate`` and the report on a small prepared dataset and exported models (no Ray)."""

from __future__ import annotations

import pytest
import torch

from cluster import evaluate, report
from conftest import small_config
from data_pipeline.dataset import prepare_dataset
from data_pipeline.layout import RunLayout
from data_pipeline.exports import ExportError
from cluster.models import save_model
from distill.model import SequentialRecommender


def _export(folder: str, model_cfg, num_items: int, dataset_fingerprint: str, seed: int) -> str:
    torch.manual_seed(seed)
    model = SequentialRecommender(model_cfg, num_items)
    return save_model(folder, model.state_dict(), model_cfg, num_items, {"dataset_fingerprint": dataset_fingerprint})


def test_a_teacher_given_by_teacher_checkpoint_is_evaluated_and_reported(tmp_path):
    # A teacher trained once, elsewhere, and reused by this run (teacher.checkpoint): the
    # report must score it, not only a teacher in this run's own folder.
    external = str(tmp_path / "shared-teacher")
    cfg = small_config(tmp_path / "run", f"teacher.checkpoint={external}")
    layout = RunLayout(cfg.run.run_dir)
    dataset = prepare_dataset(cfg.data, layout.data, seed=0)
    n, fp = dataset["num_items"], dataset["fingerprint"]
    teacher_fp = _export(external, cfg.teacher.model, n, fp, seed=0)
    student_fp = _export(layout.student, cfg.student.model, n, fp, seed=1)

    models = evaluate.run(cfg)["models"]

    assert set(models) == {"popularity", "teacher", "student_kd"}
    assert (models["teacher"]["fingerprint"], models["student_kd"]["fingerprint"]) == (teacher_fp, student_fp)
    line = report.run(cfg)
    assert line.startswith("student keeps") and "of teacher NDCG@10" in line


def test_a_model_trained_on_another_dataset_is_refused_by_name(tmp_path):
    cfg = small_config(tmp_path / "run")
    layout = RunLayout(cfg.run.run_dir)
    dataset = prepare_dataset(cfg.data, layout.data, seed=0)
    _export(layout.teacher, cfg.teacher.model, dataset["num_items"], dataset["fingerprint"], seed=0)
    _export(layout.baseline, cfg.student.model, dataset["num_items"], "0" * 64, seed=1)
    with pytest.raises(ExportError, match=f"{layout.baseline} was trained on dataset 000000000000"):
        evaluate.run(cfg)
