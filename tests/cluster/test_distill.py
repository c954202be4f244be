"""Student distillation on a real local Ray cluster: refusal of foreign stores, exactly-once
streaming across a killed worker and across worker-count changes, and (in a separate
process with its own multi-node cluster) elastic shrink and grow."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from cluster import distill, precompute, prepare
from cluster.plan import build_plan, training_complete
from cluster.student_batches import student_source
from conftest import export_spread_teacher, assert_exactly_once, kill_train_worker_when, registered_checkpoints, small_config
from data_pipeline import fsio
from data_pipeline import soft_labels as store
from data_pipeline.dataset import load_manifest, train_item_counts
from data_pipeline.layout import RunLayout
from data_pipeline.streaming import EpochPlan, list_blocks
from cluster.config import stage_fingerprint
from data_pipeline.exports import load_export, read_export_meta
from cluster.plan import PlanError
from cluster.models import load_model, save_model
from distill.model import SequentialRecommender
from distill.training import lr_ratio

pytestmark = pytest.mark.integration

STUDENT = [
    "precompute.k=8", "precompute.rows_per_shard=100", "precompute.row_group_size=8",
    "student.model.d_model=8", "student.model.num_heads=1", "student.model.ffn_dim=16",
    "student.train.batch_size=32", "student.train.epochs=2",
    "distill.num_virtual_shards=8", "distill.checkpoint_every_steps=2", "distill.log_consumed=true",
]


def make_store(run_dir: Path, *overrides: str):
    """Prepared data + a random (spread) teacher export + its soft-label store."""
    cfg = small_config(run_dir, *STUDENT, *overrides)
    prepare.run(cfg)
    layout = RunLayout(cfg.run.run_dir)
    export_spread_teacher(layout.teacher, cfg, load_manifest(layout.data), seed=2)
    precompute.run(cfg)
    return cfg


@pytest.fixture(scope="module")
def store_template(ray_session, tmp_path_factory):
    """One store, copied for each test that trains (training writes into run_dir)."""
    return make_store(tmp_path_factory.mktemp("template") / "run")


def copy_run(template, tmp_path: Path, *overrides: str):
    src = Path(template.run.run_dir)
    dst = tmp_path / "run"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("ray", "student", "baseline"))
    return small_config(dst, *STUDENT, *overrides)


def store_rows(cfg) -> set:
    manifest = store.load_store_manifest(RunLayout(cfg.run.run_dir).soft_labels)
    return set(range(manifest["num_sequences"]))


def test_store_from_another_teacher_or_dataset_is_refused_before_training(store_template, tmp_path):
    cfg = copy_run(store_template, tmp_path)
    layout = RunLayout(cfg.run.run_dir)
    # Another teacher: same architecture, other weights.
    other = SequentialRecommender(cfg.teacher.model, load_manifest(layout.data)["num_items"])
    other_url = str(tmp_path / "other-teacher")
    save_model(other_url, other.state_dict(), cfg.teacher.model, other.num_items, {"role": "teacher"})
    with pytest.raises(PlanError, match="made by teacher"):
        distill.run(cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"checkpoint": other_url})}))
    # Another dataset (other seed): the store's dataset fingerprint no longer matches.
    other_data = small_config(tmp_path / "other-data", *STUDENT, "run.seed=5")
    prepare.run(other_data)
    shutil.copytree(layout.soft_labels, RunLayout(other_data.run.run_dir).soft_labels)
    shutil.copytree(layout.teacher, RunLayout(other_data.run.run_dir).teacher)
    with pytest.raises(PlanError, match="made by dataset"):
        distill.run(other_data)
    assert not (Path(cfg.run.run_dir) / "student").exists()  # nothing trained


def run_with_kill(cfg) -> tuple[list, Exception | None]:
    killed: list[int] = []
    stop = threading.Event()
    storage = Path(cfg.run.run_dir) / "ray" / "student"
    mid_epoch = lambda: any("step" in m for m in registered_checkpoints(storage))  # noqa: E731
    killer = threading.Thread(target=kill_train_worker_when, args=(mid_epoch, killed, stop), daemon=True)
    killer.start()
    error = None
    try:
        distill.run(cfg)
    except Exception as exc:  # noqa: BLE001 - the caller decides whether a failure was expected
        error = exc
    finally:
        stop.set()
        killer.join()
    return killed, error


def planned_steps(cfg) -> list[int]:
    """Steps of every epoch of a distillation run (the reader's plan; no Ray)."""
    soft_labels = RunLayout(cfg.run.run_dir).soft_labels
    blocks = list_blocks([fsio.join(soft_labels, s["file"]) for s in store.load_store_manifest(soft_labels)["shards"]])
    return [EpochPlan(blocks, cfg.distill.num_virtual_shards, cfg.student.train.batch_size, cfg.run.seed, e).steps
            for e in range(cfg.student.train.epochs)]


def history(cfg) -> dict:
    return json.loads((Path(cfg.run.run_dir) / "student" / "history.json").read_text())


def test_killed_worker_resumes_and_every_row_is_used_once_per_epoch(store_template, tmp_path):
    # Also starts from the teacher's item directions (read in the workers; not again on resume), and trains
    # an item-embedding hint beside the student (its projection is checkpointed and resumed with it).
    teacher_items = ["distill.init_from_teacher=true", "distill.embedding_hint=0.5"]
    cfg = copy_run(store_template, tmp_path, "scaling.max_failures=2", *teacher_items)
    killed, error = run_with_kill(cfg)
    assert error is None and killed
    restarts = history(cfg)["restarts"]
    assert restarts and restarts[0]["workers"] == 2
    assert_exactly_once(Path(cfg.run.run_dir) / "student" / "consumed", store_rows(cfg), epochs=2)
    layout = RunLayout(cfg.run.run_dir)
    assert read_export_meta(layout.student)["role"] == "student"
    # Finished under this configuration and this teacher (the pipeline would skip it).
    source = student_source(read_export_meta(layout.teacher)["fingerprint"], cfg, store.load_store_manifest(layout.soft_labels))
    assert history(cfg)["stage_fingerprint"] == stage_fingerprint(cfg, "student", source)
    assert training_complete(layout.student, cfg, "student", source)
    # Exact: the same two epochs never interrupted end with the same weights (DDP on 2 workers, dropout on).
    straight = copy_run(store_template, tmp_path / "straight", *teacher_items, "distill.log_consumed=false")
    distill.run(straight)
    assert [h["val_ndcg@10"] for h in history(straight)["history"]] == [h["val_ndcg@10"] for h in history(cfg)["history"]]
    assert read_export_meta(RunLayout(straight.run.run_dir).student)["fingerprint"] == read_export_meta(layout.student)["fingerprint"]
    # The hint trained: its mean cosine distance is recorded each epoch and fell from the first epoch to the last.
    distances = [h["train_hint_distance"] for h in history(cfg)["history"]]
    assert 0 < distances[-1] < distances[0] < 2
    weights, _ = load_export(layout.student)
    assert not [name for name in weights if "projection" in name]  # the hint's projection is not exported


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_checkpoint_resumes_mid_epoch_at_another_worker_count(store_template, tmp_path, before, after):
    # With a cosine lr schedule: the lr after a resize must continue the same curve.
    schedule = ["student.train.lr_schedule=cosine", "student.train.warmup_steps=3"]
    first = copy_run(store_template, tmp_path, f"scaling.num_workers={before}", "scaling.max_failures=0", *schedule)
    killed, error = run_with_kill(first)
    assert killed and error is not None  # the first run died (max_failures=0) after a mid-epoch checkpoint
    second = copy_run(store_template, tmp_path / "unused", f"scaling.num_workers={after}", *schedule)
    second = second.model_copy(update={"run": first.run})  # same run_dir: resume from its checkpoint
    distill.run(second)
    restarts = history(second)["restarts"]
    assert restarts and restarts[-1]["from_workers"] == before and restarts[-1]["workers"] == after
    assert restarts[-1]["step"] > 0 or restarts[-1]["epoch"] > 0
    assert_exactly_once(Path(first.run.run_dir) / "student" / "consumed", store_rows(first), epochs=2)
    steps, lr = planned_steps(first), first.student.train.lr
    recorded = [epoch["lr"] for epoch in history(second)["history"]]
    assert recorded[0] == pytest.approx(lr * lr_ratio(steps[0] - 1, sum(steps), 3, "cosine"))
    assert 0 < recorded[0] < lr and recorded[1] == 0.0  # decayed to 0 at the last planned step


def test_augmented_rows_are_labelled_by_the_teacher_and_each_is_used_once_per_epoch(store_template, tmp_path):
    from cluster.student_batches import training_blocks

    # Asking for augmented rows of a store that has none is refused before training.
    plain = copy_run(store_template, tmp_path / "plain", "distill.augmented=use")
    with pytest.raises(PlanError, match="distill.augmented=use, but the soft-label store at .* has no augmented rows"):
        distill.run(plain)
    assert not (Path(plain.run.run_dir) / "student").exists()

    cfg = make_store(tmp_path / "run", "precompute.augment.ratio=0.5", "distill.augmented=use", "student.train.epochs=1")
    layout = RunLayout(cfg.run.run_dir)
    manifest = store.load_store_manifest(layout.soft_labels)
    augmentation, real = manifest["augmentation"], manifest["augmentation"]["first_seq"]
    assert augmentation["settings"] == {"ratio": 0.5, "ops": ["crop", "mask", "reorder", "substitute"], "rate": 0.3}
    assert real == store.load_store_manifest(RunLayout(plain.run.run_dir).soft_labels)["num_sequences"]
    assert augmentation["rows"] == round(0.5 * real) and manifest["num_sequences"] == real + augmentation["rows"]
    assert manifest["provenance"]["augmentation"] == augmentation["settings"]
    # The seed drew the augmented rows: the plan calls the store another run's under another seed.
    reseeded = build_plan(small_config(cfg.run.run_dir, *STUDENT, "precompute.augment.ratio=0.5", "run.seed=1"))
    assert reseeded.store is None and "run.seed 0 (config: 1)" in reseeded.stage("distill").missing_input
    assert build_plan(cfg).store is not None
    teacher, _ = load_model(layout.teacher)
    spec = store.manifest_spec(manifest)
    checked = 0
    for shard in manifest["shards"]:
        table = store.read_shard(layout.soft_labels, manifest, shard["index"], verify_checksum=True)
        flags = table.column("augmented").to_pylist()
        assert flags == [shard["first_seq"] >= real] * table.num_rows  # a shard is all real or all augmented
        if not flags[0]:
            continue
        decoded = store.decode_positions(table, spec)
        assert all(t == 0 for row in table.column("targets").to_pylist() for t in row)  # no hard target
        for row, seq in enumerate(table.column("inputs").to_pylist()[:5]):  # every position labelled, the last too
            with torch.no_grad():
                top = teacher.scores(teacher(torch.tensor([seq])))[0, :, 1:].topk(spec.k, dim=-1).indices + 1
            a, b = decoded["row_offsets"][row : row + 2].tolist()
            assert b - a == len(seq) and torch.equal(decoded["topk_ids"][a:b], top)
            checked += 1
    assert checked > 0

    # distill.augmented=skip reads the real rows only; use (and auto) all of them.
    dataset = load_manifest(layout.data)
    skip = small_config(cfg.run.run_dir, *STUDENT, "precompute.augment.ratio=0.5", "distill.augmented=skip")
    assert sum(b.num_rows for b in training_blocks(skip, dataset, manifest)[0]) == real
    distill.run(cfg)
    assert_exactly_once(Path(cfg.run.run_dir) / "student" / "consumed", set(range(manifest["num_sequences"])), epochs=1)
    # The student's fingerprint covers the augmentation it trained with.
    teacher_fp = read_export_meta(layout.teacher)["fingerprint"]
    recorded = history(cfg)["stage_fingerprint"]
    assert recorded == stage_fingerprint(cfg, "student", student_source(teacher_fp, cfg, manifest))
    assert recorded != stage_fingerprint(cfg, "student", teacher_fp)


def test_baseline_trains_without_soft_labels(store_template, tmp_path):
    # With a mixed-dimension item table: the workers must order it by training popularity.
    cfg = copy_run(store_template, tmp_path, "distill.log_consumed=false",
                   "student.model.item_dims=[{items: 10, dim: 8}, {dim: 2}]")
    layout = RunLayout(cfg.run.run_dir)
    shutil.rmtree(layout.soft_labels)  # the baseline must not need the store
    meta = distill.run(cfg, baseline=True)
    assert meta["role"] == "baseline" and meta["distill"] is None
    assert 0 < meta["valid"]["ndcg@10"] <= 1
    model, _ = load_model(layout.baseline)
    counts = train_item_counts(layout.data, model.num_items)
    row = model.item_table.item_row
    most_popular = [i for i in range(1, model.num_items + 1) if row[i] <= 10]
    assert sorted(counts[most_popular], reverse=True) == sorted(counts[1:], reverse=True)[:10]


def test_kd_within_popularity_bands_trains_in_a_worker(store_template, tmp_path):
    """distill.loss=kl_bands in the student worker (in-process engine): the bands come from the training counts,
    and the band term is in the loss (the first steps' loss above plain KD's, same batches and initial weights)."""
    from cluster.distill import train_student_worker
    from cluster.engine import InProcessContext

    first_loss = {}
    for weight in (0.0, 5.0):
        cfg = copy_run(store_template, tmp_path / f"w{weight:g}", "distill.loss=kl_bands", f"distill.band_weight={weight}",
                       "student.train.epochs=1", "distill.log_consumed=false")
        layout = RunLayout(cfg.run.run_dir)
        ctx = InProcessContext(str(tmp_path / f"w{weight:g}" / "checkpoints"))
        train_student_worker({"config": cfg.to_dict(), "baseline": False, "teacher_url": layout.teacher,
                              "soft_manifest": store.load_store_manifest(layout.soft_labels)}, ctx)
        first_loss[weight] = ctx.reports[0]["metrics"]["train_loss"]
        assert history(cfg)["complete"]
    assert first_loss[5.0] > first_loss[0.0] + 0.01, first_loss


def test_elastic_shrink_and_grow_on_a_multi_node_cluster(store_template, tmp_path):
    """Runs in its own process: it needs its own Ray cluster (0-CPU head + two 1-CPU nodes)."""
    run_dir = tmp_path / "run"
    shutil.copytree(Path(store_template.run.run_dir), run_dir, ignore=shutil.ignore_patterns("ray", "student", "baseline"))
    script = Path(__file__).with_name("elastic_scenario.py")
    out = subprocess.run([sys.executable, str(script), str(run_dir)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    workers_seen = [r["workers"] for r in result["restarts"]]
    assert 1 in workers_seen and workers_seen[-1] == 2, result  # shrank to 1, grew back to 2
    cfg = small_config(run_dir, *STUDENT, *result["overrides"])
    assert_exactly_once(run_dir / "student" / "consumed", store_rows(cfg), epochs=cfg.student.train.epochs)
