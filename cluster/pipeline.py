"""``recdistill pipeline``: every stage in order, each skipped when its output already exists."""

from __future__ import annotations

import logging

from cluster import evaluate, prepare, train_teacher
from data_pipeline.dataset import DataError, load_manifest
from data_pipeline.layout import RunLayout
from distill.config import Config
from distill.export import ExportError, read_export_meta

log = logging.getLogger(__name__)


def _dataset_ready(cfg: Config) -> bool:
    try:
        load_manifest(RunLayout(cfg.run.run_dir).data, cfg.data.storage_options)
        return True
    except DataError:
        return False


def _teacher_ready(cfg: Config) -> bool:
    try:
        read_export_meta(RunLayout(cfg.run.run_dir).teacher, cfg.data.storage_options)
        return True
    except ExportError:
        return False


def run(cfg: Config) -> None:
    if _dataset_ready(cfg):
        print("prepare: dataset already prepared, skipping")
    else:
        prepare.run(cfg)
    if _teacher_ready(cfg):
        print("train-teacher: teacher already exported, skipping")
    else:
        train_teacher.run(cfg)
    evaluate.run(cfg)
    print(f"results: {RunLayout(cfg.run.run_dir).metrics}")
