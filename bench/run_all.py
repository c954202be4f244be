"""`make bench`: the benchmarks that fit a 2-core machine in minutes.

Each prints a table and writes JSON under bench/results/. The long ML-1M runs are
separate commands (see the README's benchmark table).
"""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = [
    [sys.executable, "-m", "bench.teacher_quality", "--config", "configs/tiny.yaml", "--name", "tiny", "run.run_dir=runs/bench-tiny"],
    # Uses the dataset and teacher the run above left in runs/bench-tiny.
    [sys.executable, "-m", "bench.precompute_overhead", "--config", "configs/tiny.yaml", "--name", "tiny", "run.run_dir=runs/bench-tiny"],
    # Needs the store the run above left: reader vs Ray Data, streaming vs in-memory vs online KD epochs.
    [sys.executable, "-m", "bench.student_data", "--config", "configs/tiny.yaml", "--name", "tiny", "--epochs", "4",
     "--repeats", "7", "run.run_dir=runs/bench-tiny"],
]


def main() -> int:
    failed = 0
    for cmd in BENCHMARKS:
        print("$", " ".join(cmd[1:]), flush=True)
        failed += subprocess.run(cmd).returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
