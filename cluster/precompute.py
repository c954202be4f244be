"""``recdistill precompute``: the exported teacher, hosted under ZeRO-3 on Ray Train workers,
labels every training position once; soft labels go to run_dir/soft_labels."""

from __future__ import annotations

from ray.train.torch import TorchTrainer

from cluster.common import require_dataset, save_resolved_config, teacher_url
from cluster.ray_setup import ensure_ray, run_config, scaling_config, torch_config
from data_pipeline import soft_labels
from data_pipeline.layout import RunLayout
from distill.config import Config
from distill.export import check_export_fits_dataset, verify_export
from distill.precompute import precompute_loop


def run(cfg: Config) -> dict:
    layout = RunLayout(cfg.run.run_dir)
    save_resolved_config(cfg)
    dataset = require_dataset(cfg)
    # Refuse a teacher from another dataset here, before any worker starts.
    check_export_fits_dataset(verify_export(teacher_url(cfg), cfg.data.storage_options), dataset, teacher_url(cfg))
    ensure_ray(cfg)
    trainer = TorchTrainer(
        precompute_loop,
        train_loop_config={"config": cfg.to_dict(), "teacher_url": teacher_url(cfg)},
        scaling_config=scaling_config(cfg),
        torch_config=torch_config(cfg),
        run_config=run_config(cfg, name="precompute"),
    )
    trainer.fit()
    manifest = soft_labels.load_store_manifest(layout.soft_labels, cfg.data.storage_options)
    print(soft_labels.format_manifest(manifest))
    return manifest
