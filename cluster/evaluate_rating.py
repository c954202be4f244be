"""``recdistill evaluate`` for the rating task: how well each model predicts the rating a user gives the test item.

Every model is scored on the same test examples (each user's last rating, leave-one-out): RMSE and
MAE of the expected rating, NLL and accuracy of the predicted distribution, and its expected
calibration error. The mean baselines predict a smoothed histogram of ratings: of all training
ratings (global mean), of the user's earlier ratings (user mean), of the item's training ratings
(item mean); their smoothing strength is selected on the validation split. The distilled student
is compared with its twin, and the teacher (and a teacher ensemble, ``teacher.ensemble``: the mixture
of the members' distributions, which labelled the store) with the best mean baseline, by paired
bootstrap over the test examples.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from cluster.common import code_version, model_exports
from cluster.models import load_available, load_model
from data_pipeline import fsio
from data_pipeline.dataset import read_split
from data_pipeline.exports import ExportError, check_export_fits_dataset
from data_pipeline.layout import RunLayout
from distill.ensemble import mixture_log_probs
from distill.metrics import paired_bootstrap_delta
from distill.rating import per_example_errors, rating_metrics
from distill.rating_training import rating_probs, split_examples

STRENGTHS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)  # pseudo-counts of the mean baselines' prior, chosen on validation
COMPARED = ("rmse", "mae", "nll", "accuracy")


def _histograms(keys: np.ndarray, levels: np.ndarray, num_keys: int, num_levels: int) -> np.ndarray:
    """(num_keys, R) counts of each level per key (levels 1..R)."""
    counts = np.zeros((num_keys, num_levels), dtype=np.float64)
    np.add.at(counts, (keys, levels - 1), 1.0)
    return counts


def mean_baselines(train: pa.Table, split: pa.Table, num_items: int, num_levels: int, strength: float) -> dict[str, np.ndarray]:
    """(N, R) predicted distributions of each mean baseline for the rows of a valid/test ``split``:
    counts plus ``strength`` pseudo-counts spread as the global histogram (a user or item seen once
    keeps every level possible, so NLL stays finite)."""
    train_items = train.column("items").combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    train_levels = train.column("levels").combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    prior = np.bincount(train_levels - 1, minlength=num_levels).astype(np.float64)
    prior /= prior.sum()
    histories, levels, targets, _ = split_examples(split)
    rows = np.repeat(np.arange(len(targets)), (histories != 0).sum(axis=1))
    user_counts = _histograms(rows, levels[histories != 0], len(targets), num_levels)
    item_counts = _histograms(train_items, train_levels, num_items + 1, num_levels)[targets]

    def smooth(counts: np.ndarray) -> np.ndarray:
        return (counts + strength * prior) / (counts.sum(axis=1, keepdims=True) + strength)

    return {"global_mean": np.broadcast_to(prior, (len(targets), num_levels)).copy(), "user_mean": smooth(user_counts),
            "item_mean": smooth(item_counts)}


def _nll(probs: np.ndarray, true_levels: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(true_levels)), true_levels], 1e-12, None)).mean())


def select_strength(train: pa.Table, valid: pa.Table, num_items: int, num_levels: int) -> dict[str, float]:
    """Each mean baseline's smoothing strength: the one of :data:`STRENGTHS` with the lowest validation NLL."""
    true_levels = split_examples(valid)[3]
    scores = {s: mean_baselines(train, valid, num_items, num_levels, s) for s in STRENGTHS}
    return {name: min(STRENGTHS, key=lambda s: _nll(scores[s][name], true_levels)) for name in ("user_mean", "item_mean")}


