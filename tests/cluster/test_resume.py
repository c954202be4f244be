"""Exact resume: a student SIGKILLed mid-epoch and run again ends bit-identical to one that never stopped,
also when its newest checkpoint was damaged meanwhile (it falls back to the previous one). In-process engine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cluster.cli import main

pytestmark = pytest.mark.integration

SCENARIO = Path(__file__).with_name("resume_scenario.py")
SMALL = ["data.synthetic.num_users=400", "data.synthetic.num_items=80", "data.synthetic.num_clusters=8"]
# 16-row global batches: ~25 steps an epoch, a checkpoint every 4; dropout on, so the RNG matters.
TRAIN = ["student.train.batch_size=16", "student.train.epochs=2", "student.train.patience=0", "student.model.dropout=0.2",
         "distill.checkpoint_every_steps=4", "student.model.max_len=20"]


def _train(run_dir: Path, checkpoints: Path, kill_at: int = 0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCENARIO), str(run_dir), str(checkpoints), str(kill_at), *SMALL, *TRAIN],
                          capture_output=True, text=True, timeout=600)


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint / "student.pt", map_location="cpu", weights_only=True)["model"]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _newest(checkpoints: Path) -> Path:
    return sorted(checkpoints.glob("checkpoint_*"))[-1]


def _first_divergence(straight: Path, killed: Path, resumed_at: tuple[int, int]) -> str:
    """Where two runs' checkpoints first differ, by (epoch, step): before the resume point (the training
    itself is not deterministic) or after it (the resume is wrong). For the failure message only."""
    def by_position(root: Path) -> dict[tuple[int, int], Path]:
        found = {}
        for ckpt in sorted(root.glob("checkpoint_*")):  # a position saved twice (killed, then resumed): the later
            state = json.loads((ckpt / "student_state.json").read_text())
            found[(state["epoch"], state["step"])] = ckpt
        return found

    a, b = by_position(straight), by_position(killed)
    for position in sorted(a.keys() & b.keys()):
        try:
            same = _same(_weights(a[position]), _weights(b[position]))
        except Exception as error:  # noqa: BLE001 (the damaged one, if it was not replaced)
            return f"checkpoint at {position} unreadable: {error}"
        if not same:
            side = "before" if position < resumed_at else "at or after"
            return f"first differing checkpoint: epoch {position[0]} step {position[1]}, {side} the resume at {resumed_at}"
    return "no common checkpoint differs"


def test_a_student_killed_mid_epoch_resumes_bit_identical_even_past_a_damaged_checkpoint(tmp_path):
    runs = {}
    for name in ("straight", "killed"):
        runs[name] = tmp_path / name
        assert main(["prepare", f"run.run_dir={runs[name]}", *SMALL]) == 0

    straight = _train(runs["straight"], tmp_path / "ckpt-straight")
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed = _train(runs["killed"], tmp_path / "ckpt-killed", kill_at=19)  # epoch 1, 3 steps after the step-16 checkpoint
    assert killed.returncode == -9, killed.stderr[-3000:]
    history = runs["killed"] / "baseline" / "history.json"
    assert not history.exists() or not json.loads(history.read_text()).get("complete")
    checkpoints = sorted((tmp_path / "ckpt-killed").glob("checkpoint_*"))
    assert len(checkpoints) >= 2
    newest = json.loads((checkpoints[-1] / "student_state.json").read_text())
    assert (newest["epoch"], newest["step"]) == (0, 16)
    (checkpoints[-1] / "student.pt").write_bytes(b"damaged")  # the newest is now unusable: resume from step 12

    resumed = _train(runs["killed"], tmp_path / "ckpt-killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "student.pt has 7 bytes, its seal says" in resumed.stderr and "trying the previous one" in resumed.stderr
    restarts = json.loads(history.read_text())["restarts"]
    assert restarts == [{"epoch": 0, "step": 12, "from_workers": 1, "workers": 1}]

    straight_dir, killed_dir = tmp_path / "ckpt-straight", tmp_path / "ckpt-killed"
    assert _same(_weights(_newest(straight_dir)), _weights(_newest(killed_dir))), \
        f"resumed weights differ; {_first_divergence(straight_dir, killed_dir, resumed_at=(0, 12))}"
    export_a = load_file(runs["straight"] / "baseline" / "model.safetensors")
    export_b = load_file(runs["killed"] / "baseline" / "model.safetensors")
    assert _same(export_a, export_b)
    fingerprints = [json.loads((r / "baseline" / "export.json").read_text())["fingerprint"] for r in runs.values()]
    assert fingerprints[0] == fingerprints[1]
