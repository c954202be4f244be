"""The run plan: what it decides from the config and the manifests, and every class of plan that
cannot work refused before any Ray worker starts (no Ray in this module: starting it fails the test)."""

from __future__ import annotations

import json

import pytest

from cluster import ray_setup
from cluster.cli import main
from cluster.config import build_config, stage_fingerprint
from cluster.models import save_model
from cluster.plan import PlanError, build_plan
from data_pipeline.dataset import load_manifest
from distill.model import SequentialRecommender

SMALL = ["data.synthetic.num_users=300", "data.synthetic.num_items=80", "data.synthetic.num_clusters=8"]


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """Connecting to Ray is a no-op here; reaching a worker group's start means a refusal came too late."""
    def refuse(*args, **kwargs):
        raise AssertionError("a Ray worker group was about to start")

    monkeypatch.setattr(ray_setup, "ensure_ray", lambda cfg: None)
    monkeypatch.setattr(ray_setup, "require_resources", lambda cfg, elastic=False: None)
    monkeypatch.setattr(ray_setup, "fit", refuse)


def _prepared(tmp_path, *overrides):
    run_dir = tmp_path / "run"
    assert main(["prepare", f"run.run_dir={run_dir}", *SMALL, *overrides]) == 0
    return run_dir


def _refused(capsys, argv, *expected):
    assert main(argv) == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, err
    return err


def test_an_empty_run_plans_every_stage_and_derives_the_layout_after_prepare(tmp_path, capsys):
    cfg = build_config({}, [f"run.run_dir={tmp_path / 'run'}", *SMALL])
    plan = build_plan(cfg)
    assert [s.action for s in plan.stages.values()] == ["run"] * 6 and not plan.problems
    assert plan.stage("distill").missing_input  # fine in a pipeline, refused alone
    with pytest.raises(PlanError, match="run `recdistill prepare` first"):
        plan.require("train-teacher")
    run_dir = _prepared(tmp_path)
    plan = build_plan(build_config({}, [f"run.run_dir={run_dir}", *SMALL]))
    manifest = load_manifest(str(run_dir / "data"))
    assert plan.num_sequences == manifest["splits"]["train"]["num_sequences"] > 0
    # 300 users, B=128, 16 virtual shards: prepare sized the row groups below 64 so the batch is filled.
    assert plan.layout.data_row_group_size == manifest["splits"]["train"]["row_group_size"] < 64
    assert plan.layout.fill["baseline"] >= 0.9 and plan.layout.fill["distill"] >= 0.9
    assert plan.layout.origin["precompute.row_group_size"] == "derived"


