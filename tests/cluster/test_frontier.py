"""The frontier's pure parts: epochs to reach the twin, and the table (no Ray, no models)."""

from types import SimpleNamespace

from cluster.frontier import _epochs_to_reach, best_validation, choose_on_validation, format_table, plot


def test_epochs_to_reach_the_twins_best_validation():
    history = [{"epoch": 1, "val_ndcg@10": 0.1}, {"epoch": 2, "val_ndcg@10": 0.25}, {"epoch": 3, "val_ndcg@10": 0.3}]
    assert _epochs_to_reach(history, 0.25) == 2
    assert _epochs_to_reach(history, 0.05) == 1
    assert _epochs_to_reach(history, 0.31) is None


def test_the_table_shows_the_gain_with_its_interval_and_never_reached():
    result = {"metric": "NDCG@10", "users": 400, "teacher": {"params": 20_000, "ndcg@10": 0.4}, "rows": [
        {"member": "1in10-s0-kd", "teacher_share": 0.1, "params": 2_000, "kd_ndcg@10": 0.36, "twin_ndcg@10": 0.30,
         "gain_over_twin": {"gain": 0.2, "ci95_low": 0.05, "ci95_high": 0.35}, "kd_keeps_of_teacher": 0.9,
         "kd_latency_ms_per_request": 0.01, "kd_epochs_to_twin_best_val": None, "twin_best_val_epoch": 4},
        {"member": "1in5-s0-kd", "teacher_share": 0.2, "params": 4_000, "kd_ndcg@10": 0.38, "kd_keeps_of_teacher": 0.95,
         "kd_latency_ms_per_request": 0.02}]}
    table = format_table(result)
    assert "| 1in10-s0-kd | 10.0% | 2,000 | 0.3600 | 0.3000 | +20.0% (+5.0%, +35.0%) | 90% | 0.0100 | never (twin: 4) |" in table
    assert "| 1in5-s0-kd | 20.0% | 4,000 | 0.3800 | - | - | 95% | 0.0200 | - |" in table


def test_the_plot_draws_every_kind_of_member():
    row = {"teacher_share": 0.1, "params": 2_000, "kd_ndcg@10": 0.36, "twin_ndcg@10": 0.30, "kd_keeps_of_teacher": 0.9,
           "kd_latency_ms_per_request": 0.01, "twin_latency_ms_per_request": 0.01}
    rows = [{**row, "member": "1in10-s0-kd"}, {**row, "member": "1in10-s0-kdaug", "augmented": True, "kd_ndcg@10": 0.37},
            {**row, "member": "1in10-s0-kd-a05", "variant": "a05", "kd_ndcg@10": 0.35}]
    png = plot({"metric": "NDCG@10", "users": 9, "teacher": {"params": 20_000, "ndcg@10": 0.4}, "rows": rows})
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_each_member_and_each_twin_keeps_its_best_schedule_on_validation():
    def member(name):
        return SimpleNamespace(name=name, choice=name.split("--")[0])

    names = ["1in10-s0-kd", "1in10-s0-twin", "1in10-s0-twin--lr2", "1in10-s0-kd--lr2", "1in10-s0-kd--long", "1in5-s0-kd--lr2"]
    val = {"1in10-s0-kd": 0.30, "1in10-s0-twin": 0.28, "1in10-s0-twin--lr2": 0.31, "1in10-s0-kd--lr2": 0.29,
           "1in10-s0-kd--long": 0.30, "1in5-s0-kd--lr2": 0.2}
    # Histories: the best epoch counts, not the last one.
    histories = {n: [{"epoch": 1, "val_ndcg@10": v}, {"epoch": 2, "val_ndcg@10": v - 0.05}] for n, v in val.items()}
    assert best_validation(histories) == val
    chosen = choose_on_validation([member(n) for n in names], best_validation(histories))
    # The twin moves to lr2; the distilled member stays on its own schedule (tied with long: the first listed wins).
    assert {k: m.name for k, m in chosen.items()} == {"1in10-s0-kd": "1in10-s0-kd", "1in10-s0-twin": "1in10-s0-twin--lr2",
                                                      "1in5-s0-kd": "1in5-s0-kd--lr2"}


def test_the_table_names_the_schedules_chosen():
    result = {"metric": "NDCG@10", "users": 400, "teacher": {"params": 20_000, "ndcg@10": 0.4}, "rows": [
        {"member": "1in10-s0-kd", "schedule": "base", "twin_schedule": "lr2", "teacher_share": 0.1, "params": 2_000,
         "kd_ndcg@10": 0.36, "twin_ndcg@10": 0.30, "gain_over_twin": {"gain": 0.2, "ci95_low": 0.05, "ci95_high": 0.35},
         "kd_keeps_of_teacher": 0.9, "kd_latency_ms_per_request": 0.01, "kd_epochs_to_twin_best_val": 3, "twin_best_val_epoch": 4}]}
    assert "| 1in10-s0-kd [base; twin lr2] | 10.0% |" in format_table(result)
