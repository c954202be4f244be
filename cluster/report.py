"""The run report: ``run_dir/report/report.md`` with a table, three PNG plots and a verdict.

Reads what the stages left behind (metrics.json, each model's history.json, the
pipeline's stage timings); writes through fsspec like every other stage.
"""

from __future__ import annotations

import io
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402

from cluster.common import model_exports  # noqa: E402
from data_pipeline import fsio  # noqa: E402
from data_pipeline.layout import RunLayout  # noqa: E402
from cluster.config import Config  # noqa: E402

LABELS = {"teacher": "teacher", "student_kd": "distilled student", "student_baseline": "baseline student", "popularity": "popularity"}


def verdict(models: dict[str, Any], k: int = 10, unavailable: Optional[dict[str, str]] = None) -> str:
    """One line: how much of the teacher's NDCG@k the student keeps, at what size, against the baseline.
    ``unavailable``: model -> why it was not scored ("not trained yet" or "damaged: ...")."""
    unavailable = unavailable or {}
    damaged = [LABELS[name] for name in damaged_names(unavailable) if name in LABELS]
    teacher, student, baseline = models.get("teacher"), models.get("student_kd"), models.get("student_baseline")
    if damaged and not (teacher and student):
        return f"the {' and the '.join(damaged)} export is damaged (weights do not match their fingerprint): no verdict"
    if not (teacher and student):
        missing = [LABELS[n] for n in ("teacher", "student_kd") if n not in models]
        return f"no verdict yet: the {' and the '.join(missing)} {'is' if len(missing) == 1 else 'are'} not trained yet"
    key = f"ndcg@{k}"
    line = (
        f"student keeps {100 * student[key] / teacher[key]:.0f}% of teacher NDCG@{k} "
        f"with {100 * student['params'] / teacher['params']:.0f}% of its parameters"
    )
    if baseline:
        line += f", {100 * (student[key] / baseline[key] - 1):+.1f}% over baseline"
    elif "student_baseline" in damaged_names(unavailable):
        line += "; the baseline student's export is damaged, so no comparison with it"
    return line


def damaged_names(unavailable: dict[str, str]) -> list[str]:
    """The models evaluate found present but damaged (not merely not trained yet)."""
    return [name for name, why in unavailable.items() if why.startswith("damaged")]


def _read_json(url: str, storage) -> Optional[Any]:
    try:
        return fsio.read_json(url, storage)
    except FileNotFoundError:
        return None


def _save_png(fig, url: str, storage) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    fsio.atomic_write_bytes(url, buf.getvalue(), storage)


def _quality_vs_size(models: dict[str, Any]):
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, r in models.items():
        params = max(r["params"], 1)
        ax.scatter(params, r["ndcg@10"], s=60)
        ax.annotate(LABELS.get(name, name), (params, r["ndcg@10"]), textcoords="offset points", xytext=(6, 4))
    ax.set_xscale("log")
    ax.set_xlabel("parameters (log; popularity plotted at 1)")
    ax.set_ylabel("test NDCG@10 (seen-filtered)")
    ax.set_title("Quality vs size")
    ax.grid(alpha=0.3)
    return fig


def _validation_curves(histories: dict[str, list]):
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, history in histories.items():
        ax.plot([h["epoch"] for h in history], [h["val_ndcg@10"] for h in history], marker="o", label=LABELS[name])
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation NDCG@10")
    ax.set_title("Validation NDCG@10 per epoch")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def _stage_times(timings: dict[str, float]):
    fig, ax = plt.subplots(figsize=(5.5, 3))
    names = list(timings)
    ax.barh(names, [timings[n] for n in names])
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title("Stage wall times (this pipeline run)")
    return fig


def run(cfg: Config) -> str:
    layout = RunLayout(cfg.run.run_dir)
    storage = cfg.data.storage_options
    metrics = _read_json(layout.metrics, storage)
    if metrics is None:
        raise FileNotFoundError(f"{layout.metrics} is missing: run `recdistill evaluate` first")
    models = metrics["models"]
    histories = {}
    for name, folder in model_exports(cfg).items():
        saved = _read_json(fsio.join(folder, "history.json"), storage)
        if saved:
            histories[name] = saved["history"]
    timings = _read_json(fsio.join(layout.report, "timings.json"), storage) or {}

    _save_png(_quality_vs_size(models), fsio.join(layout.report, "quality_vs_params.png"), storage)
    plots = ["quality_vs_params.png"]
    if histories:
        _save_png(_validation_curves(histories), fsio.join(layout.report, "validation_ndcg.png"), storage)
        plots.append("validation_ndcg.png")
    if timings:
        _save_png(_stage_times(timings), fsio.join(layout.report, "stage_times.png"), storage)
        plots.append("stage_times.png")

    unavailable = metrics.get("unavailable", {})
    line = verdict(models, unavailable=unavailable)
    rows = [
        "| model | HR@10 | NDCG@10 | HR@20 | NDCG@20 | parameters | bytes | latency p50 / p99 (ms per 256 requests) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in models.items():
        lat = r["latency"]
        rows.append(
            f"| {LABELS.get(name, name)} | {r['hr@10']:.4f} | {r['ndcg@10']:.4f} | {r.get('hr@20', float('nan')):.4f} | "
            f"{r.get('ndcg@20', float('nan')):.4f} | {r['params']:,} | {r['bytes']:,} | {lat['p50_ms']:.2f} / {lat['p99_ms']:.2f} |"
        )
    text = "\n".join(
        [
            f"# recdistill report: `{cfg.run.run_dir}`",
            "",
            f"**{line}.**",
            "",
            f"Test split; {metrics.get('protocol', '')}. Latency measured on `{metrics.get('device', 'cpu')}`.",
            "",
            *rows,
            "",
            *[f"- {LABELS.get(name, name)}: not scored, {why}" for name, why in unavailable.items()],
            "",
            *[f"![{p}]({p})" for p in plots],
            "",
        ]
    )
    fsio.atomic_write_bytes(fsio.join(layout.report, "report.md"), text.encode(), storage)
    return line
