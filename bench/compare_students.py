"""Compare exported models on the same test users: NDCG@10 of each and paired-bootstrap gains.

    python -m bench.compare_students --config configs/ml1m.yaml --name NAME \
        --reference runs/a/student_hard_only  runs/b/student  runs/c/student  [overrides...]

``bench.distill_quality`` compares a distilled student with the baseline of its own run.
This compares any exported models (students of different runs, e.g. several losses
against one reference trained on the very same batches) on the run's test split (the
config's ``run.run_dir``): each model's seen-filtered NDCG@10 over all test users, and
for every model its gain over ``--reference`` with a 95% paired-bootstrap interval
(the same users resampled for both). Writes bench/results/compare_<name>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from data_pipeline.dataset import load_manifest, read_split
from data_pipeline.layout import RunLayout
from cluster.config import load_config
from distill.evaluate import model_scorer, per_user_ndcg
from data_pipeline.exports import check_export_fits_dataset
from cluster.models import load_model
from distill.metrics import paired_bootstrap_gain


def compare(cfg, reference: str, models: list[str], k: int = 10) -> dict:
    layout, storage = RunLayout(cfg.run.run_dir), cfg.data.storage_options
    dataset = load_manifest(layout.data, storage)
    test = read_split(layout.data, "test", storage, dataset)
    per_user, out = {}, {"reference": reference, "users": test.num_rows, "models": {}}
    for folder in [reference, *models]:
        model, meta = load_model(folder, storage)
        check_export_fits_dataset(meta, dataset, folder)
        per_user[folder] = per_user_ndcg(model_scorer(model, model.cfg.max_len), test, dataset["num_items"], k=k)
        out["models"][folder] = {f"ndcg@{k}": float(per_user[folder].mean()), "params": meta.get("params"),
                                 "role": meta.get("role"), "distill": meta.get("distill")}
    for folder in models:
        out["models"][folder]["over_reference"] = paired_bootstrap_gain(per_user[folder], per_user[reference])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--reference", required=True, help="exported model folder the others are compared with")
    parser.add_argument("models", nargs="+", help="exported model folders, then config overrides (key=value)")
    args = parser.parse_args()
    models = [m for m in args.models if "=" not in m]
    cfg = load_config(args.config, [m for m in args.models if "=" in m]).with_absolute_paths()
    result = compare(cfg, args.reference, models)
    result["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = Path("bench/results") / f"compare_{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    ref = result["models"][args.reference]["ndcg@10"]
    print(f"{'model':<60}{'NDCG@10':>10}{'vs reference (95% CI)':>34}")
    print(f"{args.reference:<60}{ref:>10.4f}{'(reference)':>34}")
    for folder in models:
        m = result["models"][folder]
        g = m["over_reference"]
        print(f"{folder:<60}{m['ndcg@10']:>10.4f}{g['gain']:>+12.1%} ({g['ci95_low']:+.1%} to {g['ci95_high']:+.1%})")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
