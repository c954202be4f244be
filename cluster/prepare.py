"""``recdistill prepare``: interaction log -> leave-one-out example shards in run_dir/data."""

from __future__ import annotations

from typing import Any

from cluster.common import save_resolved_config
from data_pipeline.dataset import prepare_dataset
from data_pipeline.layout import RunLayout
from distill.config import Config


def run(cfg: Config) -> dict[str, Any]:
    layout = RunLayout(cfg.run.run_dir)
    save_resolved_config(cfg)
    manifest = prepare_dataset(cfg.data, layout.data, cfg.run.seed)
    cfg.check_catalog(manifest["num_items"])
    splits = manifest["splits"]
    print(
        f"prepared {manifest['source']}: {manifest['num_users']:,} users, {manifest['num_items']:,} items, "
        f"{manifest['num_interactions']:,} interactions; train positions {splits['train']['num_positions']:,}, "
        f"valid {splits['valid']['num_rows']:,}, test {splits['test']['num_rows']:,} -> {layout.data}"
    )
    return manifest
