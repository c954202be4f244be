"""One Markdown table of every distillation-quality result in bench/results/ (issue 5's ML-1M goals).

    python -m bench.distill_table [--results bench/results] [--prefix distill_]

Reads the JSON files ``bench.distill_quality`` writes and prints one row per run: what
was varied, the student's size, test NDCG@10 of the distilled and the baseline student,
the paired-bootstrap interval of the gain, and the training wall times. The README's
table is this output, so the numbers there are the files' numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

COLUMNS = ("run (JSON)", "commit", "student", "loss, alpha, T", "schedule", "distilled (of teacher)",
           "baseline (of teacher)", "distilled vs baseline (95% CI)", "wall s, distilled / baseline")


def _schedule(train: dict[str, Any], workers: Any) -> str:
    schedule = train.get("lr_schedule", "constant")
    stop = f", patience {train['patience']}" if train.get("patience") else ""
    batch = f", batch {train['batch_size']}" if "batch_size" in train else ""
    on = f", {workers} worker{'s' if workers != 1 else ''}" if workers is not None else ""
    return f"{train['epochs']} ep{batch}, {schedule}, lr {train['lr']:g}{stop}{on}"


def _student(model: dict[str, Any], params: int, share: float) -> str:
    table = "mixed dims" if model.get("item_dims") else "uniform"
    return f"d{model['d_model']}×{model['num_layers']}L {table}, {params:,} ({share:.1%})"


def _seconds(result: dict[str, Any], student: str) -> str:
    seconds = result.get("students", {}).get(student, {}).get("train_seconds")
    return f"{seconds:,.0f}" if seconds is not None else "–"


def row(name: str, result: dict[str, Any]) -> list[str]:
    test, d = result["test"], result["distill"]
    teacher = test["teacher"]["ndcg@10"]
    kd, base = test["student_kd"]["ndcg@10"], test["student_baseline"]["ndcg@10"]
    boot = result["kd_over_baseline_paired_bootstrap"]
    return [
        f"`{name}`",
        result.get("commit", "?"),
        _student(result["student_model"], test["student_kd"]["params"], result["params_share"]),
        f"{d['loss']}, {d['alpha']:g}, {d['temperature']:g}" + (", teacher init" if d.get("init_from_teacher") else ""),
        _schedule(result["student_train"], result.get("workers")),
        f"{kd:.4f} ({kd / teacher:.1%})",
        f"{base:.4f} ({base / teacher:.1%})",
        f"{boot['gain']:+.1%} ({boot['ci95_low']:+.1%} to {boot['ci95_high']:+.1%})",
        f"{_seconds(result, 'student_kd')} / {_seconds(result, 'student_baseline')}",
    ]


def table(results: Path, prefix: str) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    files = sorted(results.glob(f"{prefix}*.json"))
    if not files:
        raise FileNotFoundError(f"no {prefix}*.json in {results}")
    for path in files:
        result = json.loads(path.read_text())
        try:
            lines.append("| " + " | ".join(row(path.name, result)) + " |")
        except KeyError as exc:
            raise ValueError(f"{path}: not a distill_quality result (missing key {exc})") from exc
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path("bench/results"))
    parser.add_argument("--prefix", default="distill_")
    args = parser.parse_args()
    print(table(args.results, args.prefix))


if __name__ == "__main__":
    main()
