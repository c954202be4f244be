"""``recdistill pipeline``: every stage in order, each skipped when the plan says it is done,
so a re-submitted job continues where it stopped.

The whole chain is validated before the first stage: the run plan's problems for every
stage are refused up front. Checks that need the data's counts (the catalog size, the
storage layout) run right after ``prepare``, which runs on the driver: still before any
Ray worker starts. The plan is rebuilt from the manifests after each stage, since each
stage's output is the next one's input.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from cluster import distill, evaluate, precompute, prepare, report, train_teacher
from cluster.config import Config
from cluster.plan import RunPlan, build_plan
from data_pipeline import fsio
from data_pipeline.layout import RunLayout

log = logging.getLogger(__name__)

# stage name -> how to run it with the current plan
STEPS: dict[str, Callable[[Config, RunPlan], object]] = {
    "prepare": lambda cfg, plan: prepare.run(cfg, plan=plan),
    "train-teacher": lambda cfg, plan: train_teacher.run(cfg, plan=plan),
    "precompute": lambda cfg, plan: precompute.run(cfg, plan=plan),
    "distill": lambda cfg, plan: distill.run(cfg, plan=plan),
    "distill --baseline": lambda cfg, plan: distill.run(cfg, baseline=True, plan=plan),
    "evaluate": lambda cfg, plan: evaluate.run(cfg, plan=plan),
}


def _check_resources(cfg: Config, plan: RunPlan) -> None:
    """Workers the Ray cluster cannot hold are refused before stage 1, not after prepare and a teacher."""
    to_run = {name for name, stage in plan.stages.items() if stage.action in ("run", "resume")}
    if not to_run & {"train-teacher", "precompute", "distill", "distill --baseline"}:
        return
    from cluster.ray_setup import ensure_ray, require_resources  # Ray only when a stage needs it

    ensure_ray(cfg)
    require_resources(cfg, elastic=not to_run & {"train-teacher", "precompute"})


def run(cfg: Config) -> dict[str, float]:
    layout = RunLayout(cfg.run.run_dir)
    timings: dict[str, float] = {}
    plan = build_plan(cfg)
    plan.check()  # anything that would fail at stage N fails here, before stage 1
    _check_resources(cfg, plan)
    warned = set()
    for name, step in STEPS.items():
        for warning in plan.warnings:  # once each (the plan is rebuilt after every stage)
            if warning.message not in warned:
                warned.add(warning.message)
                print(f"[pipeline] warning: {warning.message}", flush=True)
        action = plan.stage(name).action
        if action in ("done", "given"):
            print(f"[pipeline] {name}: already done, skipping" if action == "done"
                  else f"[pipeline] {name}: using teacher.checkpoint {plan.teacher_url}")
        else:
            print(f"[pipeline] {name} ...", flush=True)
            started = time.perf_counter()
            try:
                step(cfg, plan)
            except evaluate.DamagedExports:
                # The report still says what was measured and which model is damaged; then the run fails.
                fsio.write_json_atomic(fsio.join(layout.report, "timings.json"), timings, cfg.data.storage_options)
                print(f"[pipeline] {report.run(cfg)}")
                raise
            timings[name] = time.perf_counter() - started
        plan = build_plan(cfg)  # this stage's output is the next one's input
        plan.check()
    fsio.write_json_atomic(fsio.join(layout.report, "timings.json"), timings, cfg.data.storage_options)
    line = report.run(cfg)
    print(f"[pipeline] report: {fsio.join(layout.report, 'report.md')}")
    print(f"[pipeline] {line}")
    return timings
