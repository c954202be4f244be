"""Precompute benchmark (issue 4): how much does storing soft labels cost on top of the teacher?

    python -m bench.precompute_overhead --config configs/tiny.yaml [overrides...]

In one run, on the same examples and workers: (1) the teacher's forwards alone, (2) forwards plus
the soft labels (top-k, normaliser) stored nowhere, (3) the full precompute (encode and write beside
the forwards). All times are measured inside the
workers (Ray start-up excluded). Also bytes per stored position against the raw floor
k x (id bytes + 2). Needs a prepared dataset and an exported teacher in run_dir (the
pipeline or bench.teacher_quality make them). Writes bench/results/precompute_<name>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from ray.train.torch import TorchTrainer

from cluster.common import teacher_url
from cluster.plan import build_plan
from cluster.ray_setup import ensure_ray, run_config, scaling_config, torch_config
from data_pipeline import fsio
from data_pipeline import soft_labels as store
from data_pipeline.layout import RunLayout
from cluster.config import load_config
from distill.config import ModelConfig
from data_pipeline.exports import read_export_meta
from distill.sizing import count_parameters
from cluster.precompute import precompute_loop


def _teacher_summary(cfg) -> dict:
    meta = read_export_meta(teacher_url(cfg), cfg.data.storage_options)
    return {"params": count_parameters(ModelConfig.model_validate(meta["model"]), meta["num_items"]),
            "model": meta["model"], "note": meta.get("note", "")}


def timed_run(cfg, mode: str) -> float:
    """mode: "forward" (teacher forwards only), "labels" (+ top-k, normaliser), "full" (+ encode and store)."""
    plan = build_plan(cfg)  # the store's layout, as `recdistill precompute` would write it
    loop_config = {"config": cfg.to_dict(), "teacher_url": teacher_url(cfg),
                   "rows_per_shard": plan.layout.store_rows_per_shard, "row_group_size": plan.layout.store_row_group_size,
                   "forward_only": mode == "forward", "labels_only": mode == "labels"}
    trainer = TorchTrainer(
        precompute_loop,
        train_loop_config=loop_config,
        scaling_config=scaling_config(cfg),
        torch_config=torch_config(cfg),
        run_config=run_config(cfg, name=f"bench-precompute-{mode}"),
    )
    return float(trainer.fit().metrics["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--name", default=None)
    parser.add_argument("--repeats", type=int, default=2, help="alternate forward-only and full runs this many times")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides).with_absolute_paths()
    layout = RunLayout(cfg.run.run_dir)
    build_plan(cfg).require("precompute")
    ensure_ray(cfg)
    forward, labels, full = [], [], []
    for _ in range(args.repeats):
        forward.append(timed_run(cfg, "forward"))
        labels.append(timed_run(cfg, "labels"))
        fsio.remove_tree(layout.soft_labels, cfg.data.storage_options)  # a full run from scratch each time
        full.append(timed_run(cfg, "full"))
    manifest = store.load_store_manifest(layout.soft_labels, cfg.data.storage_options)
    spec = store.manifest_spec(manifest)
    result = {
        "benchmark": "precompute_overhead",
        "config": args.config,
        "overrides": args.overrides,
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "workers": cfg.scaling.num_workers,
        "teacher": _teacher_summary(cfg),
        "positions": manifest["num_positions"],
        "forward_only_seconds": forward,
        "labels_only_seconds": labels,
        "precompute_seconds": full,
        "ratio_best": min(full) / min(forward),
        "storage_ratio_best": min(full) / min(labels),
        "goal_ratio": 1.10,
        "k": spec.k,
        "value_dtype": spec.value_dtype,
        "id_dtype": spec.id_dtype,
        "bytes_per_position": store.bytes_per_position(manifest),
        "raw_floor_bytes": store.raw_floor_bytes(spec),
    }
    out = Path("bench/results") / f"precompute_{args.name or Path(args.config).stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'measure':<36}{'value':>14}")
    print(f"{'positions':<36}{result['positions']:>14,}")
    print(f"{'teacher forward only (s, best)':<36}{min(forward):>14.2f}")
    print(f"{'forward + top-k/normaliser (s, best)':<36}{min(labels):>14.2f}")
    print(f"{'full precompute (s, best)':<36}{min(full):>14.2f}")
    print(f"{'full / forward (goal <= 1.10)':<36}{result['ratio_best']:>14.3f}")
    print(f"{'full / labels (cost of storing)':<36}{result['storage_ratio_best']:>14.3f}")
    print(f"{'bytes / position':<36}{result['bytes_per_position']:>14.1f}")
    print(f"{'raw floor k x (id bytes + 2)':<36}{result['raw_floor_bytes']:>14}")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
