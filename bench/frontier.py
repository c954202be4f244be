"""The distillation frontier as a benchmark: run (or resume) ``recdistill sweep`` and check the goal.

    python -m bench.frontier --config configs/ml1m.yaml --name ml1m \
        sweep.fractions=[0.2,0.1,0.05,0.02,0.01] sweep.seeds=[0,1]

The sweep resumes member by member, so a run cut short by the session is continued by the
same command. ``--finished-only`` trains nothing: it scores the members finished so far (a
progress report of a sweep still under way, with the unfinished ones listed). A rerun of a sweep whose
result is already written whole (same config and overrides, every member finished and none retrained since)
keeps that result: scoring it again would only re-measure latencies and rewrite committed files (``--rescore``
scores it anyway). Writes bench/results/frontier_<name>.json: the frontier (test NDCG@10 of each
member, distilled and twin, each at its schedule chosen on validation where the sweep tried several; the
paired-bootstrap gain), a per-size summary over seeds, the
issue's goal checked (at <= 1/10 of the teacher: +5% over the twin with the 95% interval
above 0 and >= 90% of the teacher kept; at every size the distilled student level with its
twin or better), and the costs: the store's precompute time and each member's training
time beside one student's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

GOAL_GAIN, GOAL_KEEPS, GOAL_FRACTION = 0.05, 0.90, 0.1


def summarise(rows: list[dict[str, Any]], unfinished: list[str] = ()) -> dict[str, Any]:
    """Per kind of distilled member (plain, augmented, each variant) and size: means over seeds, and the goal.

    The goal is judged (True/False) only for a kind whose every member has its twin, in a sweep with no
    unfinished member; otherwise its verdict is None: a verdict on the seeds and sizes finished so far
    would read as the goal's."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        kind = ("kdaug" if r.get("augmented") else "kd") + (f"-{r['variant']}" if r.get("variant") else "")
        groups[(kind, r["fraction"])].append(r)
    sizes = []
    for (kind, fraction), members in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        with_twin = [m for m in members if "gain_over_twin" in m]
        entry = {"kind": kind, "fraction": fraction, "seeds": len(members), "params": members[0]["params"],
                 "kd_ndcg@10": sum(m["kd_ndcg@10"] for m in members) / len(members),
                 "keeps_of_teacher": sum(m["kd_keeps_of_teacher"] for m in members) / len(members)}
        if with_twin:
            entry.update({"twin_ndcg@10": sum(m["twin_ndcg@10"] for m in with_twin) / len(with_twin),
                          "gains": [m["gain_over_twin"] for m in with_twin],
                          "all_ci_above_0": all(m["gain_over_twin"]["ci95_low"] > 0 for m in with_twin)})
            entry["mean_gain"] = entry["kd_ndcg@10"] / entry["twin_ndcg@10"] - 1 if len(with_twin) == len(members) else None
        sizes.append(entry)

    def meets(entry: dict) -> bool:
        gains = entry.get("gains") or []
        return bool(gains) and all(g["gain"] >= GOAL_GAIN and g["ci95_low"] > 0 for g in gains) and entry["keeps_of_teacher"] >= GOAL_KEEPS

    goal: dict[str, Any] = {}
    for kind in sorted({e["kind"] for e in sizes}):
        mine = [e for e in sizes if e["kind"] == kind]
        if unfinished or any(e.get("mean_gain") is None for e in mine):  # some seed or size has no twin to compare with
            goal[kind] = None
            continue
        small = [e for e in mine if e["fraction"] <= GOAL_FRACTION + 1e-9]
        goal[kind] = {"small_student_meets_gain_and_keep": [e["fraction"] for e in small if meets(e)],
                      "level_with_twin_at_every_size": all(e["kd_ndcg@10"] >= e["twin_ndcg@10"] for e in mine)}
    return {"sizes": sizes, "goal": goal, "unfinished_members": list(unfinished),
            "goal_definition": f"at <= {GOAL_FRACTION:g} of the teacher: every seed's gain over its twin >= {GOAL_GAIN:.0%} "
                               f"with the 95% CI above 0, and >= {GOAL_KEEPS:.0%} of the teacher's NDCG@10 kept (mean over "
                               "seeds); at every size the mean distilled NDCG@10 >= the mean twin's"}


