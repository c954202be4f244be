"""The 1B teacher on one 24 GB, 2-core machine, and the memory plan against what it measures (issue 20).

    python -m bench.teacher_1b [--data ../shared/data/ml-1m/ml-1m.txt] [--nvme /path/on/local/disk]

Every phase is the command a user types (``recdistill ...`` in a subprocess), on a 24-user slice of
ML-1M (users 1-24), with ``configs/teacher-1b.yaml`` and the overrides in :data:`OVERRIDES_1B`:

1. ``train-teacher`` on 2 workers, optimizer states and parameters offloaded to NVMe, activation
   checkpointing: one epoch is 3 optimizer steps and a checkpoint; the run is interrupted (SIGINT)
   as soon as that checkpoint is registered;
2. the same command at 1 worker resumes from it for 3 more steps (a portable checkpoint: whole
   tensors, so the worker count may change) and exports the teacher;
3. ``precompute`` of the slice's soft labels at 2 and at 1 worker (batch 8), and at 2 with batch 24, each checked by ``inspect``;
4. the ML-1M teacher (``configs/ml1m.yaml``) for one epoch on 2 workers, for its memory;
5. the machine's fp32 matmul peak on the same cores (a plain ``torch.matmul`` loop), against which the
   1B forward's throughput in precompute is put.

Each worker records its own peak RSS and its node's least available memory (cluster.memory_watch);
the plan's estimate (cluster.memory_plan) for the same settings is put beside it. Writes
bench/results/teacher_1b.json and prints a table. Each phase is skipped when its output exists.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from cluster.config import load_config
from cluster.plan import build_plan

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "teacher_1b.json"
RUN_1B = ROOT / "runs" / "teacher-1b-slice"
RUN_ML1M = ROOT / "runs" / "ml1m-memory"
SLICE = ROOT / "runs" / "slice" / "ml1m-24.txt"
GB = 1024**3
OVERRIDES_1B = [
    # ~1.01e9 parameters as in the YAML; 50 positions (not 200) keep a CPU step near a minute.
    "teacher.model.max_len=50",
    # 24 training sequences: 3 optimizer steps an epoch, micro-batches of 4 sequences on 2 workers.
    "teacher.train.batch_size=8", "teacher.train.eval_batch_size=8", "teacher.train.warmup_steps=2",
    "teacher.train.epochs=2", "teacher.train.patience=0",
    "deepspeed.offload_optimizer=nvme", "deepspeed.offload_params=nvme", "deepspeed.activation_checkpointing=true",
    "precompute.batch_size=8",
]
#: (workers, precompute.batch_size): ZeRO-3 gathers every block once per forward, so a larger batch
#: spreads that traffic over more positions.
PRECOMPUTE_RUNS = ((2, 8), (1, 8), (2, 24))


def precompute_key(workers: int, batch: int) -> str:
    return f"precompute_{workers}_workers" + ("" if batch == 8 else f"_batch_{batch}")


def recdistill(*args: str, log: Path) -> subprocess.CompletedProcess:
    with open(log, "a") as out:
        return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)


def interrupt_after_first_checkpoint(args: list[str], log: Path, storage: Path) -> float:
    """Start ``train-teacher``, send SIGINT (Ctrl-C) once a checkpoint is registered; returns the seconds it ran."""
    started = time.perf_counter()
    with open(log, "a") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "train-teacher", *args], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT)
        while proc.poll() is None:
            if any((c / "portable.json").exists() for c in storage.glob("checkpoint_*")):
                time.sleep(5)  # let Ray record it as the latest
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=300)
                break
            time.sleep(2)
    return time.perf_counter() - started


def matmul_peak(threads: int, n: int = 2048, seconds: float = 10.0) -> float:
    """fp32 GFLOP/s of a plain square matmul loop on ``threads`` cores."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        torch.matmul(a, b)
        done += 1
    return 2 * n**3 * done / (time.perf_counter() - started) / 1e9


def forward_flops_per_position(model: dict, num_items: int) -> float:
    """Multiply-adds x 2 of one position's forward: the blocks' weights, attention over max_len, the catalog scores."""
    d, f, layers, length = model["d_model"], model["ffn_dim"], model["num_layers"], model["max_len"]
    per_layer = 2 * (4 * d * d + 2 * d * f) + 2 * 2 * length * d
    return layers * per_layer + 2 * d * (num_items + 1)