def test_plan_command_prints_a_table_and_json(tmp_path, capsys):
    run_dir = _prepared(tmp_path)
    capsys.readouterr()
    assert main(["plan", f"run.run_dir={run_dir}", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "storage layout" in out and "precompute.row_group_size" in out and "no problems found" in out
    assert main(["plan", "--json", f"run.run_dir={run_dir}", *SMALL]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["stages"]["prepare"]["action"] == "done" and plan["dataset"]["num_users"] == 300


def test_an_impossible_explicit_layout_is_refused_before_training(tmp_path, capsys):
    run_dir = _prepared(tmp_path)
    _refused(capsys, ["pipeline", f"run.run_dir={run_dir}", *SMALL, "precompute.row_group_size=64"],
             "[precompute]", "precompute.row_group_size=64", "global batches of", "Fix: lower precompute.row_group_size")
    assert not (run_dir / "teacher").exists()


def test_an_explicit_data_layout_that_starves_the_batch_is_refused_right_after_prepare(tmp_path, capsys):
    _refused(capsys, ["pipeline", f"run.run_dir={tmp_path / 'run'}", *SMALL, "data.row_group_size=300"],
             "[distill --baseline]", "data.row_group_size")
    assert (tmp_path / "run" / "data" / "manifest.json").exists() and not (tmp_path / "run" / "teacher").exists()


def _teacher_export(url, cfg, num_items, dataset_fingerprint):
    model = SequentialRecommender(cfg.teacher.model, num_items)
    return save_model(url, model.state_dict(), cfg.teacher.model, num_items, {"role": "teacher", "params": 1,
                                                                               "dataset_fingerprint": dataset_fingerprint})


def test_a_store_of_another_teacher_is_refused_before_distill_starts(tmp_path, capsys):
    run_dir = _prepared(tmp_path)
    cfg = build_config({}, [f"run.run_dir={run_dir}", *SMALL])
    dataset = load_manifest(str(run_dir / "data"))
    _teacher_export(str(run_dir / "teacher"), cfg, dataset["num_items"], dataset["fingerprint"])
    (run_dir / "teacher" / "history.json").write_text(json.dumps(
        {"history": [], "complete": True, "stage_fingerprint": stage_fingerprint(cfg, "teacher")}))
    (run_dir / "soft_labels").mkdir()
    (run_dir / "soft_labels" / "manifest.json").write_text(json.dumps(
        {"kind": "recdistill.soft_labels", "schema_version": 1, "teacher_fingerprint": "0" * 64,
         "dataset_fingerprint": dataset["fingerprint"], "num_items": dataset["num_items"]}))
    _refused(capsys, ["distill", f"run.run_dir={run_dir}", *SMALL], "[distill]", "made by teacher", "run precompute again")
    # ... and from another dataset
    (run_dir / "soft_labels" / "manifest.json").write_text(json.dumps(
        {"kind": "recdistill.soft_labels", "schema_version": 1, "dataset_fingerprint": "1" * 64, "num_items": dataset["num_items"],
         "teacher_fingerprint": json.loads((run_dir / "teacher" / "export.json").read_text())["fingerprint"]}))
    _refused(capsys, ["distill", f"run.run_dir={run_dir}", *SMALL], "made by dataset")
    # In a pipeline the store is simply re-made: precompute is planned to run.
    assert build_plan(cfg).stage("precompute").action == "run"


def test_a_checkpoint_from_other_settings_is_refused_before_the_first_stage(tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "teacher").mkdir(parents=True)
    (run_dir / "teacher" / "history.json").write_text(json.dumps({"history": [], "stage_fingerprint": "other"}))
    _refused(capsys, ["pipeline", f"run.run_dir={run_dir}", *SMALL], "[train-teacher]",
             "holds a teacher trained with other settings", "ray/teacher")
    assert not (run_dir / "data").exists()  # refused before prepare


def test_missing_inputs_are_refused_before_the_first_stage(tmp_path, capsys):
    run_dir = tmp_path / "run"
    _refused(capsys, ["pipeline", f"run.run_dir={run_dir}", "data.format=sasrec", f"data.path={tmp_path / 'nope.txt'}"],
             "[prepare]", "data.path", "nope.txt", "does not exist")
    _refused(capsys, ["pipeline", f"run.run_dir={run_dir}", *SMALL, f"teacher.checkpoint={tmp_path / 'no-teacher'}"],
             "[train-teacher]", "teacher.checkpoint", "no-teacher")
    assert not (run_dir / "data").exists()
    _refused(capsys, ["precompute", f"run.run_dir={run_dir}", *SMALL], "[precompute]", "run `recdistill prepare` first")


def test_a_catalog_mismatch_is_refused_before_training(tmp_path, capsys):
    run_dir = _prepared(tmp_path)
    cfg = build_config({}, [f"run.run_dir={run_dir}", *SMALL])
    dataset = load_manifest(str(run_dir / "data"))
    other = str(tmp_path / "other-teacher")
    _teacher_export(other, cfg, dataset["num_items"] + 5, "f" * 64)
    _refused(capsys, ["pipeline", f"run.run_dir={run_dir}", *SMALL, f"teacher.checkpoint={other}"],
             "[precompute]", f"scores {dataset['num_items'] + 5} items", f"the dataset has {dataset['num_items']}")
    _refused(capsys, ["pipeline", f"run.run_dir={run_dir}", *SMALL, "precompute.k=500"], "precompute.k=500", "larger than the catalog")
    _refused(capsys, ["pipeline", f"run.run_dir={run_dir}", *SMALL, "eval.ks=[10,5000]"], "eval.ks contains 5000")
    assert not (run_dir / "teacher").exists()


def test_a_kd_losss_options_under_another_loss_are_refused_not_ignored(tmp_path, capsys):
    _refused(capsys, ["pipeline", f"run.run_dir={tmp_path / 'run'}", *SMALL, "distill.band_weight=2"],
             "[distill]", "distill.band_weight applies to distill.loss=kl_bands only (this run's is kl_topk_tail)")
    _refused(capsys, ["pipeline", f"run.run_dir={tmp_path / 'run'}", *SMALL, "distill.loss=kl_bands", "distill.dkd_target_weight=2"],
             "distill.dkd_target_weight applies to distill.loss=dkd only")
    assert not (tmp_path / "run" / "data").exists()  # refused before prepare
    fine = build_config({}, [f"run.run_dir={tmp_path / 'run'}", *SMALL, "distill.loss=kl_bands", "distill.band_weight=2"])
    assert not [p for p in build_plan(fine).problems if "applies to distill.loss" in p.message]


def test_config_level_problems_name_both_keys(tmp_path):
    cfg = build_config({}, [f"run.run_dir={tmp_path}", "student.train.batch_size=8", "scaling.num_workers=20"])
    with pytest.raises(PlanError) as err:
        build_plan(cfg).check()
    assert "student.train.batch_size (8)" in str(err.value) and "scaling.num_workers (20)" in str(err.value)


def test_a_dataset_prepared_from_another_input_is_not_done(tmp_path, capsys):
    run_dir = _prepared(tmp_path)
    config_before = (run_dir / "config.yaml").read_text()
    log = tmp_path / "log.txt"
    log.write_text("".join(f"{u} {i}\n" for u in range(1, 30) for i in range(1, 8)))
    err = _refused(capsys, ["pipeline", f"run.run_dir={run_dir}", *SMALL, "data.format=sasrec", f"data.path={log}"],
                   "[prepare]", "data.format: prepared from 'synthetic', config says 'sasrec'", f"delete {run_dir}")
    assert "already done" not in err
    _refused(capsys, ["prepare", f"run.run_dir={run_dir}", *SMALL[:-1], "data.synthetic.num_clusters=4"],
             "data.synthetic.num_clusters: prepared from 8, config says 4")
    _refused(capsys, ["pipeline", f"run.run_dir={run_dir}", *SMALL, "data.min_user_interactions=5"], "data.min_user_interactions")
    assert (run_dir / "config.yaml").read_text() == config_before  # never rewritten to claim the new input
    assert build_plan(build_config({}, [f"run.run_dir={run_dir}", *SMALL])).stage("prepare").action == "done"


@pytest.mark.parametrize("damage", ["truncate", "delete", "flip"])
def test_a_damaged_training_shard_is_refused_by_name_before_any_worker(tmp_path, capsys, damage):
    run_dir = _prepared(tmp_path)
    shard = run_dir / "data" / "train" / "part-00000.parquet"
    data = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(data[: len(data) - 100])
        expected = "bytes, the manifest says"
    elif damage == "delete":
        shard.unlink()
        expected = "is missing"
    else:  # one bit inside a data page, same size: the page CRC, when evaluate reads the test split
        shard = run_dir / "data" / "test" / "part-00000.parquet"
        data = bytearray(shard.read_bytes())
        import pyarrow as pa
        import pyarrow.parquet as pq

        column = pq.read_metadata(pa.BufferReader(bytes(data))).row_group(0).column(1)
        data[column.data_page_offset + column.total_compressed_size // 2] ^= 0x01
        shard.write_bytes(bytes(data))
        expected = "unreadable"
    argv = ["distill", "--baseline", f"run.run_dir={run_dir}", *SMALL]
    if damage == "flip":
        argv = ["evaluate", f"run.run_dir={run_dir}", *SMALL]
    err = _refused(capsys, argv, str(shard), expected)
    assert "Traceback" not in err
    assert not (run_dir / "student_baseline").exists()


def test_a_student_as_large_as_its_teacher_is_warned_about(tmp_path, capsys):
    run_dir = _prepared(tmp_path)
    cfg = build_config({}, [f"run.run_dir={run_dir}", *SMALL])
    assert build_plan(cfg).warnings == []
    big = ["student.model.d_model=64", "student.model.num_layers=2", "student.model.num_heads=2", "student.model.ffn_dim=256"]
    plan = build_plan(build_config({}, [f"run.run_dir={run_dir}", *SMALL, *big]))
    assert not plan.problems and len(plan.warnings) == 1
    assert "is at least as large as its teacher" in plan.warnings[0].message
    assert main(["plan", f"run.run_dir={run_dir}", *SMALL, *big]) == 0
    assert "warning: [distill] the student" in capsys.readouterr().out


def test_a_catalog_too_small_for_the_config_is_refused_before_prepare_writes(tmp_path, capsys):
    # A CSV whose item column was mapped to the timestamp column: 10 distinct "items".
    log = tmp_path / "log.csv"
    log.write_text("user,item,ts\n" + "".join(f"{u},{u * 7 + i},{i % 10}\n" for u in range(1, 40) for i in range(6)))
    run_dir = tmp_path / "run"
    _refused(capsys, ["prepare", f"run.run_dir={run_dir}", "data.format=csv", f"data.path={log}", "data.columns.user=user",
                      "data.columns.item=ts", "data.columns.timestamp=null"],
             "(39 users after the filters)", "precompute.k=64 is larger than the catalog (6 items)", "eval.ks contains 10")
    assert not (run_dir / "data" / "manifest.json").exists() and not (run_dir / "data" / "train").exists()


def test_a_finished_student_of_another_dataset_is_not_done(tmp_path, capsys):
    run_dir = _prepared(tmp_path)
    cfg = build_config({}, [f"run.run_dir={run_dir}", *SMALL])
    dataset = load_manifest(str(run_dir / "data"))
    model = SequentialRecommender(cfg.student.model, dataset["num_items"])
    save_model(str(run_dir / "baseline"), model.state_dict(), cfg.student.model, dataset["num_items"],
               {"role": "baseline", "params": 1, "dataset_fingerprint": "0" * 64})
    (run_dir / "baseline" / "history.json").write_text(json.dumps(
        {"history": [], "complete": True, "stage_fingerprint": stage_fingerprint(cfg, "baseline")}))
    _refused(capsys, ["pipeline", f"run.run_dir={run_dir}", *SMALL], "[distill --baseline]",
             "holds a student trained on dataset 000000000000", "to train it again")


def test_a_teacher_ensemble_is_checked_and_its_store_is_the_mixtures(tmp_path, capsys):
    run_dir = _prepared(tmp_path)
    cfg = build_config({}, [f"run.run_dir={run_dir}", *SMALL])
    dataset = load_manifest(str(run_dir / "data"))
    teacher_fp = _teacher_export(str(run_dir / "teacher"), cfg, dataset["num_items"], dataset["fingerprint"])
    (run_dir / "teacher" / "history.json").write_text(json.dumps(
        {"history": [], "complete": True, "stage_fingerprint": stage_fingerprint(cfg, "teacher")}))
    good, other_data, other_len = (str(tmp_path / name) for name in ("good", "other-data", "other-len"))
    good_fp = _teacher_export(good, cfg, dataset["num_items"], dataset["fingerprint"])
    _teacher_export(other_data, cfg, dataset["num_items"], "9" * 64)
    longer = build_config({}, [f"run.run_dir={run_dir}", *SMALL, "teacher.model.max_len=80"])
    _teacher_export(other_len, longer, dataset["num_items"], dataset["fingerprint"])
    _refused(capsys, ["precompute", f"run.run_dir={run_dir}", *SMALL, f"teacher.ensemble=[{good},{other_data},{other_len},{tmp_path}/none]"],
             f"the model at {other_data} was trained on another dataset", f"the model at {other_len} reads 80 items",
             "teacher.ensemble: ", "none")
    # A store labelled by the run's teacher alone is not the ensemble's: precompute runs again, distill waits for it.
    (run_dir / "soft_labels").mkdir()
    (run_dir / "soft_labels" / "manifest.json").write_text(json.dumps(
        {"kind": "recdistill.soft_labels", "schema_version": 1, "teacher_fingerprint": teacher_fp,
         "dataset_fingerprint": dataset["fingerprint"], "num_items": dataset["num_items"]}))
    plan = build_plan(build_config({}, [f"run.run_dir={run_dir}", *SMALL, f"teacher.ensemble=[{good}]"]))
    assert plan.labels_fingerprint not in (teacher_fp, good_fp) and plan.store is None
    assert plan.stage("precompute").action == "run" and "made by teacher" in plan.stage("distill").missing_input
