"""bench.frontier: the per-size summary over seeds and the issue's goal, from frontier rows."""

from __future__ import annotations

import json

import pytest

from bench.frontier import already_written, merge_frontiers, render, summarise


def row(fraction, seed, kd, twin, low, keeps, **kind):
    return {"member": f"{fraction}-s{seed}", "fraction": fraction, "seed": seed, "params": int(10_000 * fraction),
            "kd_ndcg@10": kd, "twin_ndcg@10": twin, "kd_keeps_of_teacher": keeps,
            "gain_over_twin": {"gain": kd / twin - 1, "ci95_low": low, "ci95_high": kd / twin - 1 + 0.02}, **kind}


def test_the_goal_needs_every_seed_above_five_percent_with_the_interval_above_zero():
    rows = [row(0.2, 0, 0.30, 0.29, -0.01, 0.95), row(0.1, 0, 0.28, 0.26, 0.03, 0.92), row(0.1, 1, 0.282, 0.262, 0.02, 0.93),
            row(0.05, 0, 0.24, 0.25, -0.08, 0.80)]
    summary = summarise(rows)
    sizes = {e["fraction"]: e for e in summary["sizes"]}
    assert sizes[0.1]["seeds"] == 2 and abs(sizes[0.1]["kd_ndcg@10"] - 0.281) < 1e-9
    assert abs(sizes[0.1]["mean_gain"] - (0.281 / 0.261 - 1)) < 1e-9
    assert summary["goal"]["kd"] == {"small_student_meets_gain_and_keep": [0.1], "level_with_twin_at_every_size": False}
    # One seed under 5% and the size no longer meets the goal.
    rows[2] = row(0.1, 1, 0.27, 0.262, 0.001, 0.93)
    assert summarise(rows)["goal"]["kd"]["small_student_meets_gain_and_keep"] == []


def test_no_verdict_on_a_sweep_with_unfinished_members_or_a_member_without_its_twin():
    rows = [row(0.1, 0, 0.28, 0.26, 0.03, 0.92), row(0.2, 0, 0.30, 0.29, -0.01, 0.95)]
    assert summarise(rows)["goal"]["kd"] is not None
    partial = summarise(rows, unfinished=["1in20-s0-kd", "1in20-s0-twin"])
    assert partial["goal"] == {"kd": None} and partial["unfinished_members"] == ["1in20-s0-kd", "1in20-s0-twin"]
    untwinned = {k: v for k, v in row(0.1, 1, 0.29, 0.26, 0.03, 0.92).items() if "twin" not in k and k != "gain_over_twin"}
    assert summarise([*rows, untwinned])["goal"]["kd"] is None  # seed 1's twin missing: "every seed" cannot be judged


def test_a_merged_frontier_is_judged_once_every_member_is_finished_somewhere(tmp_path):
    partial = {**result("t1", {**row(0.1, 0, 0.28, 0.26, 0.03, 0.92), "twin": "1in10-s0-twin"}),
               "complete": False, "unfinished_members": ["1in10-s0-twin", "1in5-s0-kd", "1in5-s0-twin"],
               "costs": {"members": {"0.1-s0": {}}}}  # the members finished, by folder name
    partial["frontier"]["rows"][0].pop("twin_ndcg@10")  # its twin had not finished then
    ladder = {**result("t1", {**row(0.1, 0, 0.29, 0.26, 0.03, 0.92), "twin": "1in10-s0-twin"}),
              "costs": {"members": {"0.1-s0": {}, "1in10-s0-twin": {}}}}
    paths = [tmp_path / "partial.json", tmp_path / "ladder.json"]
    for path, r in zip(paths, (partial, ladder)):
        path.write_text(json.dumps(r))
    render([str(p) for p in paths], tmp_path / "out", "m")
    summary = json.loads((tmp_path / "out" / "frontier_m_summary.json").read_text())["summary"]
    assert summary["unfinished_members"] == ["1in5-s0-kd", "1in5-s0-twin"] and summary["goal"] == {"kd": None}
    # A schedule member unfinished everywhere stays unfinished though its size has a row (chosen among the others).
    scheduled = {**result("t1", {**row(0.1, 0, 0.29, 0.26, 0.03, 0.92), "twin": "1in10-s0-twin", "schedule": "base",
                                 "schedules_val": {"base": 0.3}, "kd_member": "0.1-s0"}),
                 "complete": False, "unfinished_members": ["0.1-s0--lr1"], "costs": {"members": {"0.1-s0": {}, "1in10-s0-twin": {}}}}
    (tmp_path / "scheduled.json").write_text(json.dumps(scheduled))
    render([str(paths[1]), str(tmp_path / "scheduled.json")], tmp_path / "out", "s")
    summary = json.loads((tmp_path / "out" / "frontier_s_summary.json").read_text())["summary"]
    assert summary["unfinished_members"] == ["0.1-s0--lr1"] and summary["goal"] == {"kd": None}


