"""Datasets of other shapes through a shipped config with only ``data.path`` changed.

Writes each dataset as SASRec ``user item`` lines (line order = time order), then runs
``recdistill pipeline --config CONFIG data.path=FILE run.run_dir=...`` plus only budget
overrides (epochs), and records per shape: users, items, the plan's derived storage layout
and batch fill, stage times and the report's verdict, in ``bench/results/other_shapes.json``.

Shapes: ``synthetic-200x5000`` (200 users, 5,000 items), ``synthetic-50000x500`` (50,000
users, 500 items), and ``ml100k`` (MovieLens-100k's ``u.data`` converted to ``user item``
lines in time order; only when ``../shared/data`` exists, never committed).

    python -m bench.other_shapes [--config configs/ml1m.yaml] [--shapes a,b] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cluster.config import load_config
from cluster.plan import build_plan
from data_pipeline.config import SyntheticConfig
from data_pipeline.synthetic import generate_interactions

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SYNTHETIC = {"synthetic-200x5000": (200, 5000, 50), "synthetic-50000x500": (50_000, 500, 25)}


def write_synthetic(path: Path, num_users: int, num_items: int, clusters: int, seed: int = 0) -> Path:
    """A synthetic log as ``user item`` lines; users hold 8-40 items each."""
    table = generate_interactions(SyntheticConfig(num_users=num_users, num_items=num_items, num_clusters=clusters), seed)
    users, items = table.column("user").to_numpy(zero_copy_only=False), table.column("item").to_numpy(zero_copy_only=False)
    path.write_text("".join(f"{u} {i}\n" for u, i in zip(users, items)))
    return path


def write_ml100k(path: Path) -> Path | None:
    """MovieLens-100k's ``u.data`` (user, item, rating, time) as ``user item`` lines, each user's in time order."""
    source = SHARED_DATA / "ml-100k" / "u.data"
    if not source.exists():
        return None
    rows = np.loadtxt(source, dtype=np.int64)
    order = np.lexsort((np.arange(len(rows)), rows[:, 3], rows[:, 0]))  # by user, then time, ties in file order
    path.write_text("".join(f"{u} {i}\n" for u, i in rows[order][:, :2]))
    return path


def run_shape(name: str, data: Path, config: str, run_dir: Path, epochs: int) -> dict:
    overrides = [f"data.path={data}", f"run.run_dir={run_dir}",
                 f"teacher.train.epochs={epochs}", f"student.train.epochs={epochs}"]
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "pipeline", "--config", config, *overrides],
                          capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    (run_dir / "pipeline.log").parent.mkdir(parents=True, exist_ok=True)
    (run_dir / "pipeline.log").write_text(proc.stdout + proc.stderr)
    result = {"shape": name, "config": config, "overrides": overrides, "returncode": proc.returncode, "seconds": round(seconds, 1)}
    if proc.returncode:
        result["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return result
    plan = build_plan(load_config(ROOT / config, overrides).with_absolute_paths())
    result.update(
        users=plan.dataset["num_users"], items=plan.dataset["num_items"], sequences=plan.num_sequences,
        layout={k: v for k, v in plan.layout.__dict__.items()},
        verdict=[line for line in proc.stdout.splitlines() if line.startswith("[pipeline] ")][-1],
        timings=json.loads((run_dir / "report" / "timings.json").read_text()),
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/ml1m.yaml")
    parser.add_argument("--shapes", default="synthetic-200x5000,synthetic-50000x500,ml100k")
    parser.add_argument("--epochs", type=int, default=2, help="Teacher and student epochs (a budget, not a layout setting).")
    parser.add_argument("--work", default="runs/other-shapes")
    parser.add_argument("--out", default="bench/results/other_shapes.json")
    args = parser.parse_args(argv)
    work = (ROOT / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.shapes.split(","):
        data = work / f"{name}.txt"
        if name in SYNTHETIC:
            write_synthetic(data, *SYNTHETIC[name])
        elif name == "ml100k":
            if write_ml100k(data) is None:
                print(f"{name}: skipped, {SHARED_DATA} is absent")
                continue
        else:
            raise SystemExit(f"unknown shape {name!r}; known: {', '.join([*SYNTHETIC, 'ml100k'])}")
        result = run_shape(name, data, args.config, work / name, args.epochs)
        results.append(result)
        print(f"{name:<22} rc={result['returncode']} {result['seconds']:>7.1f}s  "
              f"{result.get('verdict') or result.get('error')}", flush=True)
        Path(ROOT / args.out).write_text(json.dumps({"config": args.config, "epochs": args.epochs, "results": results}, indent=2))
    return 0 if all(r["returncode"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