def run(cfg, plan) -> dict[str, Any]:
    layout, storage = RunLayout(cfg.run.run_dir), cfg.data.storage_options
    manifest = plan.dataset
    num_items, values = manifest["num_items"], [float(v) for v in manifest["rating_values"]]
    R, value_tensor = len(values), torch.tensor(values, dtype=torch.float64)
    train = read_split(layout.data, "train", storage, manifest)
    valid, test = read_split(layout.data, "valid", storage, manifest), read_split(layout.data, "test", storage, manifest)
    true_levels = torch.from_numpy(split_examples(test)[3])

    strengths = select_strength(train, valid, num_items, R)
    probs: dict[str, torch.Tensor] = {}
    results: dict[str, Any] = {}
    for name, p in mean_baselines(train, test, num_items, R, 1.0).items():
        if name != "global_mean":  # recomputed at the strength chosen on validation
            p = mean_baselines(train, test, num_items, R, strengths[name])[name]
        probs[name] = torch.from_numpy(p)
        results[name] = {**rating_metrics(probs[name], true_levels, value_tensor), "params": 0,
                         **({"smoothing": strengths[name]} if name in strengths else {})}
    loaded, unavailable = load_available(model_exports(cfg), manifest, storage)
    for name, (folder, model, meta) in loaded.items():
        if meta.get("rating_values") is None:
            raise ExportError(f"{folder} holds a next-item model; run.task=rating evaluates rating models")
        probs[name] = rating_probs(model, test, cfg.eval.batch_size)
        results[name] = {**rating_metrics(probs[name], true_levels, value_tensor),
                         "params": sum(p.numel() for p in model.parameters()), "fingerprint": meta["fingerprint"]}

    if cfg.teacher.ensemble and "teacher" in probs:
        # The teacher that labelled the store: the mixture of the run's teacher and teacher.ensemble's members.
        members, params = [probs["teacher"]], results["teacher"]["params"]
        for url in cfg.teacher.ensemble:
            model, meta = load_model(url, storage)
            check_export_fits_dataset(meta, manifest, url)
            members.append(rating_probs(model, test, cfg.eval.batch_size))
            params += sum(p.numel() for p in model.parameters())
        probs["teacher_ensemble"] = mixture_log_probs(m.log() for m in members).exp()
        results["teacher_ensemble"] = {**rating_metrics(probs["teacher_ensemble"], true_levels, value_tensor), "params": params,
                                       "members": len(members)}

    errors = {name: per_example_errors(p, true_levels, value_tensor) for name, p in probs.items()}
    best_mean = min(("global_mean", "user_mean", "item_mean"), key=lambda n: results[n]["rmse"])
    pairs = {"student_kd_vs_baseline": ("student_kd", "student_baseline"), "teacher_vs_best_mean": ("teacher", best_mean),
             "teacher_ensemble_vs_best_mean": ("teacher_ensemble", best_mean)}
    comparisons = {}
    for label, (a, b) in pairs.items():
        if a in errors and b in errors:
            comparisons[label] = {"a": a, "b": b, **{metric: _delta(errors[a], errors[b], metric) for metric in COMPARED}}
    report = {
        "task": "rating", "split": "test",
        "protocol": "leave-one-out: each user's last rating; expected rating for RMSE/MAE, top level for accuracy, "
                    "ECE over 10 equal-width confidence bins",
        "rating_values": values, "dataset_fingerprint": manifest["fingerprint"], "models": results,
        "best_mean_baseline": best_mean, "comparisons": comparisons, "unavailable": unavailable, "code": code_version(),
    }
    fsio.write_json_atomic(layout.metrics, report, storage)
    print(format_rating_table(report))
    print(f"metrics written to {layout.metrics}")
    return report


def _delta(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], metric: str) -> dict[str, float]:
    """Model a minus model b on ``metric``, with a paired-bootstrap 95% interval over the test examples."""
    column = {"rmse": "squared_error", "mae": "absolute_error", "nll": "nll", "accuracy": "correct"}[metric]
    return paired_bootstrap_delta(a[column].numpy(), b[column].numpy(), "rmse" if metric == "rmse" else "mean")


def format_rating_table(report: dict[str, Any]) -> str:
    lines = [f"{'model':<18}{'RMSE':>9}{'MAE':>9}{'NLL':>9}{'accuracy':>10}{'ECE':>8}{'params':>12}"]
    for name, r in report["models"].items():
        lines.append(f"{name:<18}{r['rmse']:>9.4f}{r['mae']:>9.4f}{r['nll']:>9.4f}{r['accuracy']:>10.4f}{r['ece']:>8.4f}"
                     f"{r['params']:>12,}")
    for name, why in report.get("unavailable", {}).items():
        lines.append(f"{name:<18}{why}")
    for label, c in report.get("comparisons", {}).items():
        parts = [f"{m.upper()} {c[m]['delta']:+.4f} [{c[m]['ci95_low']:+.4f}, {c[m]['ci95_high']:+.4f}]" for m in COMPARED]
        lines.append(f"{c['a']} - {c['b']} (95% CI): " + "; ".join(parts))
    return "\n".join(lines)
