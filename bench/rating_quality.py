"""Rating-task benchmark (issue 22): teacher (and teacher ensemble), distilled student, its twin and the mean
baselines on a rated dataset, every choice made on validation and the result reported on test.

    python -m bench.rating_quality --config configs/ml100k-rating.yaml --name ml100k [overrides...]

1. Teachers: each setting of ``--teacher-variants`` is trained at seed 0 and the one with the best
   validation NLL is kept; it is trained at ``--seeds`` more seeds, and the mixture of all of them
   (``teacher.ensemble``) labels the store (``--no-ensemble``: the single teacher does; ``--ensemble-variants``:
   the other variants' seed-0 teachers join the mixture, with a store and students of its own).
2. Students at the config's size: the distilled one at each (alpha, temperature) of ``--kd-grid``, the
   twin at each learning rate of ``--lrs`` (the distilled ones at the config's lr, each also at these lrs
   when ``--kd-lrs``); each family's best validation NLL is kept. Every student trains from copies of the
   run's dataset and store, under its own run_dir, so the stages and their resume are the project's own.
3. ``evaluate`` on test: the selected models side by side, with paired-bootstrap CIs.

Resumable: a rerun skips every finished teacher and student. Writes bench/results/rating_<name>.json and
prints the test table. Not a CI test (about 40 minutes on 2 cores for MovieLens-100k).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import shutil
import subprocess
import time
from pathlib import Path

from cluster import distill, evaluate, precompute, prepare, report, train_teacher
from cluster.config import load_config
from data_pipeline import fsio
from data_pipeline.layout import RunLayout

RESULTS = Path(__file__).resolve().parent / "results"


def _config(args, run_dir: Path, *extra: str):
    return load_config(args.config, [*args.overrides, f"run.run_dir={run_dir}", *extra]).with_absolute_paths()


def _val(folder: str) -> dict:
    return fsio.read_json(fsio.join(folder, "export.json"))["valid"]


def _timed(seconds: dict, key: str, fn, *a, **kw):
    started = time.perf_counter()
    out = fn(*a, **kw)
    seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - started
    return out


def _copy_inputs(main: Path, run_dir: Path) -> None:
    """A student's run_dir: the run's prepared dataset and soft-label store (copied once)."""
    for part in ("data", "soft_labels"):
        if not (run_dir / part).exists():
            shutil.copytree(main / part, run_dir / part)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--root", default=None, help="run folders (default runs/rating-<name>)")
    parser.add_argument("--teacher-variants", default="base=", help="name=override,override;... (seed-0 teachers)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[1, 2], help="more seeds of the chosen teacher")
    parser.add_argument("--no-ensemble", action="store_true", help="label with the seed-0 teacher alone")
    parser.add_argument("--ensemble-variants", action="store_true",
                        help="the other variants' seed-0 teachers join the ensemble too (a more diverse mixture)")
    parser.add_argument("--kd-grid", default="0.2:2,0.5:2,0.2:1,0.0:2", help="alpha:temperature,...")
    parser.add_argument("--lrs", type=float, nargs="*", default=[0.003, 0.001], help="the twin's learning rates")
    parser.add_argument("--kd-lrs", action="store_true", help="also try every kd setting at every lr of --lrs")
    parser.add_argument("--store-overrides", nargs="*", default=[],
                        help="settings of the store and the students only (e.g. precompute.augment.ratio=2)")
    parser.add_argument("--tag", default=None, help="a store and students of their own: main-<tag>, students-<tag>")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.store_overrides and not args.tag:  # they would relabel (and retrain) the untagged store's students
        parser.error("--store-overrides needs a --tag: a store and students of their own")
    root = Path(args.root or f"runs/rating-{args.name}").resolve()
    seconds: dict[str, float] = {}
    record: dict = {"teachers": {}, "students": {}}

    # 1. Teachers, chosen on validation NLL.
    variants = dict(v.split("=", 1) for v in args.teacher_variants.split(";"))
    variants = {name: [o for o in text.split(",") if o] for name, text in variants.items()}
    for name, extra in variants.items():
        cfg = _config(args, root / f"teacher-{name}-s0", "run.seed=0", *extra)
        _timed(seconds, "prepare", prepare.run, cfg)
        _timed(seconds, "train_teacher", train_teacher.run, cfg)
        record["teachers"][f"{name}-s0"] = {"overrides": extra, "valid": _val(RunLayout(cfg.run.run_dir).teacher)}
    chosen = min(variants, key=lambda n: record["teachers"][f"{n}-s0"]["valid"]["nll"])
    members = []
    for seed in [] if args.no_ensemble else args.seeds:
        cfg = _config(args, root / f"teacher-{chosen}-s{seed}", f"run.seed={seed}", *variants[chosen])
        _timed(seconds, "prepare", prepare.run, cfg)
        _timed(seconds, "train_teacher", train_teacher.run, cfg)
        members.append(RunLayout(cfg.run.run_dir).teacher)
        record["teachers"][f"{chosen}-s{seed}"] = {"overrides": variants[chosen], "valid": _val(members[-1])}
    if args.ensemble_variants and not args.no_ensemble:
        members += [RunLayout(str(root / f"teacher-{name}-s0")).teacher for name in variants if name != chosen]
    teacher_url = RunLayout(str(root / f"teacher-{chosen}-s0")).teacher
    labels = [f"teacher.checkpoint={teacher_url}", f"teacher.ensemble=[{','.join(members)}]", *variants[chosen],
              *args.store_overrides]

    # 2. The store, then the students, each family chosen on validation NLL.
    # Another ensemble or other store settings: a store and students of their own.
    family = f"-{args.tag}" if args.tag else "-variants" if args.ensemble_variants else ""
    main_dir = root / f"main{family}"
    cfg = _config(args, main_dir, *labels)
    _timed(seconds, "prepare", prepare.run, cfg)
    _timed(seconds, "precompute", precompute.run, cfg)
    kd_settings = [tuple(map(float, s.split(":"))) for s in args.kd_grid.split(",")]
    kd_lrs = args.lrs if args.kd_lrs else [None]
    for (alpha, temperature), lr in itertools.product(kd_settings, kd_lrs):
        name = f"kd-a{alpha:g}-t{temperature:g}" + (f"-lr{lr:g}" if lr else "")
        run_dir = root / f"students{family}" / name
        _copy_inputs(main_dir, run_dir)
        extra = [f"distill.alpha={alpha}", f"distill.temperature={temperature}", *([f"student.train.lr={lr}"] if lr else [])]
        student = _timed(seconds, "distill", distill.run, _config(args, run_dir, *labels, *extra))
        record["students"][name] = {"overrides": extra, "valid": student["valid"], "epoch": student["epoch"], "role": "kd"}
    for lr in args.lrs:
        name = f"twin-lr{lr:g}"
        run_dir = root / f"students{family}" / name
        _copy_inputs(main_dir, run_dir)
        twin = _timed(seconds, "distill_baseline", distill.run, _config(args, run_dir, *labels, f"student.train.lr={lr}"),
                      baseline=True)
        record["students"][name] = {"overrides": [f"student.train.lr={lr}"], "valid": twin["valid"], "epoch": twin["epoch"],
                                    "role": "twin"}
    best = {role: min((n for n, s in record["students"].items() if s["role"] == role),
                      key=lambda n: record["students"][n]["valid"]["nll"]) for role in ("kd", "twin")}

    # 3. Test: the selected models side by side in the run's own folders, scored by `evaluate`.
    for role, folder in (("kd", "student"), ("twin", "baseline")):
        target = main_dir / folder
        if target.exists():
            shutil.rmtree(target)
        source = RunLayout(str(root / f"students{family}" / best[role]))
        shutil.copytree(source.student if role == "kd" else source.baseline, target)
    metrics = _timed(seconds, "evaluate", evaluate.run, cfg)
    line = report.run(cfg)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "benchmark": "rating_quality", "dataset": args.name, "config": args.config, "overrides": args.overrides,
        "store_overrides": args.store_overrides, "tag": args.tag,
        "commit": commit, "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs",
        "protocol": "teachers and students selected on validation NLL; test metrics of the selected ones only",
        "teacher_chosen": chosen, "ensemble_members": 1 + len(members), "selected": best, "selection": record,
        "test": metrics["models"], "comparisons": metrics["comparisons"], "best_mean_baseline": metrics["best_mean_baseline"],
        "verdict": line, "seconds_this_invocation": seconds,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"rating_{args.name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(line)
    print(f"written {out}")


if __name__ == "__main__":
    main()
