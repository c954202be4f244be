"""The run report: ``run_dir/report/report.md`` with a verdict, the run's context, a table,
PNG plots and, when ``recdistill sweep`` has run, its frontier.

Reads what the stages left behind (metrics.json, the dataset and store manifests, each
model's history.json, the pipeline's stage timings, the sweep's frontier); writes through
fsspec like every other stage. Each model keeps one colour in every plot.
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

LABELS = {"teacher": "teacher", "teacher_ensemble": "teacher ensemble", "student_kd": "distilled student",
          "student_baseline": "baseline student", "popularity": "popularity"}
# One colour per model in every plot (the sweep's frontier uses the same three).
COLOURS = {"teacher": "tab:green", "teacher_ensemble": "tab:olive", "student_kd": "tab:blue", "student_baseline": "tab:orange",
           "popularity": "tab:gray"}


def verdict(models: dict[str, Any], k: int = 10, unavailable: Optional[dict[str, str]] = None,
            gain: Optional[dict[str, float]] = None) -> str:
    """One line: how much of the teacher's NDCG@k the student keeps, at what size, against the baseline.
    ``unavailable``: model -> why it was not scored ("not trained yet" or "damaged: ..."); ``gain``:
    the paired-bootstrap gain over the baseline (its interval is quoted when given)."""
    unavailable = unavailable or {}
    damaged = [LABELS[name] for name in damaged_names(unavailable) if name in LABELS]
    # The student learnt from the ensemble when there is one: it is the teacher it is measured against.
    teacher = models.get("teacher_ensemble") or models.get("teacher")
    student, baseline = models.get("student_kd"), models.get("student_baseline")
    teacher_name = "teacher ensemble" if "teacher_ensemble" in models else "teacher"
    if damaged and not (teacher and student):
        return f"the {' and the '.join(damaged)} export is damaged (weights do not match their fingerprint): no verdict"
    if not (teacher and student):
        missing = [LABELS[n] for n in ("teacher", "student_kd") if n not in models]
        return f"no verdict yet: the {' and the '.join(missing)} {'is' if len(missing) == 1 else 'are'} not trained yet"
    key = f"ndcg@{k}"
    line = (
        f"student keeps {100 * student[key] / teacher[key]:.0f}% of {teacher_name} NDCG@{k} "
        f"with {100 * student['params'] / teacher['params']:.0f}% of its parameters"
    )
    if baseline:
        line += f", {100 * (student[key] / baseline[key] - 1):+.1f}% over baseline"
        if gain:
            line += f" (95% CI {100 * gain['ci95_low']:+.1f}% .. {100 * gain['ci95_high']:+.1f}%)"
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
        ax.scatter(params, r["ndcg@10"], s=60, color=COLOURS.get(name))
        ax.annotate(LABELS.get(name, name), (params, r["ndcg@10"]), textcoords="offset points", xytext=(6, 4))
    ax.set_xscale("log")
    ax.set_xlabel("parameters (log; popularity plotted at 1)")
    ax.set_ylabel("test NDCG@10 (seen-filtered)")
    ax.set_title("Quality vs size")
    ax.grid(alpha=0.3)
    return fig


def _validation_curves(histories: dict[str, list], metric: str = "ndcg@10"):
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, history in histories.items():
        ax.plot([h["epoch"] for h in history], [h[f"val_{metric}"] for h in history], marker="o", label=LABELS[name],
                color=COLOURS[name])
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation {metric.upper()}")
    ax.set_title(f"Validation {metric.upper()} per epoch")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def _stage_times(timings: dict[str, float]):
    fig, ax = plt.subplots(figsize=(5.5, 3))
    names = list(timings)
    bars = ax.barh(names, [timings[n] for n in names])
    ax.bar_label(bars, labels=[f"{timings[n]:.0f} s" for n in names], padding=3)
    ax.invert_yaxis()  # pipeline order, top to bottom
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
    rating = metrics.get("task") == "rating"
    metric = "nll" if rating else "ndcg@10"  # what validation selects on

    plots = []
    if not rating:
        _save_png(_quality_vs_size(models), fsio.join(layout.report, "quality_vs_params.png"), storage)
        plots.append("quality_vs_params.png")
    if histories:
        _save_png(_validation_curves(histories, metric), fsio.join(layout.report, f"validation_{metric.split('@')[0]}.png"), storage)
        plots.append(f"validation_{metric.split('@')[0]}.png")
    if timings:
        _save_png(_stage_times(timings), fsio.join(layout.report, "stage_times.png"), storage)
        plots.append("stage_times.png")

    unavailable = metrics.get("unavailable", {})
    gain = (metrics.get("gains") or {}).get("student_kd_over_baseline")
    if rating:
        from cluster.report_rating import rating_table, rating_verdict

        line, rows = rating_verdict(metrics), rating_table(metrics)
    else:
        line, rows = verdict(models, unavailable=unavailable, gain=gain), [*_ranking_table(models), "", *_band_table(models)]
    frontier_lines = _frontier_section(layout, storage) + _serving_section(layout, storage, models)
    text = "\n".join(
        [
            f"# recdistill report: `{cfg.run.run_dir}`",
            "",
            f"**{line}.**",
            "",
            *_context(cfg, layout, storage, metrics, histories, metric),
            "",
            f"Test split; {metrics.get('protocol', '')}." + ("" if rating else f" Latency measured on `{metrics.get('device', 'cpu')}`."),
            "",
            *rows,
            "",
            *([] if rating else [f"- {LABELS.get(name, name)}: not scored, {why}" for name, why in unavailable.items()]),
            "",
            *_stage_table(timings),
            *[f"![{p}]({p})" for p in plots],
            "",
            *frontier_lines,
        ]
    )
    fsio.atomic_write_bytes(fsio.join(layout.report, "report.md"), text.encode(), storage)
    return line


def _band_table(models: dict[str, Any]) -> list[str]:
    """NDCG@10 of each model by the popularity band of the test user's target (``evaluate``'s by_target_popularity)."""
    from distill.metrics import BANDS_CAPTION, POPULARITY_BANDS

    banded = {name: {b["band"]: b for b in r["by_target_popularity"]} for name, r in models.items() if r.get("by_target_popularity")}
    if not banded:
        return []
    users = {band: b["users"] for bands in banded.values() for band, b in bands.items()}
    names = [band for band, _ in POPULARITY_BANDS]
    rows = [f"NDCG@10 by the popularity of the test target: {BANDS_CAPTION}.", "",
            "| model | " + " | ".join(f"{band} ({users[band]:,} users)" if band in users else band for band in names) + " |",
            "|---" * (1 + len(names)) + "|"]
    for name, bands in banded.items():
        rows.append(f"| {LABELS.get(name, name)} | " + " | ".join(f"{bands[b]['mean']:.4f}" if b in bands else "-" for b in names) + " |")
    return rows


def _ranking_table(models: dict[str, Any]) -> list[str]:
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
    return rows


def _context(cfg: Config, layout: RunLayout, storage, metrics: dict, histories: dict[str, list],
             metric: str = "ndcg@10") -> list[str]:
    """What a reader needs to judge the numbers: the data, the models, the training, the labels, the code."""
    from data_pipeline import soft_labels
    from data_pipeline.dataset import load_manifest

    lines = ["## This run", ""]
    try:
        d = load_manifest(layout.data, storage)
        lines.append(f"- **dataset**: `{cfg.data.format}` from `{d.get('source', cfg.data.path)}`: {d['num_users']:,} users, "
                     f"{d['num_items']:,} items, {d['num_interactions']:,} interactions (fingerprint `{d['fingerprint'][:12]}`)")
    except Exception:  # noqa: BLE001 - the context is best effort; the table above does not depend on it
        lines.append(f"- **dataset**: `{cfg.data.path}` (no manifest readable)")
    sizes = ", ".join(f"{LABELS[n]} {metrics['models'][n]['params']:,}" for n in ("teacher", "student_kd", "student_baseline")
                      if n in metrics["models"])
    lines.append(f"- **parameters**: {sizes or 'no model scored'}")
    sign = -1 if metric == "nll" else 1  # the best epoch: largest NDCG, smallest NLL
    epochs = ", ".join(f"{LABELS[n]} {len(h)} (best {1 + max(range(len(h)), key=lambda i: sign * h[i][f'val_{metric}'])})"
                       for n, h in histories.items() if h)
    if epochs:
        lines.append(f"- **epochs run** (best on validation): {epochs}")
    dcfg = cfg.distill
    loss = "temperature KL of the rating distributions" if cfg.run.task == "rating" else f"`{dcfg.loss}`"
    lines.append(f"- **distillation**: loss {loss}, alpha {dcfg.alpha} (weight of the hard label), temperature "
                 f"{dcfg.temperature}; student lr {cfg.student.train.lr}, batch {cfg.student.train.batch_size}, "
                 f"{cfg.student.train.lr_schedule} schedule")
    try:
        store = soft_labels.load_store_manifest(layout.soft_labels, storage)
        aug = store.get("augmentation")
        labels = (f"the whole distribution over {store['k']} rating levels `{store['value_dtype']}`" if store.get("task") == "rating"
                  else f"top-{store['k']} `{store['value_dtype']}` + log-normaliser")
        lines.append(f"- **soft labels**: {labels}, "
                     f"{store['bytes_per_position']:.0f} bytes per position, {store['num_positions']:,} positions"
                     + (f" ({aug['rows']:,} augmented rows, {aug['settings']})" if aug else ""))
    except Exception:  # noqa: BLE001
        lines.append("- **soft labels**: no committed store")
    code = metrics.get("code", {})
    lines.append(f"- **code**: commit `{code.get('commit', 'unknown')}`, recdistill {code.get('version', 'unknown')}; "
                 "configuration: [config.yaml](../config.yaml)")
    return lines


def _stage_table(timings: dict[str, float]) -> list[str]:
    if not timings:
        return []
    rows = ["| stage (pipeline order) | wall time |", "|---|---|"]
    rows += [f"| {name} | {seconds:,.1f} s |" for name, seconds in timings.items()]
    return [*rows, f"| total | {sum(timings.values()):,.1f} s |", ""]


def _frontier_section(layout: RunLayout, storage) -> list[str]:
    """The sweep's frontier (``recdistill sweep``), when one has been written."""
    from cluster.frontier import format_table

    result = _read_json(fsio.join(layout.sweep, "frontier.json"), storage)
    if result is None:
        return []
    return ["## Sweep frontier", "", format_table(result), "![frontier](../sweep/frontier.png)", ""]


