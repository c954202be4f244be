"""Small helpers every stage uses: the resolved config on disk, and the dataset check."""

from __future__ import annotations

from typing import Any

from data_pipeline import fsio
from data_pipeline.dataset import load_manifest
from data_pipeline.layout import RunLayout
from distill.config import Config


def save_resolved_config(cfg: Config) -> None:
    """Write the fully resolved config to ``run_dir/config.yaml`` (what this run actually used)."""
    fsio.atomic_write_bytes(RunLayout(cfg.run.run_dir).config, cfg.to_yaml().encode(), cfg.data.storage_options)


def require_dataset(cfg: Config) -> dict[str, Any]:
    """The prepared dataset's manifest; checks config values that depend on the catalog size."""
    manifest = load_manifest(RunLayout(cfg.run.run_dir).data, cfg.data.storage_options)
    cfg.check_catalog(manifest["num_items"])
    return manifest
