"""``recdistill evaluate``: full-ranking test metrics of every model present in run_dir.

Always the popularity baseline; the teacher (``teacher.checkpoint`` when given), the
distilled student and the baseline student when their exports exist. A model trained on
another dataset is refused by name. Writes ``run_dir/report/metrics.json``, which also
lists each model it could not score and why: "not trained yet", or "damaged" (its weights
do not match their fingerprint). A damaged model is never silently left out: the
intact ones are scored and written, then the stage fails naming the damaged export.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from cluster.common import code_version, model_exports, save_resolved_config
from cluster.plan import RunPlan, build_plan
from data_pipeline import fsio
from data_pipeline.dataset import read_split, train_item_counts
from data_pipeline.layout import RunLayout
from cluster.config import Config
from distill.evaluate import evaluate_split_with_ranks, latency_per_batch, left_pad_list_array, model_scorer, popularity_scorer
from distill.metrics import mean_by_band, ndcg_at_k, paired_bootstrap_gain, popularity_band
from data_pipeline.exports import ExportError
from cluster.models import load_available, load_scorers, mixture_scorer

log = logging.getLogger(__name__)


def run(cfg: Config, plan: Optional[RunPlan] = None) -> dict[str, Any]:
    plan = plan or build_plan(cfg)
    plan.require("evaluate")
    layout = RunLayout(cfg.run.run_dir)
    storage = cfg.data.storage_options
    save_resolved_config(cfg)
    if cfg.run.task == "rating":  # rating metrics instead of ranking ones
        from cluster import evaluate_rating

        return evaluate_rating.run(cfg, plan)
    manifest = plan.dataset
    num_items = manifest["num_items"]
    test = read_split(layout.data, "test", storage, manifest)
    device = "cuda" if cfg.run.device != "cpu" and torch.cuda.is_available() else "cpu"

    results: dict[str, Any] = {}
    # Latency: one batch of 256 requests (the test users' histories) on this device.
    requests = torch.from_numpy(left_pad_list_array(test.slice(0, 256).column("history"))).to(device)
    counts = train_item_counts(layout.data, num_items, storage)
    per_user = {}  # NDCG@10 of every model per test user, from the pass that scores it

    def score(name: str, scorer) -> dict[str, Any]:
        scores, ranks = evaluate_split_with_ranks(scorer, test, num_items, cfg.eval.ks, cfg.eval.batch_size, device)
        per_user[name] = ndcg_at_k(ranks, 10).numpy()
        return scores

    popularity = popularity_scorer(counts)
    results["popularity"] = score("popularity", popularity)
    results["popularity"].update(params=0, bytes=int(counts.nbytes), latency=latency_per_batch(popularity, requests))
    scorers = {}
    loaded, unavailable = load_available(model_exports(cfg), manifest, storage)
    for name, (folder, model, meta) in loaded.items():
        model.to(device)
        scorer = model_scorer(model, meta["model"]["max_len"])
        scores = score(name, scorer)
        params = sum(p.numel() for p in model.parameters())
        scores.update(params=params, bytes=params * 4, fingerprint=meta["fingerprint"], latency=latency_per_batch(scorer, requests))
        results[name] = scores
        scorers[name] = scorer
    if cfg.teacher.ensemble and "teacher" in scorers:
        # The teacher that labelled the store: the mixture of the run's teacher and teacher.ensemble's members
        # (a damaged member is an error: the ensemble cannot be scored without it). The teacher is already loaded.
        members, member_params, _ = load_scorers(cfg.teacher.ensemble, manifest, storage, device)
        ensemble, params = mixture_scorer([scorers["teacher"], *members]), results["teacher"]["params"] + member_params
        scores = score("teacher_ensemble", ensemble)
        scores.update(params=params, bytes=params * 4, members=1 + len(cfg.teacher.ensemble),
                      latency=latency_per_batch(ensemble, requests))
        results["teacher_ensemble"] = scores
    # Each model by the popularity band of the user's target (where the teacher leads and what the students take
    # of it), and the distilled student's gain over its twin.
    target_band = popularity_band(counts)[test.column("target").to_numpy()]
    for name, values in per_user.items():
        results[name]["by_target_popularity"] = mean_by_band(values, target_band)
    gains = {}
    if "student_kd" in per_user and "student_baseline" in per_user:
        # The same test users for both: a paired bootstrap of the distilled student's gain over its twin.
        gains["student_kd_over_baseline"] = {"metric": "ndcg@10", **paired_bootstrap_gain(per_user["student_kd"], per_user["student_baseline"])}

    report = {
        "split": "test",
        "protocol": "leave-one-out, full ranking over the catalog, pessimistic ties; "
        "top level seen-filtered, 'unfiltered' below",
        "dataset_fingerprint": manifest["fingerprint"],
        "device": str(device),
        "models": results,
        "gains": gains,
        "unavailable": unavailable,
        "code": code_version(),
    }
    fsio.write_json_atomic(layout.metrics, report, storage)
    ks = cfg.eval.ks
    print(f"{'model':<18}" + "".join(f"{'HR@' + str(k):>10}{'NDCG@' + str(k):>10}" for k in ks) + f"{'params':>12}{'p50 ms/256':>12}")
    for name, r in results.items():
        print(f"{name:<18}" + "".join(f"{r[f'hr@{k}']:>10.4f}{r[f'ndcg@{k}']:>10.4f}" for k in ks)
              + f"{r['params']:>12,}{r['latency']['p50_ms']:>12.2f}")
    for name, why in unavailable.items():
        print(f"{name:<18}{why}")
    for name, g in gains.items():
        print(f"{name}: NDCG@10 {100 * g['gain']:+.1f}% (95% CI {100 * g['ci95_low']:+.1f}% .. {100 * g['ci95_high']:+.1f}%)")
    print(f"metrics written to {layout.metrics}")
    damaged = {name: why for name, why in unavailable.items() if why.startswith("damaged")}
    if damaged:
        raise DamagedExports(report, "; ".join(why.removeprefix("damaged: ") for why in damaged.values())
                             + " (the intact models were scored; retrain or restore the damaged one)")
    return report


class DamagedExports(ExportError):
    """Some model exports are present but damaged; ``report`` holds what was measured without them."""

    def __init__(self, report: dict[str, Any], message: str):
        super().__init__(message)
        self.report = report
