"""``recdistill train-teacher``: Ray Train TorchTrainer + DeepSpeed ZeRO workers."""

from __future__ import annotations

import logging

from ray.train.torch import TorchTrainer

from cluster.common import refuse_other_settings, require_dataset, save_resolved_config
from cluster.ray_setup import ensure_ray, run_config, scaling_config, torch_config
from data_pipeline.layout import RunLayout
from distill.config import Config
from distill.export import read_export_meta
from distill.teacher_training import teacher_train_loop

log = logging.getLogger(__name__)


def run(cfg: Config) -> dict:
    layout = RunLayout(cfg.run.run_dir)
    refuse_other_settings(cfg, layout.teacher, "teacher")
    save_resolved_config(cfg)
    require_dataset(cfg)
    ensure_ray(cfg)
    trainer = TorchTrainer(
        teacher_train_loop,
        train_loop_config={"config": cfg.to_dict()},
        scaling_config=scaling_config(cfg),
        torch_config=torch_config(cfg),
        run_config=run_config(cfg, name="teacher", score_attribute="val_ndcg@10"),
    )
    trainer.fit()
    meta = read_export_meta(layout.teacher, cfg.data.storage_options)
    print(
        f"teacher: {meta['params']:,} parameters, best validation NDCG@10 {meta['valid']['ndcg@10']:.4f} "
        f"(epoch {meta['epoch']}), fingerprint {meta['fingerprint'][:12]}, exported to {layout.teacher}"
    )
    return meta