def costs(cfg, members: list, store: dict) -> dict[str, Any]:
    """Training seconds of each member (summed over its epochs, from its history) and the store's precompute time."""
    from cluster.sweep import member_folder
    from data_pipeline import fsio

    out = {}
    for m in members:
        history = fsio.read_json(fsio.join(member_folder(cfg, m), "history.json"), cfg.data.storage_options)["history"]
        out[m.name] = {"epochs": len(history), "train_seconds": sum(h["train_seconds"] for h in history)}
    extra = store.get("extra", {})
    return {"members": out, "precompute_seconds_last_run": extra.get("seconds_this_run"),
            "precompute_workers": extra.get("workers"), "store_positions": store["num_positions"],
            "augmentation": store.get("augmentation")}


def merge_frontiers(results: list[dict[str, Any]], sources: list[str] | None = None) -> dict[str, Any]:
    """One frontier from several benchmark results of the same teacher and test split: every member once.
    A member in several results (the 1/10 pair that a ladder reuses) keeps its last record; where the
    records differ (the member was retrained in between) that is said on stderr and listed under
    "replaced_records", so a rerun never changes a number without notice."""
    sources = sources or [f"result {i}" for i in range(len(results))]
    first = results[0]["frontier"]
    for r in results[1:]:
        if r["frontier"]["teacher"]["fingerprint"] != first["teacher"]["fingerprint"]:
            raise SystemExit("bench.frontier --render: the results come from different teachers "
                             f"({first['teacher']['fingerprint'][:12]} and {r['frontier']['teacher']['fingerprint'][:12]})")
    rows: dict[str, dict] = {}
    origin: dict[str, str] = {}
    replaced = []
    for source, r in zip(sources, results):
        for row in r["frontier"]["rows"]:
            name, old = row["member"], rows.get(row["member"])
            if old is not None and _retrained(old, row):
                # Another set of schedules to choose from is not a retraining: say which it is.
                why = "chosen among other schedules" if _schedules(old) != _schedules(row) else "different records"
                replaced.append({"member": name, "kept": source, "kept_ndcg@10": row.get("kd_ndcg@10"),
                                 "dropped": origin[name], "dropped_ndcg@10": old.get("kd_ndcg@10"), "why": why})
                print(f"bench.frontier: {name}: {why} in {origin[name]} "
                      f"(NDCG@10 {old.get('kd_ndcg@10')}, schedules {_schedules(old)}) and {source} ({row.get('kd_ndcg@10')}, "
                      f"schedules {_schedules(row)}); keeping the later one, from {source}", file=sys.stderr)
            rows[name], origin[name] = row, source
    ordered = sorted(rows.values(), key=lambda row: (-row["fraction"], row["seed"], row.get("augmented", False), row.get("variant", "")))
    return {**first, "rows": ordered, "replaced_records": replaced}


def already_written(prior: dict[str, Any], config: str, overrides: list[str], member_costs: dict[str, Any]) -> bool:
    """Whether an earlier result of this benchmark is the sweep as it stands: written whole, for the same config
    and overrides, from the same members trained for the same time (a member retrained since differs there)."""
    return (prior.get("complete") is True and prior.get("config") == config and prior.get("overrides") == overrides
            and prior.get("costs", {}).get("members") == member_costs)


def _schedules(row: dict) -> list[str]:
    """The schedules a row's member and twin were chosen from (["base"]: a sweep without sweep.schedules)."""
    return sorted(set(row.get("schedules_val", {"base": None})) | set(row.get("twin_schedules_val", {"base": None})))


def _retrained(old: dict, new: dict) -> bool:
    """Two records of one member that disagree: its score, or its twin's where both have one (a twin
    that had not finished in the older record is not a disagreement)."""
    twins_differ = "twin_ndcg@10" in old and "twin_ndcg@10" in new and old["twin_ndcg@10"] != new["twin_ndcg@10"]
    return old.get("kd_ndcg@10") != new.get("kd_ndcg@10") or twins_differ


def write_pictures(frontier: dict[str, Any], results_dir: Path, name: str) -> None:
    """frontier_<name>.md (the table) and frontier_<name>.png (the plot) beside the JSON."""
    from cluster.frontier import format_table, plot

    (results_dir / f"frontier_{name}.md").write_text(format_table(frontier))
    (results_dir / f"frontier_{name}.png").write_bytes(plot(frontier))


