"""``recdistill pipeline``: every stage in order, each skipped when its output already exists,
so a re-submitted job continues where it stopped."""

from __future__ import annotations

import logging
import time

from cluster import distill, evaluate, precompute, prepare, report, train_teacher
from cluster.common import recorded_stage, teacher_url
from data_pipeline import fsio
from data_pipeline import soft_labels
from data_pipeline.dataset import DataError, load_manifest
from data_pipeline.layout import RunLayout
from distill.config import Config, stage_fingerprint
from distill.export import ExportError, read_export_meta

log = logging.getLogger(__name__)


def _dataset(cfg: Config):
    try:
        return load_manifest(RunLayout(cfg.run.run_dir).data, cfg.data.storage_options)
    except DataError:
        return None


def _export(url: str, cfg: Config):
    try:
        return read_export_meta(url, cfg.data.storage_options)
    except ExportError:
        return None


def training_complete(folder: str, cfg: Config, stage: str, teacher_fingerprint: str | None = None) -> bool:
    """``stage`` finished (early stop or last epoch) with this configuration, not merely exported a best-so-far model.

    A stage finished under other settings (another student size, loss, seed...) is not done;
    history files from before stage fingerprints existed are taken at their word.
    """
    progress = recorded_stage(cfg, folder) or {}
    recorded = progress.get("stage_fingerprint")
    return bool(progress.get("complete")) and recorded in (None, stage_fingerprint(cfg, stage, teacher_fingerprint))


def _store_ready(cfg: Config, teacher: dict, dataset: dict) -> bool:
    try:
        soft_labels.load_store_manifest(
            RunLayout(cfg.run.run_dir).soft_labels, cfg.data.storage_options,
            expect_teacher=teacher["fingerprint"], expect_dataset=dataset["fingerprint"], expect_num_items=dataset["num_items"],
        )
        return True
    except soft_labels.SoftLabelError:
        return False


def run(cfg: Config) -> dict[str, float]:
    layout = RunLayout(cfg.run.run_dir)
    timings: dict[str, float] = {}

    def stage(name: str, done: bool, fn, *args, **kwargs) -> None:
        if done:
            print(f"[pipeline] {name}: already done, skipping")
            return
        print(f"[pipeline] {name} ...", flush=True)
        started = time.perf_counter()
        fn(*args, **kwargs)
        timings[name] = time.perf_counter() - started

    stage("prepare", _dataset(cfg) is not None, prepare.run, cfg)
    dataset = _dataset(cfg)
    teacher_at = teacher_url(cfg)
    stage("train-teacher", cfg.teacher.checkpoint is not None or training_complete(layout.teacher, cfg, "teacher"), train_teacher.run, cfg)
    teacher = _export(teacher_at, cfg)
    if teacher is None:
        raise ExportError(f"no teacher export at {teacher_at}")
    stage("precompute", _store_ready(cfg, teacher, dataset), precompute.run, cfg)
    stage("distill", training_complete(layout.student, cfg, "student", teacher["fingerprint"]), distill.run, cfg)
    stage("distill --baseline", training_complete(layout.baseline, cfg, "baseline"), distill.run, cfg, baseline=True)
    stage("evaluate", False, evaluate.run, cfg)
    fsio.write_json_atomic(fsio.join(layout.report, "timings.json"), timings, cfg.data.storage_options)
    line = report.run(cfg)
    print(f"[pipeline] report: {fsio.join(layout.report, 'report.md')}")
    print(f"[pipeline] {line}")
    return timings