def estimate(config: str, overrides: list[str], stage: str, workers: int) -> dict:
    cfg = load_config(ROOT / config, [*overrides, f"scaling.num_workers={workers}"]).with_absolute_paths()
    plan = build_plan(cfg)
    found = plan.memory[stage].estimate
    return {"rank0_gb": round(found.rank0_total / GB, 2), "other_ranks_gb": round(found.host_total / GB, 2),
            "nvme_gb_per_worker": round(found.nvme / GB, 2),
            "parts_gb": {k: round(v / GB, 3) for k, v in {**found.host, **found.rank0_extra}.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ml-1m" / "ml-1m.txt"))
    parser.add_argument("--nvme", default=str(ROOT / "runs" / "nvme-1b"), help="a folder on local disk for NVMe offload")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    logs = ROOT / "logs"
    logs.mkdir(exist_ok=True)
    SLICE.parent.mkdir(parents=True, exist_ok=True)
    if not SLICE.exists():
        with open(args.data) as src, open(SLICE, "w") as dst:
            dst.writelines(line for line in src if int(line.split()[0]) <= 24)
    common = ["--config", "configs/teacher-1b.yaml", f"run.run_dir={RUN_1B}", f"data.path={SLICE}",
              f"deepspeed.nvme_path={args.nvme}", *OVERRIDES_1B]
    overrides = common[2:]
    log = logs / "teacher_1b.log"
    if not (RUN_1B / "data").exists():
        recdistill("prepare", *common, log=log)

    history_file = RUN_1B / "teacher" / "history.json"
    if not any((RUN_1B / "ray" / "teacher").glob("checkpoint_*/portable.json")):
        # The runs folder is not kept (a new checkout): measurements of the phases it fed are remade with it.
        for key in ("train_2_workers", "train_resumed_1_worker", *(precompute_key(w, b) for w, b in PRECOMPUTE_RUNS)):
            results.pop(key, None)
    if "train_2_workers" not in results:
        seconds = interrupt_after_first_checkpoint([*common, "scaling.num_workers=2"], log, RUN_1B / "ray" / "teacher")
        history = json.loads(history_file.read_text())
        results["train_2_workers"] = {"wall_seconds": round(seconds, 1), "epochs": history["history"],
                                      "estimate": estimate("configs/teacher-1b.yaml", overrides, "train-teacher", 2)}
        RESULTS.write_text(json.dumps(results, indent=1))
    if "train_resumed_1_worker" not in results:
        started = time.perf_counter()
        done = recdistill("train-teacher", *common, "scaling.num_workers=1", log=log)
        history = json.loads(history_file.read_text())
        results["train_resumed_1_worker"] = {
            "rc": done.returncode, "wall_seconds": round(time.perf_counter() - started, 1), "restarts": history["restarts"],
            "epochs": history["history"][1:], "complete": history.get("complete", False),
            "estimate": estimate("configs/teacher-1b.yaml", overrides, "train-teacher", 1)}
        RESULTS.write_text(json.dumps(results, indent=1))
    for workers, batch in PRECOMPUTE_RUNS:
        key = precompute_key(workers, batch)
        if key in results:
            continue
        shutil.rmtree(RUN_1B / "soft_labels", ignore_errors=True)
        started = time.perf_counter()
        sizes = [f"scaling.num_workers={workers}", f"precompute.batch_size={batch}"]
        done = recdistill("precompute", *common, *sizes, log=log)
        inspected = recdistill("inspect", str(RUN_1B / "soft_labels"), *common, log=log)
        manifest = json.loads((RUN_1B / "soft_labels" / "manifest.json").read_text())
        results[key] = {"rc": done.returncode, "inspect_rc": inspected.returncode, "wall_seconds": round(time.perf_counter() - started, 1),
                        "positions": manifest["num_positions"],
                        "worker_seconds": round(manifest["extra"]["seconds_this_run"], 1),
                        "memory": manifest["extra"]["memory"],
                        "estimate": estimate("configs/teacher-1b.yaml", [*overrides, sizes[1]], "precompute", workers)}
        RESULTS.write_text(json.dumps(results, indent=1))
    if "ml1m_teacher_2_workers" not in results and Path(args.data).exists():
        ml1m = ["--config", "configs/ml1m.yaml", f"run.run_dir={RUN_ML1M}", f"data.path={args.data}", "teacher.train.epochs=1"]
        recdistill("prepare", *ml1m, log=log)
        recdistill("train-teacher", *ml1m, "scaling.num_workers=2", log=log)
        history = json.loads((RUN_ML1M / "teacher" / "history.json").read_text())
        results["ml1m_teacher_2_workers"] = {"epochs": history["history"],
                                             "estimate": estimate("configs/ml1m.yaml", ml1m[2:], "train-teacher", 2)}
        RESULTS.write_text(json.dumps(results, indent=1))
    # The estimates are pure functions of the settings: remade from the plan as it is now, so the table
    # follows the plan's code (the measurements stay those of their run).
    plan_args = {"train_2_workers": (overrides, "train-teacher", 2), "train_resumed_1_worker": (overrides, "train-teacher", 1),
                 **{precompute_key(w, b): ([*overrides, f"precompute.batch_size={b}"], "precompute", w) for w, b in PRECOMPUTE_RUNS}}
    for key, (settings, stage, workers) in plan_args.items():
        if key in results:
            results[key]["estimate"] = estimate("configs/teacher-1b.yaml", settings, stage, workers)
    if "matmul_peak_gflops" not in results:
        results["matmul_peak_gflops"] = {"1_core": round(matmul_peak(1), 1), "2_cores": round(matmul_peak(2), 1)}
        RESULTS.write_text(json.dumps(results, indent=1))
    summarise(results)
    results["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True).stdout.strip()
    RESULTS.write_text(json.dumps(results, indent=1))


def summarise(results: dict) -> None:
    """The table: estimate against the measured peak RSS per worker, and the 1B forward's share of the matmul peak."""
    rows = []

    def add(name: str, measured: list[float], est: dict) -> None:
        for rank, peak in enumerate(measured):
            guess = est["rank0_gb"] if rank == 0 else est["other_ranks_gb"]
            rows.append({"case": name, "rank": rank, "estimate_gb": guess, "measured_gb": peak,
                         "error": round(guess / peak - 1, 3)})

    for key, name in (("train_2_workers", "1B train-teacher, 2 workers, NVMe"),
                      ("train_resumed_1_worker", "1B train-teacher resumed, 1 worker, NVMe"),
                      ("ml1m_teacher_2_workers", "ML-1M teacher train, 2 workers")):
        if key in results and results[key]["epochs"]:
            add(name, results[key]["epochs"][-1]["peak_rss_gb"], results[key]["estimate"])
    for workers, batch in PRECOMPUTE_RUNS:
        key = precompute_key(workers, batch)
        if key in results:
            add(f"1B precompute, {workers} worker(s), batch {batch}", results[key]["memory"]["peak_rss_gb"], results[key]["estimate"])
    results["memory_plan_vs_measured"] = rows
    print(f"{'case':<44}{'rank':>5}{'estimate GB':>13}{'measured GB':>13}{'error':>8}")
    for r in rows:
        print(f"{r['case']:<44}{r['rank']:>5}{r['estimate_gb']:>13.2f}{r['measured_gb']:>13.2f}{r['error']:>+8.0%}")
    peak = results.get("matmul_peak_gflops", {}).get("2_cores")
    for workers, batch in PRECOMPUTE_RUNS:
        run = results.get(precompute_key(workers, batch))
        if not run or not peak:
            continue
        meta = json.loads((RUN_1B / "teacher" / "export.json").read_text())
        flops = forward_flops_per_position(meta["model"], meta["num_items"])
        rate = run["positions"] / run["worker_seconds"]
        cores = min(workers, 2)  # one worker per core: the matmul peak measured on as many cores
        share = rate * flops / 1e9 / results["matmul_peak_gflops"]["1_core" if cores == 1 else "2_cores"]
        run["throughput"] = {"positions_per_s": round(rate, 2), "gflop_per_position": round(flops / 1e9, 2),
                             "share_of_matmul_peak": round(share, 3)}
        print(f"1B precompute on {workers} worker(s), batch {batch}: {rate:.2f} positions/s, {flops / 1e9:.2f} GFLOP each, "
              f"{share:.0%} of {cores} core(s)' matmul peak")
    for key, workers in (("train_2_workers", 2), ("train_resumed_1_worker", 1)):
        run = results.get(key, {})
        measured = [e["nvme_swap_gb"] for e in run.get("epochs", []) if "nvme_swap_gb" in e]
        if measured and "nvme_gb_per_worker" in run["estimate"]:
            planned = run["estimate"]["nvme_gb_per_worker"] * workers
            run["nvme_node_gb"] = {"estimate": round(planned, 2), "measured": max(measured)}
            print(f"{key}: NVMe swap files on the node: estimate {planned:.2f} GB, measured {max(measured):.2f} GB")
        for epoch in run.get("epochs", []):
            print(f"{key}: epoch {epoch['epoch']}: {epoch['train_seconds']:.0f} s for the epoch's steps "
                  f"(slowest {epoch['step_seconds_max']:.0f} s), node's least available memory "
                  f"{min(epoch['node_min_available_gb']):.1f} GB")


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    main()
