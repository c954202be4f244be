"""``recdistill inspect [URL]``: a soft-label store's manifest (the run's own by default), and a full integrity check.

With a config whose run has a teacher export (or ``teacher.checkpoint``), the store must
also come from that teacher.
"""

from __future__ import annotations

from cluster.common import teacher_url
from data_pipeline import soft_labels
from cluster.config import Config
from data_pipeline.exports import ExportError, read_export_meta
from data_pipeline.layout import RunLayout


def run(cfg: Config, url: str | None = None) -> dict:
    """Print the store's manifest and verify it; ``url`` defaults to the run's own store."""
    url = url or RunLayout(cfg.run.run_dir).soft_labels
    manifest = soft_labels.load_store_manifest(url, cfg.data.storage_options)
    print(soft_labels.format_manifest(manifest))
    try:
        teacher = read_export_meta(teacher_url(cfg), cfg.data.storage_options)
    except ExportError:
        teacher = None  # no teacher in this run to compare against
    if teacher is not None:
        soft_labels.load_store_manifest(url, cfg.data.storage_options, expect_teacher=teacher["fingerprint"])
        print(f"teacher: matches {teacher_url(cfg)}")
    summary = soft_labels.verify_store(url, cfg.data.storage_options)
    print(f"verified: every shard present, row counts and sha256 checksums match ({summary})")
    return summary
