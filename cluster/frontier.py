"""The frontier of a sweep: test quality against size and serving latency, distilled and twin side by side.

Every member's best export (selected on validation by its own training; with schedules, the
schedule chosen on validation) is scored on the test split, per user, so that each distilled student and its twin (same size, same seed)
are compared on the same users: the gain carries a paired-bootstrap 95% interval. Also
the share of the teacher's NDCG@10 each keeps, the latency of a batch of 256 requests, and
how many epochs the distilled student needed to reach its twin's best validation NDCG@10.
Where the sweep tried schedules (``sweep.schedules``), each member and each twin is the one
of its schedules with the best validation NDCG@10, chosen apart; test scores only the chosen.
Writes ``run_dir/sweep/frontier.json``, ``frontier.md`` and ``frontier.png``.
"""

from __future__ import annotations

import io
from typing import Any, Optional

import torch

from cluster.config import Config
from cluster.models import load_scorers, mixture_scorer
from data_pipeline import fsio
from data_pipeline.dataset import read_split, train_item_counts
from data_pipeline.layout import RunLayout
from distill.evaluate import latency_per_batch, left_pad_list_array, per_user_ndcg
from distill.metrics import BANDS_CAPTION, POPULARITY_BANDS, mean_by_band, paired_bootstrap_gain, popularity_band

K = 10


def _score(urls: list[str], storage: dict, dataset: dict, test, requests: torch.Tensor) -> dict[str, Any]:
    """One model, or (several urls) the mixture of a teacher ensemble."""
    scorers, params, fingerprints = load_scorers(urls, dataset, storage)
    scorer = mixture_scorer(scorers)
    per_user = per_user_ndcg(scorer, test, dataset["num_items"], k=K)
    latency = latency_per_batch(scorer, requests)
    return {"per_user": per_user, f"ndcg@{K}": float(per_user.mean()), "params": params,
            "latency_ms_per_request": latency["p50_ms"] / len(requests), "fingerprint": "+".join(fingerprints)}


def by_target_popularity(target_band, teacher, kd, twin=None) -> list[dict[str, Any]]:
    """Mean test NDCG@10 of the users whose target is in each popularity band (:data:`POPULARITY_BANDS`): where
    the teacher leads the twin, and how much of that lead the distilled student takes. Empty bands are left out."""
    models = {"teacher": teacher, "kd": kd, **({"twin": twin} if twin is not None else {})}
    means = {name: mean_by_band(values, target_band) for name, values in models.items()}
    return [{"band": b["band"], "users": b["users"], **{name: m[i]["mean"] for name, m in means.items()}}
            for i, b in enumerate(means["teacher"])]


def _epochs_to_reach(history: list[dict], target: float) -> Optional[int]:
    """The first epoch whose validation NDCG@10 reaches ``target`` (None: never)."""
    for record in history:
        if record[f"val_ndcg@{K}"] >= target:
            return int(record["epoch"])
    return None


def best_validation(histories: dict[str, list[dict]]) -> dict[str, float]:
    """Each member's best validation NDCG@10 over its epochs (the number members are chosen by)."""
    return {name: max(h[f"val_ndcg@{K}"] for h in history) for name, history in histories.items()}


def choose_on_validation(members: list, best_val: dict[str, float]) -> dict[str, Any]:
    """For each member name without its schedule (``Member.choice``), the member among its schedules with the
    best validation NDCG@10 (the first listed on a tie: the run's own schedule)."""
    chosen: dict[str, Any] = {}
    for m in members:
        if m.choice not in chosen or best_val[m.name] > best_val[chosen[m.choice].name]:
            chosen[m.choice] = m
    return chosen