def _serving_section(layout: RunLayout, storage, models: dict[str, Any]) -> list[str]:
    """Size, latency under load and quality side by side, when ``bench.serve_load --report`` has run for this run."""
    result = _read_json(fsio.join(layout.report, "serve_load.json"), storage)
    if result is None:
        return []
    by_fingerprint = {r.get("fingerprint"): r for r in models.values() if r.get("fingerprint")}
    bound = result["p99_bound_ms"]
    rows = [f"| served model | parameters | test NDCG@10 | highest load with p99 <= {bound:g} ms | p50 / p99 there | device |",
            "|---|---|---|---|---|---|"]
    for name, entry in result["models"].items():
        quality = by_fingerprint.get(entry["fingerprint"], {}).get("ndcg@10")
        best = entry.get("sustainable")
        load = f"{best['rps']:.0f} req/s ({best['concurrency']} clients)" if best else "none within the bound"
        latency = f"{best['p50_ms']:.1f} / {best['p99_ms']:.1f} ms" if best else "-"
        rows.append(f"| {name} | {entry['params']:,} | {f'{quality:.4f}' if quality is not None else '-'} | {load} | {latency} | "
                    f"{entry['device']} |")
    ratio = result.get("throughput_ratio_at_p99_bound")
    summary = (f"The student holds {ratio:.1f}x the teacher's requests/s at p99 <= {bound:g} ms "
               f"({result['params_ratio']:.0f}x fewer parameters)." if ratio else "No ratio: a model held no level within the bound.")
    return ["## Serving under load (Ray Serve)", "", summary, "", *rows, "",
            f"Closed-loop load on loopback, `bench/serve_load.py` at commit `{result.get('code', {}).get('commit', 'unknown')}`.", ""]
