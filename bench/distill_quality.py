"""Distillation quality benchmark (issue 5): distilled student vs teacher vs baseline student.

    python -m bench.distill_quality --config configs/ml1m.yaml [overrides...]

Needs a run with a prepared dataset, an exported teacher and its soft-label store (the
pipeline, or bench.teacher_quality + recdistill precompute, make them). Trains the
distilled and the baseline student unless their stage already completed (then their
per-epoch times come from history.json), evaluates all models on the test split and
writes bench/results/distill_<name>.json with test NDCG/HR, parameter counts and times.
Not a CI test: on ML-1M each student takes tens of minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

from cluster import distill, evaluate
from cluster.plan import build_plan
from data_pipeline import fsio
from bench.compare_students import compare
from data_pipeline.layout import RunLayout
from cluster.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--name", default=None, help="result name (default: the config file's stem)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides).with_absolute_paths()
    layout = RunLayout(cfg.run.run_dir)
    storage = cfg.data.storage_options

    wall: dict[str, float] = {}
    plan = build_plan(cfg)  # what is done is the plan's to say (a student's fingerprint names its teacher and labels)
    for role, command, baseline in (("student_kd", "distill", False), ("student_baseline", "distill --baseline", True)):
        if plan.stage(command).action != "done":
            started = time.perf_counter()
            distill.run(cfg, baseline=baseline)
            wall[role] = time.perf_counter() - started
    report = evaluate.run(cfg)
    models = report["models"]

    def history(folder: str) -> dict:
        progress = fsio.read_json(fsio.join(folder, "history.json"), storage)
        epochs = progress["history"]
        return {"epochs_run": len(epochs), "train_seconds": sum(e["train_seconds"] for e in epochs),
                "val_ndcg@10": [round(e["val_ndcg@10"], 4) for e in epochs], "restarts": progress["restarts"]}

    teacher, kd, base = (models[m]["ndcg@10"] for m in ("teacher", "student_kd", "student_baseline"))
    # Is the distilled student's lead real? Both students on the same test users, resampled together.
    paired = compare(cfg, layout.baseline, [layout.student])["models"][layout.student]["over_reference"]
    out = Path("bench/results") / f"distill_{args.name or Path(args.config).stem}.json"
    if out.exists():  # students trained by an earlier invocation keep their wall times
        wall = {**json.loads(out.read_text()).get("training_wall_seconds", {}), **wall}
    result = {
        "benchmark": "distill_quality",
        "config": args.config,
        "overrides": args.overrides,
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "distill": cfg.distill.model_dump(mode="json"),
        "student_model": cfg.student.model.model_dump(),
        "student_train": cfg.student.train.model_dump(),
        "workers": cfg.scaling.num_workers,
        "test": {m: {k: models[m][k] for k in ("ndcg@10", "hr@10", "ndcg@20", "hr@20", "params")} for m in models},
        "kd_of_teacher_ndcg@10": kd / teacher,
        "kd_over_baseline_ndcg@10": kd / base - 1,
        "kd_over_baseline_paired_bootstrap": paired,
        "params_share": models["student_kd"]["params"] / models["teacher"]["params"],
        "goals": {"kd_of_teacher": 0.90, "kd_over_baseline": 0.05, "params_share_max": 0.10},
        "training_wall_seconds": wall,
        "students": {"student_kd": history(layout.student), "student_baseline": history(layout.baseline)},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'model':<20}{'NDCG@10':>10}{'HR@10':>10}{'params':>12}{'epochs':>8}{'train s':>10}")
    for m in ("teacher", "student_kd", "student_baseline", "popularity"):
        h = result["students"].get(m, {})
        print(f"{m:<20}{models[m]['ndcg@10']:>10.4f}{models[m]['hr@10']:>10.4f}{models[m]['params']:>12,}"
              f"{h.get('epochs_run', ''):>8}{h.get('train_seconds', 0):>10.0f}")
    print(f"distilled / teacher NDCG@10 {result['kd_of_teacher_ndcg@10']:.3f} (goal >= 0.90); "
          f"over baseline {result['kd_over_baseline_ndcg@10']:+.1%} (goal >= +5%; paired bootstrap 95% interval "
          f"{paired['ci95_low']:+.1%} to {paired['ci95_high']:+.1%}); params {result['params_share']:.1%} of the teacher")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
