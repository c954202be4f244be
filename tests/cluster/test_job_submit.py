"""The user's path: `ray start --head`, then `ray job submit ... python -m cluster.cli pipeline`,
and `serve deploy` of the Serve config file `recdistill serve --write-config` writes.

Starts its own head on non-default ports with --block and stops only that head (never `ray stop`,
which would kill every Ray process on the machine)."""

from __future__ import annotations

import json
import secrets
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.integration

RAY = str(Path(sys.executable).with_name("ray"))


def _answers(address: str, env: dict, within_s: float) -> bool:
    """Whether the head's dashboard answers `ray job list` within ``within_s`` seconds."""
    deadline = time.time() + within_s
    while time.time() < deadline:
        if subprocess.run([RAY, "job", "list", "--address", address], capture_output=True, text=True, env=env).returncode == 0:
            return True
        time.sleep(2)
    return False


def _dashboard_log(temp_dir: Path) -> str:
    logs = {p.resolve() for p in temp_dir.glob("session_*/logs/dashboard.*")}  # session_latest links to the session
    return "".join(f"\n--- {p} (tail)\n" + p.read_text(errors="replace")[-3000:] for p in sorted(logs))


def free_port() -> int:
    # Not cluster.ray_setup.free_port: with this module importing it, `ray job submit` failed to
    # connect to the head in 2 of 2 runs on a loaded machine, and passed without that import. The
    # cause is not established (the full suite imports ray into this process anyway), so keep the
    # version that has passed.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    # Every port of this head is a free one: other Ray instances may run on this machine.
    port, dashboard, agent_http, agent_grpc, metrics, client = (free_port() for _ in range(6))
    # Short: Ray's Unix socket paths under it must stay below 108 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rd-", dir="/tmp")
    # Token authentication, as on a real head: head and client share a fresh random token.
    env = {**os.environ, "RAY_DEDUP_LOGS": "1", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    # The job's `python` is the head's: this project's environment, as on a provisioned cluster.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         "--num-cpus=2", "--include-dashboard=true", f"--dashboard-agent-listen-port={agent_http}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}", f"--ray-client-server-port={client}", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    if not _answers(address, env, within_s=120):
        head.kill()
        pytest.fail("the Ray head did not come up: " + (head.stdout.read() if head.stdout else ""))
    yield address, env, Path(temp_dir)
    os.killpg(head.pid, signal.SIGTERM)  # only the processes this head started
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_pipeline(ray_head, tmp_path):
    """`make run`'s pipeline, as a job: the embedded default config unchanged but for the run directory.

    Also the tiny data's promise (issue 6): the distilled student beats the same student trained
    without the teacher, at the same budget."""
    address, env, _ = ray_head
    run_dir = tmp_path / "job-run"
    cmd = [RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
           "python", "-m", "cluster.cli", "pipeline", "--config", "configs/tiny.yaml", f"run.run_dir={run_dir}"]
    for _ in range(30):  # the head's job agent may come up a little after its HTTP server
        job = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1500)
        if "No available agent" not in job.stderr + job.stdout:
            break
        time.sleep(3)
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
    assert "succeeded" in job.stdout
    assert str(run_dir / "report" / "report.md") in job.stdout  # the pipeline prints where the report is
    metrics = json.loads((run_dir / "report" / "metrics.json").read_text())
    models = metrics["models"]
    assert set(models) == {"popularity", "teacher", "student_kd", "student_baseline"}
    kd, baseline, teacher = (models[m]["ndcg@10"] for m in ("student_kd", "student_baseline", "teacher"))
    assert kd > 1.03 * baseline, f"distilled student {kd:.4f} does not beat the baseline {baseline:.4f} by 3%"
    assert teacher > models["popularity"]["ndcg@10"] and models["student_kd"]["params"] * 8 < models["teacher"]["params"]
    report = (run_dir / "report" / "report.md").read_text()
    assert "student keeps" in report and (run_dir / "report" / "quality_vs_params.png").stat().st_size > 1000

    # Re-submitted, the job continues where it stopped: here, everything is done but the report.
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-2000:]
    for name in ("prepare", "train-teacher", "precompute", "distill", "distill --baseline"):
        assert f"[pipeline] {name}: already done, skipping" in again.stdout
    # A finished stage run on its own reads its export and starts no training.
    for stage in (["train-teacher"], ["distill"], ["distill", "--baseline"]):
        direct = subprocess.run([sys.executable, "-m", "cluster.cli", *stage, "--config", "configs/tiny.yaml", f"run.run_dir={run_dir}"],
                                capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
        assert direct.returncode == 0, direct.stdout[-4000:] + direct.stderr[-2000:]
        assert ": done;" in direct.stdout and "worker group" not in direct.stdout + direct.stderr, direct.stdout[-2000:]


def test_serve_deploy_of_the_written_config_serves_the_model(ray_head, tmp_path):
    """`recdistill serve --write-config`, then Ray's own `serve deploy` of that file against a running head."""
    import requests

    from conftest import export_spread_teacher, small_config
    from data_pipeline.dataset import prepare_dataset
    from data_pipeline.layout import RunLayout

    address, env, head_dir = ray_head
    port = free_port()
    overrides = [f"serve.port={port}", "serve.cpus_per_replica=0.5", "serve.app_name=deployed"]
    cfg = small_config(tmp_path / "run", *overrides)
    layout = RunLayout(cfg.run.run_dir)
    export_spread_teacher(layout.baseline, cfg, prepare_dataset(cfg.data, layout.data, seed=0), seed=1)
    write = subprocess.run([sys.executable, "-m", "cluster.cli", "serve", "--write-config", "--config", str(ROOT / "configs" / "tiny.yaml"),
                            f"run.run_dir={cfg.run.run_dir}", "serve.model=student_baseline", *overrides],
                           capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert write.returncode == 0, write.stdout + write.stderr
    config_file = Path(cfg.run.run_dir) / "serve" / "serve_config.yaml"
    assert str(config_file) in write.stdout
    serve_cli = str(Path(sys.executable).with_name("serve"))
    deploy_cmd = [serve_cli, "deploy", str(config_file), "--address", address]
    deploy = subprocess.run(deploy_cmd, capture_output=True, text=True, env=env, timeout=300)
    if deploy.returncode != 0 and any(e in deploy.stderr for e in ("RemoteDisconnected", "Connection refused")):
        # The head's dashboard can drop a request, or stop listening for a while, when the machine is saturated
        # (seen with a benchmark on both cores: "RemoteDisconnected" once, "Connection refused" once); once it
        # answers again, the same command is what a user would do. Any other failure fails the test.
        assert _answers(address, env, within_s=120), "the head's dashboard stopped answering:" + _dashboard_log(head_dir)
        deploy = subprocess.run(deploy_cmd, capture_output=True, text=True, env=env, timeout=300)
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr + _dashboard_log(head_dir)
    deadline, status = time.time() + 240, ""
    while time.time() < deadline:
        status = subprocess.run([serve_cli, "status", "--address", address], capture_output=True, text=True, env=env, timeout=120).stdout
        if "status: RUNNING" in status and "DEPLOY_FAILED" not in status:
            break
        assert "DEPLOY_FAILED" not in status, status
        time.sleep(3)
    else:
        pytest.fail("the deployed application did not reach RUNNING:\n" + status)
    reply = requests.post(f"http://127.0.0.1:{port}/recommend", json={"history": [], "k": 3}, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == "student_baseline" and len(reply.json()["items"]) == 3
