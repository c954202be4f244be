"""``recdistill sweep``: sizes x seeds, each distilled and its twin, from one store; resumable; the frontier."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cluster.config import ConfigError
from cluster.plan import build_plan
from cluster.sweep import plan_members, size_label
from conftest import ROOT, SMALL_RUN, small_config
from data_pipeline.layout import RunLayout
from distill.config import ModelConfig
from distill.sizing import count_parameters
from test_distill import STUDENT, make_store

pytestmark = pytest.mark.integration

SWEEP = ["sweep.fractions=[0.3,0.1,0.02]", "sweep.concurrent=2", "student.train.epochs=2", "distill.log_consumed=false",
         "distill.checkpoint_every_steps=1000"]


def test_size_labels():
    assert [size_label(f) for f in (0.2, 0.1, 0.01, 0.3)] == ["1in5", "1in10", "1in100", "0.3"]


@pytest.fixture(scope="module")
def sweep_store(ray_session, tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("sweep") / "run")


def test_members_are_sized_against_the_teacher_and_an_impossible_size_is_refused(sweep_store):
    cfg = small_config(sweep_store.run.run_dir, *STUDENT, *SWEEP)
    plan = build_plan(cfg)
    members = plan_members(cfg, plan)
    assert [m.name for m in members] == ["0.3-s0-kd", "0.3-s0-twin", "1in10-s0-kd", "1in10-s0-twin",
                                         "1in50-s0-kd", "1in50-s0-twin"]
    teacher = count_parameters(ModelConfig.model_validate(plan.teacher["model"]), plan.dataset["num_items"])
    for m in members:
        assert m.params <= m.fraction * teacher
    assert members[0].model == members[1].model and members[0].params > members[2].params > members[4].params
    with pytest.raises(ConfigError, match="sweep.fractions: 0.0001 of the teacher's"):
        plan_members(small_config(sweep_store.run.run_dir, *STUDENT, "sweep.fractions=[0.0001]"), plan)
    for duplicate in ("sweep.seeds=[0,0]", "sweep.fractions=[0.1,0.1]", "sweep.fractions=[0.3333,0.33334]"):  # one folder, two members
        with pytest.raises(ConfigError, match="two members would be named"):
            plan_members(small_config(sweep_store.run.run_dir, *STUDENT, duplicate), plan)


def test_with_augmented_adds_a_member_per_size_and_seed_and_needs_augmented_rows(tmp_path):
    from types import SimpleNamespace

    from cluster.sweep import member_config

    teacher = {"model": {"d_model": 64, "num_layers": 2, "num_heads": 2, "ffn_dim": 256}, "params": None}
    store = {"teacher_fingerprint": "t" * 16, "augmentation": {"settings": {"ratio": 1.0, "ops": ["crop"], "rate": 0.3}}}
    plan = SimpleNamespace(dataset={"num_items": 60}, teacher=teacher, store=store)
    cfg = small_config(tmp_path / "run", *STUDENT, "sweep.fractions=[0.1]", "sweep.seeds=[0,1]", "sweep.with_augmented=true")
    members = plan_members(cfg, plan)
    # Each seed's first distilled member and its twin first: a sweep cut short has that comparison.
    assert [m.name for m in members] == ["1in10-s0-kd", "1in10-s0-twin", "1in10-s0-kdaug",
                                         "1in10-s1-kd", "1in10-s1-twin", "1in10-s1-kdaug"]
    assert [member_config(cfg, m).distill.augmented for m in (members[0], members[2])] == ["skip", "use"]
    assert {m.twin_name for m in members} == {"1in10-s0-twin", "1in10-s1-twin"}
    # Without with_augmented the distilled members follow distill.augmented (auto: the store has them).
    auto = plan_members(small_config(tmp_path / "run", *STUDENT, "sweep.fractions=[0.1]"), plan)
    assert [m.name for m in auto] == ["1in10-s0-kdaug", "1in10-s0-twin"]
    # Levers: one more distilled member per size, seed and variant, each with its own overrides, the same twin.
    levers = small_config(tmp_path / "run", *STUDENT, "sweep.fractions=[0.1]",
                          "sweep.variants={a05: [distill.alpha=0.5], t2: [distill.temperature=2, student.train.lr=0.01]}")
    members = plan_members(levers, plan)
    assert [m.name for m in members] == ["1in10-s0-kdaug", "1in10-s0-twin", "1in10-s0-kdaug-a05", "1in10-s0-kdaug-t2"]
    configs = [member_config(levers, m) for m in members]
    assert [configs[i].distill.alpha for i in (0, 2, 3)] == [0.2, 0.5, 0.2] and configs[3].student.train.lr == 0.01
    assert len({m.twin_name for m in members}) == 1
    with pytest.raises(ConfigError, match="(?s)sweep.variants.bad: .*distill.temperature"):
        plan_members(small_config(tmp_path / "run", *STUDENT, "sweep.variants={bad: [distill.temperature=-1]}"), plan)
    with pytest.raises(ConfigError, match="must be a dotted override of a distill.\\* or student.train.\\* key"):
        small_config(tmp_path / "run", "sweep.variants={k: [precompute.k=5]}")
    with pytest.raises(ConfigError, match="sweep.with_augmented: the soft-label store at .* has no augmented rows"):
        plan_members(cfg, SimpleNamespace(dataset={"num_items": 60}, teacher=teacher, store={"teacher_fingerprint": "t"}))


def test_schedules_train_every_member_and_its_twin_alike(tmp_path):
    from types import SimpleNamespace

    from cluster.sweep import member_config

    teacher = {"model": {"d_model": 64, "num_layers": 2, "num_heads": 2, "ffn_dim": 256}, "params": None}
    plan = SimpleNamespace(dataset={"num_items": 60}, teacher=teacher, store={"teacher_fingerprint": "t" * 16})
    cfg = small_config(tmp_path / "run", *STUDENT, "sweep.fractions=[0.1]", "sweep.variants={a05: [distill.alpha=0.5]}",
                       "sweep.schedules={lr2: [student.train.lr=0.002], long: [student.train.epochs=7, student.train.lr=0.01]}")
    members = plan_members(cfg, plan)
    # The run's own schedule first (its first comparison before anything else), then each schedule's members in turn.
    assert [m.name for m in members] == ["1in10-s0-kd", "1in10-s0-twin", "1in10-s0-kd-a05",
                                         "1in10-s0-twin--lr2", "1in10-s0-kd--lr2", "1in10-s0-kd-a05--lr2",
                                         "1in10-s0-twin--long", "1in10-s0-kd--long", "1in10-s0-kd-a05--long"]
    by_name = {m.name: member_config(cfg, m) for m in members}
    base_lr = by_name["1in10-s0-kd"].student.train.lr
    assert by_name["1in10-s0-twin--lr2"].student.train.lr == by_name["1in10-s0-kd--lr2"].student.train.lr == 0.002 != base_lr
    assert by_name["1in10-s0-twin"].student.train.lr == base_lr
    long = by_name["1in10-s0-kd-a05--long"]  # a variant and a schedule together
    assert (long.distill.alpha, long.student.train.epochs, long.student.train.lr) == (0.5, 7, 0.01)
    assert {m.choice for m in members} == {"1in10-s0-kd", "1in10-s0-twin", "1in10-s0-kd-a05"}
    assert {m.twin_name for m in members} == {"1in10-s0-twin"}
    # A schedule is a training setting that twins share: a distill.* key is a variant's, not a schedule's.
    with pytest.raises(ConfigError, match="schedule 'kd'.*student.train.\\* key"):
        small_config(tmp_path / "run", "sweep.schedules={kd: [distill.alpha=0.5]}")
    with pytest.raises(ConfigError, match="'base' is reserved"):
        small_config(tmp_path / "run", "sweep.schedules={base: [student.train.lr=0.1]}")
    with pytest.raises(ConfigError, match="(?s)sweep.schedules.bad: .*lr"):
        plan_members(small_config(tmp_path / "run", *STUDENT, "sweep.schedules={bad: [student.train.lr=-1]}"), plan)


def _sweep_cmd(run_dir: Path) -> list[str]:
    overrides = [f"run.run_dir={run_dir}", *SMALL_RUN, *STUDENT, *SWEEP]
    return [sys.executable, "-m", "cluster.cli", "sweep", "--config", str(ROOT / "configs" / "tiny.yaml"), *overrides]


def _complete(run_dir: Path) -> dict[str, str]:
    out = {}
    for history in sorted((run_dir / "sweep").glob("*/history.json")):
        if json.loads(history.read_text()).get("complete"):
            out[history.parent.name] = history.read_text()
    return out


def test_a_killed_sweep_reruns_only_its_unfinished_members_and_writes_the_frontier(sweep_store, tmp_path):
    run_dir = Path(sweep_store.run.run_dir)
    driver = subprocess.Popen(_sweep_cmd(run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.monotonic() + 600
    while len(_complete(run_dir)) < 2 and time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.5)
    family = psutil.Process(driver.pid).children(recursive=True)
    driver.kill()  # SIGKILL: the driver gets no chance to clean up
    for proc in family:  # the local Ray it started (its own processes)
        try:
            proc.kill()
        except psutil.Error:
            pass
    driver.wait()
    before = _complete(run_dir)
    assert 2 <= len(before) < 6, f"{len(before)} members finished before the kill"
    # A progress report of the cut-short sweep trains nothing: the finished members are scored, the others listed.
    report = subprocess.run([sys.executable, "-m", "bench.frontier", "--finished-only", "--name", "partial", "--results-dir",
                             str(tmp_path), *_sweep_cmd(run_dir)[4:]], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert report.returncode == 0, report.stderr[-3000:]
    partial = json.loads((tmp_path / "frontier_partial.json").read_text())
    assert not partial["complete"] and set(partial["unfinished_members"]).isdisjoint(before)
    assert len(partial["unfinished_members"]) + len(before) == 6 and _complete(run_dir) == before
    assert set(partial["frontier"]["members"]) == set(before)
    assert not Path(RunLayout(str(run_dir)).sweep, "frontier.json").exists()  # the sweep's own frontier: only when whole

    rerun = subprocess.run(_sweep_cmd(run_dir), capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"({len(before)} already finished)" in rerun.stdout
    after = _complete(run_dir)
    assert len(after) == 6
    assert {name: after[name] for name in before} == before  # the finished ones were not trained again

    sweep_dir = RunLayout(str(run_dir)).sweep
    frontier = json.loads(Path(sweep_dir, "frontier.json").read_text())
    assert [r["member"] for r in frontier["rows"]] == ["0.3-s0-kd", "1in10-s0-kd", "1in50-s0-kd"]
    for row in frontier["rows"]:
        gain = row["gain_over_twin"]
        assert gain["ci95_low"] <= gain["gain"] <= gain["ci95_high"] and gain["users"] == frontier["users"]
        assert 0 < row["kd_keeps_of_teacher"] and row["params"] <= row["fraction"] * frontier["teacher"]["params"]
        # By the target's popularity band: every test user in one band, and the bands' means make the whole.
        bands = row["by_target_popularity"]
        assert sum(b["users"] for b in bands) == frontier["users"] and {b["band"] for b in bands} <= {"head", "middle", "tail"}
        for model, overall in (("kd", row["kd_ndcg@10"]), ("twin", row["twin_ndcg@10"]), ("teacher", frontier["teacher"]["ndcg@10"])):
            assert sum(b[model] * b["users"] for b in bands) / frontier["users"] == pytest.approx(overall, rel=1e-5)
    assert Path(sweep_dir, "frontier.png").stat().st_size > 1000
    assert "| 1in10-s0-kd |" in Path(sweep_dir, "frontier.md").read_text()
    assert "| member | head | middle | tail |" in Path(sweep_dir, "frontier.md").read_text()

    # The benchmark over the finished sweep: the progress report above is rescored (it was not whole), then kept.
    bench = [sys.executable, "-m", "bench.frontier", "--name", "partial", "--results-dir", str(tmp_path), *_sweep_cmd(run_dir)[4:]]
    whole = subprocess.run(bench, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    written = (tmp_path / "frontier_partial.json").read_text()
    assert json.loads(written)["complete"] and set(json.loads(written)["costs"]["members"]) == set(after)
    again = subprocess.run(bench, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert again.returncode == 0 and "already holds this sweep" in again.stdout, again.stderr[-3000:]
    assert (tmp_path / "frontier_partial.json").read_text() == written

    # Schedules, on the members just trained: copies stand in for the 1/10 pair trained under a second schedule
    # (training one is what the sweep above does), the twin's copy better on validation, the distilled one's worse.
    # The frontier compares the distilled member with the twin chosen on validation, scored on test.
    from cluster import frontier as frontier_files
    from cluster.sweep import member_folder

    cfg = small_config(run_dir, *STUDENT, *SWEEP, "sweep.fractions=[0.1]", "sweep.schedules={lr2: [student.train.lr=0.002]}")
    members = plan_members(cfg, build_plan(cfg))
    for name, shift in (("1in10-s0-twin", 0.5), ("1in10-s0-kd", -0.5)):
        copy = Path(sweep_dir, f"{name}--lr2")
        shutil.copytree(Path(sweep_dir, name), copy)
        record = json.loads((copy / "history.json").read_text())
        for epoch in record["history"]:
            epoch["val_ndcg@10"] += shift
        (copy / "history.json").write_text(json.dumps(record))
    scheduled = frontier_files.write(cfg, build_plan(cfg), [(m, member_folder(cfg, m)) for m in members], files=False)
    [row] = scheduled["rows"]
    before_row = next(r for r in frontier["rows"] if r["member"] == "1in10-s0-kd")
    assert (row["member"], row["schedule"], row["twin"], row["twin_schedule"]) == ("1in10-s0-kd", "base", "1in10-s0-twin--lr2", "lr2")
    assert set(row["schedules_val"]) == set(row["twin_schedules_val"]) == {"base", "lr2"} and row["schedules_complete"]
    assert row["kd_member"] == "1in10-s0-kd"  # the chosen member's folder under run_dir/sweep
    assert row["twin_schedules_val"]["lr2"] > row["twin_schedules_val"]["base"]
    assert row["kd_ndcg@10"] == before_row["kd_ndcg@10"] and row["twin_ndcg@10"] == before_row["twin_ndcg@10"]  # the copy's weights
    assert set(scheduled["members"]) == {"1in10-s0-kd", "1in10-s0-twin--lr2"}  # test scores only the chosen
    assert "| 1in10-s0-kd [base; twin lr2] |" in frontier_files.format_table(scheduled)
