"""The run report of the rating task (``run.task=rating``): a verdict, the run's context, the metrics
table of every model with the paired-bootstrap comparisons, and the validation curves."""

from __future__ import annotations

from typing import Any

from cluster.evaluate_rating import COMPARED

LABELS = {"global_mean": "global mean", "user_mean": "user mean", "item_mean": "item mean", "teacher": "teacher",
          "teacher_ensemble": "teacher ensemble", "student_kd": "distilled student", "student_baseline": "twin (no teacher)"}


def rating_verdict(metrics: dict[str, Any]) -> str:
    """One line: the teacher against the best mean baseline, the student against its twin (RMSE and NLL, with CIs)."""
    models, comparisons = metrics["models"], metrics.get("comparisons", {})
    parts = []
    best = metrics.get("best_mean_baseline")
    teacher = "teacher_ensemble" if "teacher_ensemble" in models else "teacher"  # the one that labelled the store
    if teacher in models and best:
        gain = 1 - models[teacher]["rmse"] / models[best]["rmse"]
        parts.append(f"{LABELS[teacher]} RMSE {models[teacher]['rmse']:.4f}, {100 * gain:+.1f}% better than the {LABELS[best]}")
    else:
        parts.append("no teacher scored yet")
    kd = comparisons.get("student_kd_vs_baseline")
    if kd:
        size = (f" at {100 * models['student_kd']['params'] / models['teacher']['params']:.0f}% of one teacher's parameters"
                if "teacher" in models else "")
        parts.append(f"distilled student{size} vs its twin: RMSE {_delta(kd['rmse'])}, NLL {_delta(kd['nll'])}")
    return "; ".join(parts)


def _delta(d: dict[str, float]) -> str:
    return f"{d['delta']:+.4f} (95% CI {d['ci95_low']:+.4f} .. {d['ci95_high']:+.4f})"


def rating_table(metrics: dict[str, Any]) -> list[str]:
    rows = ["| model | RMSE | MAE | NLL | accuracy | ECE | parameters |", "|---|---|---|---|---|---|---|"]
    ordered = [n for n in LABELS if n in metrics["models"]] + [n for n in metrics["models"] if n not in LABELS]
    for name, r in ((n, metrics["models"][n]) for n in ordered):
        smoothing = f" (smoothing {r['smoothing']:g})" if "smoothing" in r else ""
        rows.append(f"| {LABELS.get(name, name)}{smoothing} | {r['rmse']:.4f} | {r['mae']:.4f} | {r['nll']:.4f} | "
                    f"{r['accuracy']:.4f} | {r['ece']:.4f} | {r['params']:,} |")
    rows += ["", *[f"- {LABELS.get(n, n)}: not scored, {why}" for n, why in metrics.get("unavailable", {}).items()]]
    for c in metrics.get("comparisons", {}).values():
        rows.append(f"- **{LABELS.get(c['a'], c['a'])} minus {LABELS.get(c['b'], c['b'])}** (paired bootstrap over the test "
                    "examples, 95% CI): " + "; ".join(f"{m.upper()} {_delta(c[m])}" for m in COMPARED))
    return rows
