"""Teacher quality benchmark (issue 3): train the teacher of a config end to end and
record full-ranking test metrics, parameter count, epochs and wall time.

    python -m bench.teacher_quality --config configs/ml1m.yaml [overrides...]

Writes bench/results/teacher_<name>.json and prints a table. Not a CI test: ML-1M
takes about an hour on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

from cluster import evaluate, prepare, train_teacher
from data_pipeline import fsio
from data_pipeline.layout import RunLayout
from cluster.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--name", default=None, help="result name (default: the config file's stem)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides).with_absolute_paths()
    name = args.name or Path(args.config).stem
    layout = RunLayout(cfg.run.run_dir)

    started = time.perf_counter()
    prepare.run(cfg)
    prepared = time.perf_counter()
    teacher = train_teacher.run(cfg)
    trained = time.perf_counter()
    report = evaluate.run(cfg)
    progress = fsio.read_json(fsio.join(layout.teacher, "history.json"))
    history = progress["history"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "benchmark": "teacher_quality",
        "config": args.config,
        "overrides": args.overrides,
        "commit": commit,
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs",
        "workers": cfg.scaling.num_workers,
        "zero_stage": cfg.deepspeed.zero_stage,
        "params": teacher["params"],
        "model": cfg.teacher.model.model_dump(),
        "epochs_run": len(history),
        "best_epoch": teacher["epoch"],
        "valid_best": teacher["valid"],
        "test": report["models"]["teacher"],
        "popularity_test": report["models"]["popularity"],
        "wall_seconds": {"prepare": prepared - started, "train_teacher": trained - prepared, "total": time.perf_counter() - started},
        # Over all epochs, also those done before a resume (the wall times above cover this invocation only).
        "train_seconds_sum_all_epochs": sum(h["train_seconds"] for h in history),
        "history": history,
        "restarts": progress["restarts"],
    }
    out = Path("bench/results") / f"teacher_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    t = result["test"]
    print(f"\n{'model':<10}{'params':>12}{'epochs':>8}{'HR@10':>9}{'NDCG@10':>9}{'minutes':>9}")
    print(f"{'teacher':<10}{result['params']:>12,}{result['epochs_run']:>8}{t['hr@10']:>9.4f}{t['ndcg@10']:>9.4f}"
          f"{result['wall_seconds']['train_teacher'] / 60:>9.1f}")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
