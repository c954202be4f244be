"""The model's share of serving: one replica's work per batch of requests, student against teacher, without HTTP.

    python -m bench.serve_compute --config configs/ml1m.yaml --name ml1m_cpu [--device cuda]

What :class:`cluster.serving.ServedModel` does per batch (map ids, forward, top-k, map back) for the
teacher and the student architectures of ``--config``, at several batch sizes, timed in one process,
interleaved. Random weights on a synthetic dataset of the config's catalog size and history lengths:
compute depends on the architecture and the shapes, not on what the weights learnt, so this runs
where the real data may not travel (a lent GPU machine). Requests/s here is the ceiling a replica's
model work allows; ``bench.serve_load`` measures what the whole HTTP path holds.
Writes bench/results/serve_compute_<name>.json (or ``--results-dir``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--catalog", type=int, default=3416, help="Items in the synthetic catalog (ML-1M: 3,416).")
    parser.add_argument("--history", type=int, default=165, help="Mean history length (ML-1M: about 165).")
    parser.add_argument("--batches", default="1,8,32,128")
    parser.add_argument("--seconds", type=float, default=3.0, help="Timed seconds per model and batch size.")
    parser.add_argument("--results-dir", default=str(RESULTS))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    import torch

    from cluster.common import code_version
    from cluster.config import load_config
    from cluster.models import save_model
    from cluster.serving import ServedModel
    from data_pipeline.config import DataConfig, SyntheticConfig
    from data_pipeline.dataset import prepare_dataset, read_item_ids
    from distill.model import SequentialRecommender

    cfg = load_config(args.config, args.overrides)
    work = Path(tempfile.mkdtemp(prefix="serve-compute-"))
    spread = max(10, args.history // 2)
    data = DataConfig(synthetic=SyntheticConfig(num_users=500, num_items=args.catalog, num_clusters=40,
                                                min_length=args.history - spread, max_length=args.history + spread))
    manifest = prepare_dataset(data, str(work / "data"), seed=0)
    served: dict[str, Any] = {}
    for role, model_cfg in (("teacher", cfg.teacher.model), ("student", cfg.student.model)):
        torch.manual_seed(0)
        model = SequentialRecommender(model_cfg, manifest["num_items"])
        save_model(str(work / role), model.state_dict(), model_cfg, manifest["num_items"],
                   {"role": role, "dataset_fingerprint": manifest["fingerprint"]})
        served[role] = ServedModel(str(work / role), str(work / "data"), device=args.device)
    raw = read_item_ids(str(work / "data"))
    rng = np.random.default_rng(0)
    bodies = [json.dumps({"history": [raw[i] for i in rng.integers(0, len(raw), size=int(n))], "k": 10}).encode()
              for n in rng.integers(args.history - spread, args.history + spread, size=256)]
    requests = {role: [m.parse(b) for b in bodies] for role, m in served.items()}

    def timed(role: str, batch: int) -> dict[str, float]:
        model, pool = served[role], requests[role]
        for start in range(0, 3 * batch, batch):  # warm-up
            model.recommend([pool[(start + j) % len(pool)] for j in range(batch)])
        times, start_req, deadline = [], 0, time.perf_counter() + args.seconds
        while time.perf_counter() < deadline or len(times) < 5:
            chunk = [pool[(start_req + j) % len(pool)] for j in range(batch)]
            begin = time.perf_counter()
            model.recommend(chunk)  # returns Python lists: the device work has finished
            times.append(time.perf_counter() - begin)
            start_req += batch
        ms = np.array(times) * 1000
        return {"batch": batch, "calls": len(times), "p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)),
                "requests_per_s": batch / float(np.median(ms)) * 1000}

    rows: dict[str, list] = {"teacher": [], "student": []}
    print(f"{'model':<9}{'batch':>7}{'p50 ms':>10}{'p99 ms':>10}{'req/s':>11}")
    for batch in [int(b) for b in args.batches.split(",")]:
        for role in ("teacher", "student"):
            r = timed(role, batch)
            rows[role].append(r)
            print(f"{role:<9}{batch:>7}{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}{r['requests_per_s']:>11.0f}", flush=True)
    ratios = {str(t["batch"]): s["requests_per_s"] / t["requests_per_s"] for t, s in zip(rows["teacher"], rows["student"])}
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    result = {"name": args.name, "config": args.config, "device": args.device, "device_name": device_name,
              "threads": torch.get_num_threads(), "catalog": manifest["num_items"], "mean_history": args.history,
              "params": {role: m.params for role, m in served.items()}, "models": rows,
              "student_over_teacher_requests_per_s": ratios, "code": code_version(),
              "note": "random weights, synthetic histories of ML-1M's lengths; ServedModel.recommend per batch, no HTTP"}
    out = Path(args.results_dir) / f"serve_compute_{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print("student / teacher requests/s by batch: " + ", ".join(f"{b}: {r:.1f}x" for b, r in ratios.items()) + f"  -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
