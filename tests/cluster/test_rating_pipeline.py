"""The rating task end to end on a real local Ray cluster (DeepSpeed ZeRO-3 teacher, precompute, DDP students,
evaluation and report), on the embedded synthetic rated data; and the plan refusing a run of the other task."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from cluster import distill, evaluate, precompute, prepare, report, train_teacher
from cluster.config import load_config
from cluster.models import load_model
from cluster.plan import PlanError, build_plan
from conftest import ROOT
from data_pipeline import fsio
from data_pipeline import soft_labels as store
from data_pipeline.dataset import load_manifest, read_split
from data_pipeline.layout import RunLayout

pytestmark = pytest.mark.integration

SMALL_RATED = ["data.synthetic.num_users=300", "data.synthetic.num_items=60", "data.synthetic.num_clusters=6",
               "data.row_group_size=8", "teacher.model.d_model=32", "teacher.model.ffn_dim=64", "teacher.model.max_len=20",
               "teacher.train.epochs=3", "teacher.train.batch_size=64", "student.model.max_len=20", "student.train.epochs=2",
               "precompute.rows_per_shard=100", "precompute.batch_size=32", "scaling.max_failures=0"]


def rated_config(run_dir, *overrides):
    return load_config(ROOT / "configs" / "tiny-rating.yaml",
                       [f"run.run_dir={run_dir}", *SMALL_RATED, *overrides]).with_absolute_paths()


@pytest.fixture(scope="module")
def rated_run(ray_session, tmp_path_factory):
    cfg = rated_config(tmp_path_factory.mktemp("rating") / "run")
    prepare.run(cfg)
    train_teacher.run(cfg)
    precompute.run(cfg)
    distill.run(cfg)
    distill.run(cfg, baseline=True)
    evaluate.run(cfg)
    report.run(cfg)
    return cfg


def test_the_store_holds_the_teachers_whole_rating_distribution_at_every_training_position(rated_run):
    cfg = rated_run
    layout, dataset = RunLayout(cfg.run.run_dir), load_manifest(RunLayout(cfg.run.run_dir).data)
    manifest = store.load_store_manifest(layout.soft_labels)
    assert manifest["task"] == "rating" and manifest["spec"]["num_levels"] == len(dataset["rating_values"]) == 5
    spec = store.manifest_spec(manifest)
    tables = [store.read_shard(layout.soft_labels, manifest, s["index"], verify_checksum=True) for s in manifest["shards"]]
    assert sum(t.num_rows for t in tables) == manifest["num_sequences"]
    teacher, meta = load_model(layout.teacher)
    assert meta["rating_values"] == dataset["rating_values"]
    checked = 0
    for table in tables:
        decoded = store.decode_rating_positions(table, spec)
        np.testing.assert_allclose(decoded["log_probs"].exp().sum(dim=1).numpy(), 1.0, atol=5e-3)
        for r, row in enumerate(table.slice(0, 3).to_pylist()):  # the unsharded teacher's own distribution
            items = torch.tensor([[row["inputs"][0], *row["targets"]]])
            levels = torch.tensor([[row["input_levels"][0], *row["target_levels"]]])
            logits, targets, valid = teacher.sequence_logits(items, levels)
            assert targets[valid].tolist() == [v - 1 for v in row["target_levels"]]
            stored = decoded["log_probs"][decoded["row_offsets"][r]:decoded["row_offsets"][r + 1]]
            torch.testing.assert_close(stored, torch.log_softmax(logits[valid], -1), atol=3e-3, rtol=1e-3)  # fp16 store
            checked += 1
    assert checked >= 3


def test_every_model_is_scored_with_rating_metrics_and_compared_with_intervals(rated_run):
    cfg = rated_run
    layout = RunLayout(cfg.run.run_dir)
    metrics = fsio.read_json(layout.metrics)
    assert metrics["task"] == "rating" and not metrics["unavailable"]
    models = metrics["models"]
    assert set(models) == {"global_mean", "user_mean", "item_mean", "teacher", "student_kd", "student_baseline"}
    for name, m in models.items():
        assert 0 < m["rmse"] < 4 and 0 <= m["mae"] <= m["rmse"] and 0 < m["nll"] < np.log(5) * 3, name
        assert 0 <= m["accuracy"] <= 1 and 0 <= m["ece"] <= 1 and m["num_examples"] == 300, name
    assert models["student_kd"]["params"] < models["teacher"]["params"] / 3
    for label in ("student_kd_vs_baseline", "teacher_vs_best_mean"):
        for metric in ("rmse", "mae", "nll", "accuracy"):
            c = metrics["comparisons"][label][metric]
            assert c["ci95_low"] <= c["delta"] <= c["ci95_high"], (label, metric)
    kd_meta = fsio.read_json(fsio.join(layout.student, "export.json"))
    assert kd_meta["rating_values"] == [1.0, 2.0, 3.0, 4.0, 5.0] and kd_meta["distill"]["alpha"] == cfg.distill.alpha
    with open(fsio.join(layout.report, "report.md")) as f:
        page = f.read()
    assert "distilled student minus twin (no teacher)" in page and "| teacher |" in page and "validation_nll.png" in page


def test_a_run_of_the_other_task_on_these_files_is_refused_before_anything_runs(rated_run):
    next_item = rated_run.model_copy(update={"run": rated_run.run.model_copy(update={"task": "next_item"})})
    with pytest.raises(PlanError, match=r"prepared for the rating task and this run's run.task is next_item"):
        build_plan(next_item).check()
    # The store's own task is checked too (a next-item run would otherwise read a rating store's rows).
    plan = build_plan(next_item)
    assert plan.store is None
    assert "computed for the rating task" in (plan.stage("distill").missing_input or "")


def test_settings_the_rating_task_has_no_use_for_are_refused(tmp_path):
    cfg = rated_config(tmp_path, "precompute.num_sampled=8", "distill.loss=dkd", "distill.embedding_hint=0.5")
    with pytest.raises(PlanError) as refused:
        build_plan(cfg).check()
    for words in ("precompute.num_sampled has no use", "distill.loss=dkd is a next-item loss",
                  "distill.embedding_hint is built for the next-item task"):
        assert words in str(refused.value)


def test_teacher_labelled_augmentation_adds_rows_the_student_learns_from_by_kd_only(rated_run, tmp_path):
    """The same data and teacher, a store with one perturbed copy per sequence: the augmented rows hold real
    (item, rating) pairs, the teacher's own distributions, and a distilled student trains on them."""
    source = RunLayout(rated_run.run.run_dir)
    cfg = rated_config(tmp_path / "run", "precompute.augment.ratio=1", "student.train.epochs=1")
    layout = RunLayout(cfg.run.run_dir)
    shutil.copytree(source.data, layout.data)
    shutil.copytree(source.teacher, layout.teacher)
    assert build_plan(cfg).stage("train-teacher").action == "done"
    precompute.run(cfg)
    manifest = store.load_store_manifest(layout.soft_labels)
    real = store.load_store_manifest(source.soft_labels)["num_sequences"]
    assert manifest["augmentation"]["settings"] == cfg.precompute.augment.settings() and manifest["augmentation"]["rows"] == real
    assert manifest["num_sequences"] == 2 * real and manifest["augmentation"]["first_seq"] == real
    spec = store.manifest_spec(manifest)
    assert spec.augmented_rows and spec.num_levels == 5
    train = read_split(layout.data, "train")
    pairs = {(i, v) for items, levels in zip(train.column("items").to_pylist(), train.column("levels").to_pylist())
             for i, v in zip(items, levels)}
    teacher, _ = load_model(layout.teacher)
    augmented_tables = [store.read_shard(layout.soft_labels, manifest, s["index"]) for s in manifest["shards"]
                        if s["first_seq"] >= real]
    assert sum(t.num_rows for t in augmented_tables) == real
    for table in augmented_tables:
        assert all(table.column("augmented").to_pylist())
        decoded = store.decode_rating_positions(table, spec)
        assert bool(decoded["augmented"].all())
        for r, row in enumerate(table.slice(0, 4).to_pylist()):
            items, levels = [row["inputs"][0], *row["targets"]], [row["input_levels"][0], *row["target_levels"]]
            assert all(pair in pairs for pair in zip(items, levels))  # pairs someone gave in training
            logits, _, valid = teacher.sequence_logits(torch.tensor([items]), torch.tensor([levels]))
            stored = decoded["log_probs"][decoded["row_offsets"][r]:decoded["row_offsets"][r + 1]]
            torch.testing.assert_close(stored, torch.log_softmax(logits[valid], -1), atol=3e-3, rtol=1e-3)
    distill.run(cfg)
    history = fsio.read_json(fsio.join(layout.student, "history.json"))
    assert history["complete"] and np.isfinite(history["history"][-1]["val_nll"])
