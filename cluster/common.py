"""Small helpers every stage uses: the resolved config on disk, and the dataset check."""

from __future__ import annotations

from typing import Any

import yaml

from data_pipeline import fsio
from data_pipeline.dataset import load_manifest
from data_pipeline.layout import RunLayout
from distill.config import Config


SECRET_WORDS = ("key", "secret", "token", "password", "credential")


def redact(value: Any) -> Any:
    """A copy of nested options with every secret-looking value replaced, for files and logs."""
    if isinstance(value, dict):
        return {k: "***" if any(w in str(k).lower() for w in SECRET_WORDS) else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def save_resolved_config(cfg: Config) -> None:
    """Write the fully resolved config to ``run_dir/config.yaml`` (storage credentials redacted)."""
    tree = cfg.to_dict()
    tree["data"]["storage_options"] = redact(tree["data"]["storage_options"])
    text = yaml.safe_dump(tree, sort_keys=False)
    fsio.atomic_write_bytes(RunLayout(cfg.run.run_dir).config, text.encode(), cfg.data.storage_options)


def require_dataset(cfg: Config) -> dict[str, Any]:
    """The prepared dataset's manifest; checks config values that depend on the catalog size."""
    manifest = load_manifest(RunLayout(cfg.run.run_dir).data, cfg.data.storage_options)
    cfg.check_catalog(manifest["num_items"])
    return manifest
