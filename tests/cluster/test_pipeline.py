"""The pipeline's "is this stage done?" rules (the full pipeline runs in test_job_submit.py)."""

from __future__ import annotations

import json

from cluster.pipeline import training_complete
from distill.config import build_config


def test_a_training_stage_is_done_only_when_its_history_says_complete(tmp_path):
    cfg = build_config({})
    folder = tmp_path / "student"
    assert not training_complete(str(folder), cfg)  # nothing yet
    folder.mkdir()
    # An interrupted run: a best-so-far export and history exist, but training did not finish.
    (folder / "export.json").write_text("{}")
    (folder / "history.json").write_text(json.dumps({"history": [{"epoch": 1}], "restarts": []}))
    assert not training_complete(str(folder), cfg)
    (folder / "history.json").write_text(json.dumps({"history": [{"epoch": 1}], "restarts": [], "complete": True}))
    assert training_complete(str(folder), cfg)
