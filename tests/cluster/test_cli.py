"""The CLI end to end for the stages that need no Ray: prepare and evaluate (popularity)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.cli import STAGES, main

ROOT = Path(__file__).resolve().parents[2]
SMALL = [
    "data.synthetic.num_users=300",
    "data.synthetic.num_items=80",
    "data.synthetic.num_clusters=8",
]


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_has_help(stage, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([stage, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--config" in out and "dotted.key=value" in out


def test_module_form_is_the_same_entry_point():
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0
    for stage in STAGES:
        assert stage in out.stdout


def test_prepare_then_evaluate_popularity(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["--config", str(ROOT / "configs/tiny.yaml"), f"run.run_dir={run_dir}", *SMALL]
    assert main(["prepare", *args]) == 0
    manifest = json.loads((run_dir / "data/manifest.json").read_text())
    assert manifest["num_users"] == 300
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["data"]["synthetic"]["num_users"] == 300 and saved["run"]["run_dir"] == str(run_dir)

    assert main(["evaluate", *args]) == 0
    out = capsys.readouterr().out
    assert "popularity" in out and "NDCG@10" in out
    report = json.loads((run_dir / "report/metrics.json").read_text())
    pop = report["models"]["popularity"]
    assert 0 < pop["ndcg@10"] <= pop["hr@10"] <= 1
    assert pop["num_users"] == 300
    assert "teacher" not in report["models"]  # nothing trained in this run


def test_bad_config_exits_2_with_the_key(tmp_path, capsys):
    assert main(["prepare", f"run.run_dir={tmp_path}", "data.formatt=csv"]) == 2
    assert "data.formatt" in capsys.readouterr().err


def test_evaluate_before_prepare_is_a_clear_error(tmp_path, capsys):
    assert main(["evaluate", f"run.run_dir={tmp_path / 'empty'}"]) == 2
    err = capsys.readouterr().err
    assert "no prepared dataset at" in err and "run `recdistill prepare` first" in err


def test_k_beyond_catalog_is_refused_after_prepare(tmp_path, capsys):
    assert main(["prepare", f"run.run_dir={tmp_path}", *SMALL, "precompute.k=500"]) == 2
    assert "precompute.k=500" in capsys.readouterr().err
