"""A recipe's worker loop under the in-process engine: no Ray, the same loop Ray Train runs."""

from __future__ import annotations

import json

from cluster.cli import main
from cluster.config import build_config
from cluster.distill import train_student_worker
from cluster.engine import InProcessContext

SMALL = ["data.synthetic.num_users=300", "data.synthetic.num_items=80", "data.synthetic.num_clusters=8",
         "student.model.max_len=20", "distill.checkpoint_every_steps=1000"]


def test_the_student_loop_trains_reports_and_resumes_in_process(tmp_path):
    run_dir = tmp_path / "run"
    assert main(["prepare", f"run.run_dir={run_dir}", *SMALL]) == 0
    ctx = InProcessContext(str(tmp_path / "checkpoints"))
    loop_config = {"config": build_config({}, [f"run.run_dir={run_dir}", *SMALL, "student.train.epochs=2"]).to_dict(),
                   "baseline": True, "soft_manifest": None, "teacher_url": None}
    train_student_worker(loop_config, ctx)
    assert [r["metrics"]["epoch"] for r in ctx.reports] == [1, 2] and all(r["checkpoint"] for r in ctx.reports)
    history = json.loads((run_dir / "baseline" / "history.json").read_text())
    assert history["complete"] and [h["epoch"] for h in history["history"]] == [1, 2] and history["restarts"] == []

    # More epochs: the loop resumes from the engine's last checkpoint (epoch 2), not from scratch.
    loop_config["config"] = build_config({}, [f"run.run_dir={run_dir}", *SMALL, "student.train.epochs=3"]).to_dict()
    train_student_worker(loop_config, ctx)
    assert [r["metrics"]["epoch"] for r in ctx.reports] == [1, 2, 3]
    history = json.loads((run_dir / "baseline" / "history.json").read_text())
    assert [h["epoch"] for h in history["history"]] == [1, 2, 3]
    assert history["restarts"] == [{"epoch": 2, "step": 0, "from_workers": 1, "workers": 1}]
