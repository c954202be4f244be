"""``recdistill prepare``: interaction log -> leave-one-out example shards in run_dir/data.

Runs on the driver (no Ray). The row groups of the example shards are sized by the run
plan's rule (:func:`cluster.plan.data_row_group_rule`) once the row counts are known.
"""

from __future__ import annotations

from typing import Any, Optional

from cluster.common import save_resolved_config
from cluster.config import Config
from cluster.plan import PlanError, Problem, RunPlan, build_plan, catalog_problems, data_row_group_rule
from data_pipeline.dataset import prepare_dataset
from data_pipeline.layout import RunLayout


def run(cfg: Config, plan: Optional[RunPlan] = None) -> dict[str, Any]:
    plan = plan or build_plan(cfg)
    plan.require("prepare")
    layout = RunLayout(cfg.run.run_dir)
    save_resolved_config(cfg)
    def check_catalog(counts: dict[str, Any]) -> None:  # before anything is written (an old dataset stays intact)
        problems = catalog_problems(cfg, counts["num_items"])
        if problems:
            raise PlanError([Problem(p.stage, f"the input {counts['source']} ({counts['num_users']:,} users after the filters): "
                                              + p.message) for p in problems])

    manifest = prepare_dataset(cfg.data, layout.data, cfg.run.seed, row_group_size_for=data_row_group_rule(cfg),
                               before_write=check_catalog, task=cfg.run.task)
    splits = manifest["splits"]
    ratings = f"ratings {manifest['rating_values']} as levels 1..{len(manifest['rating_values'])}; " if cfg.run.task == "rating" else ""
    print(
        f"prepared {manifest['source']}: {ratings}{manifest['num_users']:,} users, {manifest['num_items']:,} items, "
        f"{manifest['num_interactions']:,} interactions; train positions {splits['train']['num_positions']:,}, "
        f"valid {splits['valid']['num_rows']:,}, test {splits['test']['num_rows']:,}; row groups of "
        f"{splits['train']['row_group_size']} users -> {layout.data}"
    )
    # What depends on the catalog (k, eval.ks, a given teacher) is checked now, before anything else runs.
    # (The memory plan is the training stages' own check, at their launch.)
    build_plan(cfg).check([s for s in ("train-teacher", "precompute", "evaluate")], memory=False)
    return manifest