def test_kinds_are_summarised_apart():
    rows = [row(0.1, 0, 0.28, 0.26, 0.03, 0.92), row(0.1, 0, 0.29, 0.26, 0.04, 0.95, augmented=True),
            row(0.1, 0, 0.25, 0.26, -0.1, 0.85, variant="dkd")]
    kinds = {e["kind"]: e for e in summarise(rows)["sizes"]}
    assert set(kinds) == {"kd", "kdaug", "kd-dkd"}
    goal = summarise(rows)["goal"]
    assert goal["kdaug"]["small_student_meets_gain_and_keep"] == [0.1] and goal["kd-dkd"]["level_with_twin_at_every_size"] is False


def result(fingerprint, *rows):
    return {"frontier": {"metric": "NDCG@10", "users": 9, "teacher": {"params": 20_000, "ndcg@10": 0.4, "fingerprint": fingerprint},
                         "rows": [{**r, "teacher_share": r["fraction"], "kd_latency_ms_per_request": 0.1,
                                   "twin_latency_ms_per_request": 0.1} for r in rows]}}


def test_merged_frontiers_keep_each_member_once_and_the_last_record(tmp_path, capsys):
    first = result("t1", row(0.1, 0, 0.28, 0.26, 0.03, 0.92))
    second = result("t1", row(0.1, 0, 0.29, 0.26, 0.03, 0.92), row(0.2, 0, 0.30, 0.29, -0.01, 0.95))
    merged = merge_frontiers([first, second], ["f0.json", "f1.json"])
    assert [r["member"] for r in merged["rows"]] == ["0.2-s0", "0.1-s0"]  # largest first
    assert merged["rows"][1]["kd_ndcg@10"] == 0.29
    # The 1/10 member was retrained between the two results: said, not silently replaced.
    assert merged["replaced_records"] == [{"member": "0.1-s0", "kept": "f1.json", "kept_ndcg@10": 0.29,
                                           "dropped": "f0.json", "dropped_ndcg@10": 0.28, "why": "different records"}]
    assert "0.1-s0: different records in f0.json" in capsys.readouterr().err
    assert merge_frontiers([second, second])["replaced_records"] == []  # the same record twice is no retraining
    paths = []
    for i, r in enumerate((first, second)):
        paths.append(tmp_path / f"f{i}.json")
        paths[-1].write_text(json.dumps(r))
    render([str(p) for p in paths], tmp_path / "out", "both")
    assert (tmp_path / "out" / "frontier_both.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "0.2-s0" in (tmp_path / "out" / "frontier_both.md").read_text()
    summary = json.loads((tmp_path / "out" / "frontier_both_summary.json").read_text())["summary"]
    assert {e["fraction"] for e in summary["sizes"]} == {0.1, 0.2}


def test_frontiers_of_different_teachers_are_not_merged():
    with pytest.raises(SystemExit, match="different teachers"):
        merge_frontiers([result("t1", row(0.1, 0, 0.28, 0.26, 0.03, 0.92)), result("t2", row(0.2, 0, 0.3, 0.29, 0.0, 0.9))])


def test_a_member_chosen_among_other_schedules_is_not_called_retrained(capsys):
    ladder = result("t1", row(0.01, 0, 0.050, 0.046, 0.03, 0.3))
    tuned = result("t1", {**row(0.01, 0, 0.052, 0.049, 0.01, 0.3), "schedule": "lr1", "twin_schedule": "lr1",
                          "schedules_val": {"base": 0.05, "lr1": 0.06}, "twin_schedules_val": {"base": 0.05, "lr1": 0.055}})
    merged = merge_frontiers([ladder, tuned], ["ladder.json", "tuned.json"])
    assert [r.get("schedule") for r in merged["rows"]] == ["lr1"]
    assert merged["replaced_records"][0]["why"] == "chosen among other schedules"
    assert "chosen among other schedules" in capsys.readouterr().err
    again = merge_frontiers([ladder, result("t1", row(0.01, 0, 0.051, 0.046, 0.03, 0.3))], ["a.json", "b.json"])
    assert again["replaced_records"][0]["why"] == "different records"


def test_a_written_result_is_kept_only_while_it_is_the_sweep_as_it_stands():
    members = {"1in10-s0-kd": {"epochs": 3, "train_seconds": 41.5}, "1in10-s0-twin": {"epochs": 3, "train_seconds": 30.25}}
    prior = {"complete": True, "config": "configs/ml1m.yaml", "overrides": ["sweep.fractions=[0.1]"],
             "costs": {"members": json.loads(json.dumps(members))}}  # as read back from the JSON file
    assert already_written(prior, "configs/ml1m.yaml", ["sweep.fractions=[0.1]"], members)
    assert not already_written({**prior, "complete": False}, "configs/ml1m.yaml", ["sweep.fractions=[0.1]"], members)
    assert not already_written(prior, "configs/ml1m.yaml", ["sweep.fractions=[0.2]"], members)
    assert not already_written(prior, "configs/tiny.yaml", ["sweep.fractions=[0.1]"], members)
    retrained = {**members, "1in10-s0-twin": {"epochs": 3, "train_seconds": 29.0}}
    assert not already_written(prior, "configs/ml1m.yaml", ["sweep.fractions=[0.1]"], retrained)
    assert not already_written(prior, "configs/ml1m.yaml", ["sweep.fractions=[0.1]"], {**members, "1in10-s1-kd": members["1in10-s0-kd"]})
