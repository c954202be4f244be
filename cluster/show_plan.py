"""``recdistill plan``: print the run plan (a table, or JSON with ``--json``) without running anything.

Reads only manifests, Parquet footers and counts under ``run.run_dir``; starts no Ray.
Exits 2 when the plan has problems, after printing them.
"""

from __future__ import annotations

import json

from cluster.config import Config
from cluster.plan import PlanError, RunPlan, build_plan


def format_plan(plan: RunPlan) -> str:
    """The plan as a readable table: the run's facts, the storage layout, one row per stage, the problems."""
    lines = [f"run plan for {plan.run_dir}", ""]
    if plan.dataset:
        d = plan.dataset
        lines.append(f"dataset   {d['num_users']:,} users, {d['num_items']:,} items, {d['num_interactions']:,} interactions, "
                     f"{plan.num_sequences:,} training sequences; fingerprint {d['fingerprint'][:12]}")
    else:
        lines.append("dataset   not prepared yet")
    if plan.teacher:
        t = plan.teacher
        lines.append(f"teacher   {t['params']:,} parameters at {plan.teacher_url}; fingerprint {t['fingerprint'][:12]}"
                     if "params" in t else f"teacher   at {plan.teacher_url}; fingerprint {t['fingerprint'][:12]}")
    else:
        lines.append(f"teacher   none yet at {plan.teacher_url}")
    lines.append(f"store     {'committed, ' + str(plan.store['num_positions']) + ' positions' if plan.store else 'not committed for this teacher'}")
    layout = plan.layout
    lines += ["", "storage layout (rows)"]
    for key, value in (("data.rows_per_shard", layout.data_rows_per_shard), ("data.row_group_size", layout.data_row_group_size),
                       ("precompute.rows_per_shard", layout.store_rows_per_shard),
                       ("precompute.row_group_size", layout.store_row_group_size),
                       ("distill.num_virtual_shards", layout.num_virtual_shards)):
        origin = layout.origin.get(key, "configured")
        lines.append(f"  {key:<28}{'-' if value is None else value!s:>8}  {origin}")
    for reader, ratio in layout.fill.items():
        lines.append(f"  batch fill ({reader}){'':<{14 - len(reader)}}{ratio:>8.0%}  mean global batch / best possible")
    lines += ["", f"{'stage':<20}{'action':<8}{'workers':<34}writes"]
    for stage in plan.stages.values():
        action = stage.action if not stage.missing_input or stage.action == "done" else f"{stage.action}*"
        lines.append(f"{stage.name:<20}{action:<8}{stage.workers:<34}{stage.writes}")
        if stage.name in plan.memory:
            memory = plan.memory[stage.name]
            lines.append(f"{'':<28}peak memory per worker {memory.estimate.summary()}: {memory.estimate.breakdown()}")
        for role, url in stage.reads.items():
            fingerprint = stage.fingerprints.get(role)
            lines.append(f"{'':<28}reads {role}: {url}" + (f" ({fingerprint[:12]})" if fingerprint else ""))
        if "stage" in stage.fingerprints:
            lines.append(f"{'':<28}stage fingerprint {stage.fingerprints['stage']}")
    waiting = [s for s in plan.stages.values() if s.missing_input and s.action != "done"]
    if waiting:
        lines += ["", "* needs an earlier stage's output first (fine in `pipeline`):"]
        lines += [f"  {s.name}: {s.missing_input}" for s in waiting]
    if plan.memory:
        capacity = next(iter(plan.memory.values())).capacity
        lines += ["", f"memory: a node holds {capacity.host_bytes / 1024**3:.1f} GB for its workers ({capacity.origin}), "
                      f"{capacity.workers_per_node} worker(s) per node" +
                      (f"; GPU {capacity.device_bytes / 1024**3:.0f} GB" if capacity.device_bytes else "") +
                      (f"; NVMe {capacity.nvme_free / 1024**3:.0f} GB free" if capacity.nvme_free is not None else "")]
    lines += [f"warning: [{w.stage}] {w.message}" for w in plan.warnings]
    if plan.problems:
        lines += ["", str(PlanError(plan.problems))]
    else:
        lines += ["", "no problems found"]
    return "\n".join(lines)


def run(cfg: Config, as_json: bool = False) -> RunPlan:
    plan = build_plan(cfg)
    print(json.dumps(plan.to_dict(), indent=2, default=str) if as_json else format_plan(plan))
    plan.check()
    return plan
