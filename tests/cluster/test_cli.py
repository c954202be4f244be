"""The CLI end to end for the stages that need no Ray: prepare and evaluate (popularity)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.cli import STAGES, is_override, main

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


def test_environment_faults_are_one_line_and_bugs_keep_their_traceback():
    import errno

    from botocore.exceptions import EndpointConnectionError, NoCredentialsError

    from cluster.cli import environment_error

    assert "storage credentials were refused or not found" in environment_error(NoCredentialsError())
    wrapped = OSError("listing failed")
    wrapped.__cause__ = EndpointConnectionError(endpoint_url="http://127.0.0.1:9")
    assert "cannot reach the storage endpoint" in environment_error(wrapped) and "127.0.0.1:9" in environment_error(wrapped)
    full = OSError(errno.ENOSPC, "No space left on device (writing /run/soft_labels/part-00003.parquet)")
    assert "out of disk space" in environment_error(full) and "part-00003.parquet" in environment_error(full)
    assert environment_error(KeyError("x")) is None and environment_error(ZeroDivisionError()) is None


def test_debug_shows_the_traceback_of_a_user_error(tmp_path, capsys):
    with pytest.raises(Exception, match="run `recdistill prepare` first"):
        main(["evaluate", "--debug", f"run.run_dir={tmp_path / 'run'}"])
    assert main(["evaluate", f"run.run_dir={tmp_path / 'run'}"]) == 2


def test_inspect_takes_its_arguments_in_any_order(tmp_path, capsys):
    store = str(tmp_path / "nothing-here")
    for argv in (["inspect", store, "--config", "configs/tiny.yaml", "run.seed=3"],
                 ["inspect", "--config", "configs/tiny.yaml", store, "run.seed=3"],
                 ["inspect", store, "run.seed=3", "--config", "configs/tiny.yaml"]):
        assert main(argv) == 2
        assert f"{store} holds no soft labels" in capsys.readouterr().err


def test_inspect_without_a_url_reads_the_runs_own_store(tmp_path, capsys):
    run_dir = tmp_path / "run"
    for argv in (["inspect", "--config", "configs/tiny.yaml", f"run.run_dir={run_dir}"],
                 ["inspect", f"run.run_dir={run_dir}", "--config", "configs/tiny.yaml"]):
        assert main(argv) == 2
        assert f"{run_dir / 'soft_labels'} holds no soft labels" in capsys.readouterr().err
    assert is_override("run.run_dir=s3://b/r") and is_override("precompute.augment.ratio=1")
    for url in ("s3://b/store?v=1", "runs/a=b", "dt=2024-01-01/soft_labels", "runs\\a=b", "C:\\runs\\x"):
        assert not is_override(url), url


@pytest.mark.integration
def test_ctrl_c_ends_a_training_stage_promptly_with_one_line(tmp_path):
    """SIGINT while the workers train: Ray Train aborts the run, and the stage says what it kept (exit 130)."""
    import signal
    import time

    run_dir = tmp_path / "run"
    assert main(["prepare", "--config", "configs/tiny.yaml", f"run.run_dir={run_dir}"]) == 0
    cmd = [sys.executable, "-m", "cluster.cli", "distill", "--baseline", "--config", "configs/tiny.yaml",
           f"run.run_dir={run_dir}", "student.train.epochs=100", "scaling.num_workers=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=Path(__file__).parents[2])
    lines = []
    for line in proc.stdout:  # until the first epoch's checkpoint is registered
        lines.append(line)
        if "baseline epoch 2:" in line:
            break
    else:
        pytest.fail("".join(lines[-30:]))
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    started = time.monotonic()
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, rest[-3000:]
    assert time.monotonic() - started < 60
    assert "recdistill distill: interrupted; the last checkpoint kept is at epoch" in rest
    assert f"{run_dir}/ray/baseline: run the same command again to resume" in rest
    history = json.loads((run_dir / "baseline" / "history.json").read_text())
    assert not history.get("complete")