def render(paths: list[str], results_dir: Path, name: str) -> None:
    from cluster.frontier import format_table

    results = [json.loads(Path(p).read_text()) for p in paths]
    frontier = merge_frontiers(results, paths)
    results_dir.mkdir(parents=True, exist_ok=True)
    write_pictures(frontier, results_dir, name)
    # A member unfinished in one result may be finished in another (a ladder reuses the 1/10 pair). Finished
    # members by their folder names (a row's "member" has no schedule in it): those whose training time is recorded.
    done = {m for r in results for m in r.get("costs", {}).get("members", {})}
    unfinished = sorted({m for r in results for m in r.get("unfinished_members", []) if m not in done})
    summary = summarise(frontier["rows"], unfinished)
    (results_dir / f"frontier_{name}_summary.json").write_text(
        json.dumps({"benchmark": "frontier (merged)", "from": paths, "summary": summary,
                    "replaced_records": frontier["replaced_records"]}, indent=2) + "\n")
    print(format_table(frontier), end="")
    print(f"written: frontier_{name}.md, .png, _summary.json under {results_dir}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="the run's config (not with --render)")
    parser.add_argument("--name", required=True)
    parser.add_argument("--render", nargs="+", metavar="JSON",
                        help="train and score nothing: merge these frontier JSONs (same teacher) into one table and plot")
    parser.add_argument("--finished-only", action="store_true",
                        help="train nothing: score the members already finished and list the others")
    parser.add_argument("--rescore", action="store_true",
                        help="score a finished sweep again even where its result is already written whole")
    parser.add_argument("--results-dir", default="bench/results", help="where frontier_<name>.json goes")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.render:
        render(args.render, Path(args.results_dir), args.name)
        return
    if not args.config:
        parser.error("--config is required (unless --render)")

    from cluster.common import restore_interrupt

    restore_interrupt()  # kill -INT stops a background sweep as Ctrl-C does (finished members kept)
    from cluster import frontier as frontier_files
    from cluster import sweep
    from cluster.cli import USER_ERRORS
    from cluster.common import code_version
    from cluster.config import load_config
    from cluster.plan import build_plan
    from cluster.ray_setup import Interrupted

    out = Path(args.results_dir) / f"frontier_{args.name}.json"
    try:  # a user mistake (config, store, export) is one line, as in the CLI
        cfg = load_config(args.config, args.overrides).with_absolute_paths()
        started = time.perf_counter()
        if out.exists() and not (args.finished_only or args.rescore):
            plan = build_plan(cfg)
            planned = sweep.plan_members(cfg, plan)
            if all(sweep.finished(cfg, plan, m) for m in planned) and already_written(
                    json.loads(out.read_text()), args.config, args.overrides, costs(cfg, planned, plan.store)["members"]):
                print(f"bench.frontier: {out} already holds this sweep, every member finished; kept (--rescore scores it again)")
                return
        if args.finished_only:
            plan = build_plan(cfg)
            plan.require("distill")
            planned = sweep.plan_members(cfg, plan)
            members = [m for m in planned if sweep.finished(cfg, plan, m)]
            unfinished = [m.name for m in planned if m not in members]
            frontier = frontier_files.write(cfg, plan, [(m, sweep.member_folder(cfg, m)) for m in members], files=False)
        else:
            frontier = sweep.run(cfg)
            plan = build_plan(cfg)
            members, unfinished = sweep.plan_members(cfg, plan), []
        wall = time.perf_counter() - started
    except USER_ERRORS as exc:
        raise SystemExit(f"bench.frontier: {exc}") from None
    except Interrupted as exc:  # Ctrl-C: one line, and the same command resumes
        print(f"bench.frontier: {exc}", file=sys.stderr)
        raise SystemExit(130) from None
    result = {"benchmark": "frontier", "config": args.config, "overrides": args.overrides, **code_version(),
              "complete": not unfinished, "unfinished_members": unfinished,
              "sweep_wall_seconds_this_invocation": wall, "frontier": frontier, "summary": summarise(frontier["rows"], unfinished),
              "costs": costs(cfg, members, plan.store)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    write_pictures(frontier, out.parent, args.name)
    print(f"{'kind':<14}{'size':>8}{'params':>10}{'distilled':>11}{'twin':>9}{'gain':>9}{'keeps':>8}  seeds")
    for e in result["summary"]["sizes"]:
        gain = f"{e['mean_gain']:+.1%}" if e.get("mean_gain") is not None else "-"
        twin = f"{e['twin_ndcg@10']:.4f}" if "twin_ndcg@10" in e else "-"
        print(f"{e['kind']:<14}{e['fraction']:>8g}{e['params']:>10,}{e['kd_ndcg@10']:>11.4f}{twin:>9}{gain:>9}"
              f"{e['keeps_of_teacher']:>8.0%}  {e['seeds']}")
    print(json.dumps(result["summary"]["goal"], indent=1))
    if unfinished:
        print(f"not finished yet (not in the table): {', '.join(unfinished)}")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
