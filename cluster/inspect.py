"""``recdistill inspect URL``: a soft-label store's manifest, and a full integrity check."""

from __future__ import annotations

from data_pipeline import soft_labels
from distill.config import Config


def run(cfg: Config, url: str) -> dict:
    manifest = soft_labels.load_store_manifest(url, cfg.data.storage_options)
    print(soft_labels.format_manifest(manifest))
    summary = soft_labels.verify_store(url, cfg.data.storage_options)
    print(f"verified: every shard present, row counts and sha256 checksums match ({summary})")
    return summary