def write(cfg: Config, plan, members: list[tuple[Any, str]], files: bool = True) -> dict[str, Any]:
    """Score every (member, folder) and the teacher; write the frontier files (``files``: a partial frontier,
    a progress report, leaves the sweep's own files alone); return the frontier."""
    storage, layout = cfg.data.storage_options, RunLayout(cfg.run.run_dir)
    dataset = plan.dataset
    test = read_split(layout.data, "test", storage, dataset)
    requests = torch.from_numpy(left_pad_list_array(test.slice(0, 256).column("history")))
    # The teacher the students learnt from: with teacher.ensemble, the mixture that labelled the store.
    teacher = _score([plan.teacher_url, *cfg.teacher.ensemble], storage, dataset, test, requests)
    target_band = popularity_band(train_item_counts(layout.data, dataset["num_items"], storage))[
        test.column("target").to_numpy()]
    folders = {m.name: folder for m, folder in members}
    histories = {m.name: fsio.read_json(fsio.join(folder, "history.json"), storage)["history"] for m, folder in members}
    best_val = best_validation(histories)
    chosen = choose_on_validation([m for m, _ in members], best_val)  # validation only: test sees the chosen
    scored = {m.name: _score([folders[m.name]], storage, dataset, test, requests) for m in chosen.values()}
    tried = {choice: {m.schedule or "base": best_val[m.name] for m, _ in members if m.choice == choice} for choice in chosen}
    # A partial sweep (a progress report) may not have finished every schedule of a member yet.
    complete = {choice: set(schedules) == {"base", *cfg.sweep.schedules} for choice, schedules in tried.items()}

    rows = []
    for m in chosen.values():
        if m.baseline:
            continue
        kd = scored[m.name]
        row = {"member": m.choice, "augmented": m.augmented, "variant": m.variant, "fraction": m.fraction, "seed": m.seed, "d_model": m.model.d_model, "params": kd["params"],
               "teacher_share": m.params / teacher["params"], f"kd_ndcg@{K}": kd[f"ndcg@{K}"],
               "kd_latency_ms_per_request": kd["latency_ms_per_request"],
               "kd_keeps_of_teacher": kd[f"ndcg@{K}"] / teacher[f"ndcg@{K}"]}
        if cfg.sweep.schedules:  # the schedules compared on validation (best NDCG@10 each); a partial sweep may lack some
            row.update({"kd_member": m.name, "schedule": m.schedule or "base", "schedules_val": tried[m.choice],
                        "schedules_complete": complete[m.choice]})
        twin_member = chosen.get(m.twin_name)
        if twin_member is not None:
            twin_name = twin_member.name
            twin = scored[twin_name]
            best_twin = max(histories[twin_name], key=lambda h: h[f"val_ndcg@{K}"])  # the first best epoch
            row.update({"twin": twin_name, f"twin_ndcg@{K}": twin[f"ndcg@{K}"], "twin_latency_ms_per_request": twin["latency_ms_per_request"],
                        "gain_over_twin": paired_bootstrap_gain(kd["per_user"], twin["per_user"]),
                        "kd_epochs_to_twin_best_val": _epochs_to_reach(histories[m.name], best_twin[f"val_ndcg@{K}"]),
                        "twin_best_val_epoch": int(best_twin["epoch"])})
            if cfg.sweep.schedules:
                row.update({"twin_schedule": twin_member.schedule or "base", "twin_schedules_val": tried[m.twin_name]})
                row["schedules_complete"] &= complete[m.twin_name]
        twin_per_user = scored[twin_member.name]["per_user"] if twin_member is not None else None
        row["by_target_popularity"] = by_target_popularity(target_band, teacher["per_user"], kd["per_user"], twin_per_user)
        rows.append(row)
    result = {"split": "test", "metric": f"NDCG@{K}, seen-filtered, full ranking", "users": test.num_rows,
              "teacher": {k: v for k, v in teacher.items() if k != "per_user"}, "rows": rows,
              "members": {name: {k: v for k, v in s.items() if k != "per_user"} for name, s in scored.items()}}
    if files:
        fsio.write_json_atomic(fsio.join(layout.sweep, "frontier.json"), result, storage)
        fsio.atomic_write_bytes(fsio.join(layout.sweep, "frontier.md"), format_table(result).encode(), storage)
        fsio.atomic_write_bytes(fsio.join(layout.sweep, "frontier.png"), plot(result), storage)
    return result


