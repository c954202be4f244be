"""``recdistill distill [--baseline]``: train the student on Ray Train workers (DDP, elastic).

The store is checked against this run (teacher, dataset, catalog) on the driver,
before any worker starts.
"""

from __future__ import annotations

from ray.train.torch import TorchTrainer

from cluster.common import refuse_other_settings, require_dataset, save_resolved_config, teacher_url
from cluster.ray_setup import ensure_ray, run_config, scaling_config, torch_config
from data_pipeline import soft_labels
from data_pipeline.layout import RunLayout
from data_pipeline.streaming import check_batch_fill
from distill.config import Config, ConfigError
from distill.export import read_export_meta
from distill.student_training import student_train_loop, training_blocks


def run(cfg: Config, baseline: bool = False) -> dict:
    layout = RunLayout(cfg.run.run_dir)
    baseline = baseline or cfg.distill.alpha >= 1.0
    save_resolved_config(cfg)
    dataset = require_dataset(cfg)
    soft_manifest = None
    if baseline:
        refuse_other_settings(cfg, layout.baseline, "baseline")
    else:
        teacher = read_export_meta(teacher_url(cfg), cfg.data.storage_options)
        refuse_other_settings(cfg, layout.student, "student", teacher["fingerprint"])
        if cfg.distill.init_from_teacher and teacher["model"].get("item_dims"):
            raise ConfigError("distill.init_from_teacher needs a teacher with a uniform item table (its item_dims is set)")
        soft_manifest = soft_labels.load_store_manifest(
            layout.soft_labels,
            cfg.data.storage_options,
            expect_teacher=teacher["fingerprint"],
            expect_dataset=dataset["fingerprint"],
            expect_num_items=dataset["num_items"],
        )
    # Before any worker starts: a layout that cannot fill the global batch is refused here.
    blocks, _ = training_blocks(cfg, dataset, soft_manifest)
    check_batch_fill(blocks, cfg.distill.num_virtual_shards, cfg.student.train.batch_size, cfg.run.seed)
    ensure_ray(cfg)
    trainer = TorchTrainer(
        student_train_loop,
        train_loop_config={"config": cfg.to_dict(), "baseline": baseline, "soft_manifest": soft_manifest, "teacher_url": teacher_url(cfg)},
        scaling_config=scaling_config(cfg, elastic=True),
        torch_config=torch_config(cfg),
        run_config=run_config(cfg, name="baseline" if baseline else "student"),
    )
    trainer.fit()
    out = layout.baseline if baseline else layout.student
    meta = read_export_meta(out, cfg.data.storage_options)
    print(
        f"{'baseline' if baseline else 'student'}: {meta['params']:,} parameters, best validation NDCG@10 "
        f"{meta['valid']['ndcg@10']:.4f} (epoch {meta['epoch']}), exported to {out}"
    )
    return meta
