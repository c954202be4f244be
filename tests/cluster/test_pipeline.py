"""The plan's "is this stage done?" rules and the refusal of a stage left by other
settings (the full pipeline runs in test_job_submit.py)."""

from __future__ import annotations

import json
import shutil

import pytest

from cluster.config import build_config, stage_fingerprint
from cluster.plan import PlanError, build_plan, training_complete


def test_a_training_stage_is_done_only_when_its_history_says_complete(tmp_path):
    cfg = build_config({})
    folder = tmp_path / "student"
    assert not training_complete(str(folder), cfg, "student")  # nothing yet
    folder.mkdir()
    # An interrupted run: a best-so-far export and history exist, but training did not finish.
    (folder / "export.json").write_text("{}")
    (folder / "history.json").write_text(json.dumps({"history": [{"epoch": 1}], "restarts": []}))
    assert not training_complete(str(folder), cfg, "student")
    (folder / "history.json").write_text(json.dumps({"history": [{"epoch": 1}], "restarts": [], "complete": True}))
    assert training_complete(str(folder), cfg, "student")  # a history from before fingerprints: taken at its word
    # A training that ran out of its epochs is done only for as many epochs; one stopped early is done.
    ran_out = {"history": [{"epoch": 1}, {"epoch": 2}], "restarts": [], "complete": True, "stopped_early": False}
    (folder / "history.json").write_text(json.dumps(ran_out))
    assert training_complete(str(folder), build_config({}, ["student.train.epochs=2"]), "student")
    assert not training_complete(str(folder), build_config({}, ["student.train.epochs=3"]), "student")
    more = build_config({}, [f"run.run_dir={tmp_path}", "student.train.epochs=3"])
    assert build_plan(more).stage("distill").action != "done"
    # Continued from its checkpoint; with none left, training again would overwrite its export: refused.
    (tmp_path / "baseline").mkdir()
    (tmp_path / "baseline" / "history.json").write_text(json.dumps(ran_out))
    with pytest.raises(PlanError, match=r"finished 2 epochs; 3 are asked for, but there is no checkpoint under .*ray/baseline"):
        build_plan(more).check()
    (tmp_path / "ray" / "baseline").mkdir(parents=True)
    (tmp_path / "ray" / "baseline" / "checkpoint_manager_snapshot.json").write_text("{}")
    assert build_plan(more).stage("distill --baseline").action == "resume"
    assert not [p for p in build_plan(more).problems if "no checkpoint" in p.message]
    (folder / "history.json").write_text(json.dumps({**ran_out, "stopped_early": True}))
    assert training_complete(str(folder), build_config({}, ["student.train.epochs=3"]), "student")
    # Stopped early under patience 1: done for patience 1, continued for a larger one or none (0), so that
    # two members of a sweep are never stopped by different rules.
    (folder / "history.json").write_text(json.dumps({**ran_out, "stopped_early": True, "patience": 1}))
    assert training_complete(str(folder), build_config({}, ["student.train.epochs=3", "student.train.patience=1"]), "student")
    for patience in (2, 0):
        assert not training_complete(str(folder), build_config({}, ["student.train.epochs=3", f"student.train.patience={patience}"]), "student")
    assert training_complete(str(folder), build_config({}, ["student.train.epochs=2", "student.train.patience=2"]), "student")
    (tmp_path / "baseline" / "history.json").write_text(json.dumps({**ran_out, "stopped_early": True, "patience": 1}))
    shutil.rmtree(tmp_path / "ray" / "baseline")
    with pytest.raises(PlanError, match=r"stopped early under patience 1; patience 4 is asked for, but there is no checkpoint.*"
                                        r"Ask for patience 1, or delete"):
        build_plan(build_config({}, [f"run.run_dir={tmp_path}", "student.train.epochs=3", "student.train.patience=4"])).check()


def test_a_stage_finished_under_other_settings_is_not_done_and_the_plan_refuses_it(tmp_path):
    cfg = build_config({}, [f"run.run_dir={tmp_path}"])
    folder = tmp_path / "baseline"
    folder.mkdir()
    done = {"history": [{"epoch": 1}], "restarts": [], "complete": True, "stage_fingerprint": stage_fingerprint(cfg, "baseline")}
    (folder / "history.json").write_text(json.dumps(done))
    assert training_complete(str(folder), cfg, "baseline")
    assert build_plan(cfg).stage("distill --baseline").action == "done" and not build_plan(cfg).problems
    wider = build_config({}, [f"run.run_dir={tmp_path}", "student.model.d_model=32"])
    assert not training_complete(str(folder), wider, "baseline")
    # Running it would resume the other student's checkpoints: refused by the plan, before any worker starts.
    with pytest.raises(PlanError, match=r"holds a baseline trained with other settings.*ray/baseline"):
        build_plan(wider).check()
    assert not build_plan(build_config({}, [f"run.run_dir={tmp_path / 'nothing-here'}", "student.model.d_model=32"])).problems


def test_stage_fingerprints_ignore_how_long_and_how_a_stage_runs():
    cfg = build_config({})
    same = build_config({}, ["student.train.epochs=50", "student.train.patience=3", "distill.prefetch_blocks=8",
                             "distill.log_consumed=true", "scaling.num_workers=4", "teacher.train.lr=0.5"])
    assert stage_fingerprint(same, "student") == stage_fingerprint(cfg, "student")
    for other in (["student.model.item_dims=[{dim: 8}]"], ["distill.temperature=2"], ["run.seed=1"], ["student.train.lr=0.1"]):
        assert stage_fingerprint(build_config({}, other), "student") != stage_fingerprint(cfg, "student"), other
    # The distilled student depends on its teacher; the baseline does not depend on the distillation
    # settings or the teacher; the teacher not on the student's settings.
    assert stage_fingerprint(cfg, "student", "teacher-a") != stage_fingerprint(cfg, "student", "teacher-b")
    assert stage_fingerprint(cfg, "baseline", "teacher-a") == stage_fingerprint(cfg, "baseline", "teacher-b")
    assert stage_fingerprint(build_config({}, ["distill.alpha=0.7"]), "baseline") == stage_fingerprint(cfg, "baseline")
    assert stage_fingerprint(build_config({}, ["student.model.d_model=32"]), "teacher") == stage_fingerprint(cfg, "teacher")
    assert stage_fingerprint(build_config({}, ["teacher.model.d_model=32"]), "teacher") != stage_fingerprint(cfg, "teacher")
    # Under a cosine schedule the epochs are part of the training (the lr reaches 0 at the last one), for both stages.
    for stage in ("student", "teacher"):
        cosine = [f"{stage}.train.lr_schedule=cosine"]
        assert stage_fingerprint(build_config({}, [*cosine, f"{stage}.train.epochs=40"]), stage) != \
            stage_fingerprint(build_config({}, [*cosine, f"{stage}.train.epochs=80"]), stage)
        assert stage_fingerprint(build_config({}, [*cosine, f"{stage}.train.patience=3"]), stage) == \
            stage_fingerprint(build_config({}, cosine), stage)


def test_an_option_at_its_default_does_not_change_a_fingerprint():
    # So that options added later (at their defaults) leave finished stages finished.
    cfg = build_config({})
    explicit = build_config({}, ["distill.init_from_teacher=false", "distill.embedding_hint=0", "student.model.item_dims=null",
                                 "run.seed=0"])
    assert stage_fingerprint(explicit, "student", "t") == stage_fingerprint(cfg, "student", "t")