def format_table(result: dict[str, Any]) -> str:
    t = result["teacher"]
    lines = [f"frontier ({result['metric']}, {result['users']:,} test users); teacher {t['params']:,} parameters, "
             f"NDCG@{K} {t[f'ndcg@{K}']:.4f}", "",
             "| member | share of teacher | params | distilled | twin | gain over twin (95% CI) | keeps of teacher | "
             "ms/request (distilled) | epochs to twin's best val |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        name = r["member"]
        if "schedule" in r:  # the schedules chosen on validation: the member's, then its twin's
            name += f" [{r['schedule']}; twin {r.get('twin_schedule', '-')}]" + ("" if r.get("schedules_complete", True) else " (not every schedule finished)")
        gain = r.get("gain_over_twin")
        gain_text = f"{100 * gain['gain']:+.1f}% ({100 * gain['ci95_low']:+.1f}%, {100 * gain['ci95_high']:+.1f}%)" if gain else "-"
        twin = f"{r[f'twin_ndcg@{K}']:.4f}" if f"twin_ndcg@{K}" in r else "-"
        reach = "-"
        if "twin_best_val_epoch" in r:  # epochs the distilled student took to reach the twin's best (twin's own epoch)
            reached = r["kd_epochs_to_twin_best_val"]
            reach = f"{'never' if reached is None else reached} (twin: {r['twin_best_val_epoch']})"
        lines.append(f"| {name} | {100 * r['teacher_share']:.1f}% | {r['params']:,} | {r[f'kd_ndcg@{K}']:.4f} | {twin} | "
                     f"{gain_text} | {100 * r['kd_keeps_of_teacher']:.0f}% | {r['kd_latency_ms_per_request']:.4f} | {reach} |")
    if not any(r.get("by_target_popularity") for r in result["rows"]):  # a frontier written before the bands
        return "\n".join(lines) + "\n"
    lines += ["", f"NDCG@{K} by the popularity of the test target, teacher / distilled / twin (users): {BANDS_CAPTION}.", "",
              "| member | " + " | ".join(band for band, _ in POPULARITY_BANDS) + " |", "|---" * (1 + len(POPULARITY_BANDS)) + "|"]
    for r in result["rows"]:
        cells = {b["band"]: f"{b['teacher']:.4f} / {b['kd']:.4f} / {b['twin']:.4f} ({b['users']:,})" if "twin" in b
                 else f"{b['teacher']:.4f} / {b['kd']:.4f} / - ({b['users']:,})" for b in r.get("by_target_popularity", [])}
        lines.append(f"| {r['member']} | " + " | ".join(cells.get(band, "-") for band, _ in POPULARITY_BANDS) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from cluster.report import COLOURS

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    rows = result["rows"]
    groups: dict[str, list[int]] = {}  # one marker per kind of distilled member, all in the distilled colour
    for i, r in enumerate(rows):
        label = "distilled" + (" + augmented rows" if r.get("augmented") else "") + (f" [{r['variant']}]" if r.get("variant") else "")
        groups.setdefault(label, []).append(i)
    for ax, x_kd, x_twin, label in (
        (axes[0], [r["params"] for r in rows], [r["params"] for r in rows], "parameters (log)"),
        (axes[1], [r["kd_latency_ms_per_request"] for r in rows], [r.get("twin_latency_ms_per_request") for r in rows],
         "ms per request (batch of 256, log)"),
    ):
        for (text, members), marker in zip(groups.items(), "o^vD<>pP*hX"):
            ax.scatter([x_kd[i] for i in members], [rows[i][f"kd_ndcg@{K}"] for i in members], label=text,
                       color=COLOURS["student_kd"], marker=marker, alpha=0.85)
        twins = {(x, r[f"twin_ndcg@{K}"]) for x, r in zip(x_twin, rows) if f"twin_ndcg@{K}" in r}
        if twins:
            ax.scatter(*zip(*sorted(twins)), label="twin (no teacher)", color=COLOURS["student_baseline"], marker="s")
        ax.axhline(result["teacher"][f"ndcg@{K}"], color=COLOURS["teacher"], linestyle="--", label="teacher")
        ax.set_xscale("log")
        if ax is axes[1]:  # latencies span a narrow range with no decade tick: label the minor ticks as plain numbers
            ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
            ax.tick_params(axis="x", which="minor", labelsize=7, labelrotation=45)
        ax.set_xlabel(label)
        ax.set_ylabel(f"test NDCG@{K}")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Sweep frontier: distilled students and their twins")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
