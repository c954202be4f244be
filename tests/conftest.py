"""Shared fixtures: one local Ray session for all integration tests, small configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# A synthetic dataset and models small enough for a 2-core machine; tests add their own overrides.
SMALL_RUN = [
    "data.synthetic.num_users=400",
    "data.synthetic.num_items=60",
    "data.synthetic.num_clusters=6",
    "data.row_group_size=8",  # 50 row groups: enough to fill the virtual shards of a student's batch
    "teacher.model.d_model=32",
    "teacher.model.ffn_dim=64",
    "teacher.model.max_len=20",
    "teacher.train.batch_size=64",
    "teacher.train.epochs=3",
    "student.model.max_len=20",
    "precompute.k=16",
    "scaling.max_failures=0",
]


def export_spread_teacher(url: str, cfg, dataset: dict, seed: int, storage_options=None) -> str:
    """Export a random (untrained) teacher of ``cfg.teacher.model`` for ``dataset`` with well-spread
    scores (so its top-k has no near-ties); returns its fingerprint."""
    import torch

    from cluster.models import save_model
    from distill.model import SequentialRecommender

    torch.manual_seed(seed)
    model = SequentialRecommender(cfg.teacher.model, dataset["num_items"])
    with torch.no_grad():
        model.item_emb.weight.mul_(30)
    return save_model(url, model.state_dict(), cfg.teacher.model, dataset["num_items"],
                      {"role": "teacher", "dataset_fingerprint": dataset["fingerprint"]}, storage_options)


def small_config(run_dir: Path | str, *overrides: str):
    from cluster.config import load_config

    return load_config(ROOT / "configs" / "tiny.yaml", [f"run.run_dir={run_dir}", *SMALL_RUN, *overrides]).with_absolute_paths()


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for the whole test session (address="local": never joins a stray head)."""
    import ray

    from cluster.ray_setup import start_local_ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    start_local_ray(num_cpus=2, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real moto S3 server on 127.0.0.1 (a free port) for the whole session, with one bucket.

    Returns ``{"endpoint_url", "storage_options", "bucket"}``; pass ``storage_options`` to
    anything that takes fsspec options and use ``s3://{bucket}/<unique prefix>`` URLs.
    Dummy credentials are put in the environment for the session only (restored after), and
    the AWS config/credential files are pointed at /dev/null, so no real account is ever used.
    """
    import boto3
    import moto.server as moto_server

    with pytest.MonkeyPatch.context() as env:
        for key, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }.items():
            env.setenv(key, value)
        for key in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL",
                    "AWS_ENDPOINT_URL_S3"):
            env.delenv(key, raising=False)
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            endpoint = f"http://{host}:{port}"
            bucket = "recdistill-test"
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
            yield {
                "endpoint_url": endpoint,
                # Credentials travel in the options too: Ray workers may have started before this fixture.
                "storage_options": {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}},
                "bucket": bucket,
            }
        finally:
            server.stop()


def read_consumed(consumed_dir: Path) -> dict[tuple[int, int], dict[str, set]]:
    """The student's audit log: {(epoch, step): {attempt: set of rows}} over all workers."""
    import json

    steps: dict[tuple[int, int], dict[str, set]] = {}
    for path in sorted(Path(consumed_dir).glob("*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            steps.setdefault((rec["epoch"], rec["step"]), {}).setdefault(rec["attempt"], set()).update(rec["rows"])
    return steps


def assert_exactly_once(consumed_dir: Path, all_rows: set, epochs: int) -> int:
    """Every row exactly once per epoch; a replayed step (after a restart) consumed the same rows.

    Returns the number of replayed steps seen."""
    steps = read_consumed(consumed_dir)
    replayed = 0
    for epoch in range(epochs):
        seen: list = []
        epoch_steps = sorted(s for (e, s) in steps if e == epoch)
        assert epoch_steps == list(range(len(epoch_steps))), f"epoch {epoch}: steps missing: {epoch_steps}"
        for step in epoch_steps:
            attempts = list(steps[(epoch, step)].values())
            # An attempt killed mid-step may have logged only some workers' rows: a subset.
            full = max(attempts, key=len)
            assert all(a <= full for a in attempts), f"epoch {epoch} step {step}: attempts consumed different rows"
            replayed += len(attempts) - 1
            seen.extend(full)
        assert len(seen) == len(set(seen)), f"epoch {epoch}: a row was used twice"
        assert set(seen) == all_rows, f"epoch {epoch}: {len(all_rows - set(seen))} rows never used"
    return replayed


def registered_checkpoints(storage: Path) -> list[dict]:
    """Metrics of the checkpoints the Ray Train controller has registered (a failure restarts from the last)."""
    import json

    try:
        snapshot = json.loads((Path(storage) / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return [r["metrics"] for r in snapshot.get("checkpoint_results", [])]


def kill_train_worker_when(condition, killed: list, stop) -> None:
    """Poll ``condition()``; once true, SIGKILL one Ray Train worker started by this process."""
    import time

    import psutil

    me = psutil.Process()
    while not stop.is_set():
        if condition():
            for proc in me.children(recursive=True):
                try:
                    if "RayTrainWorker" in " ".join(proc.cmdline()):
                        proc.kill()  # SIGKILL: no clean-up, like a preempted node
                        killed.append(proc.pid)
                        return
                except psutil.Error:
                    continue
        time.sleep(0.05)


# Scenarios of a minute or more whose behaviour a faster test also covers in part: `make test` leaves
# them out to stay within the 20-minute budget; `make test-all` (and `make test-slow`) run them.
SLOW = {
    "tests/cluster/test_job_submit.py::test_ray_job_submit_runs_the_pipeline",  # ~5 min: a Ray head + `ray job submit`
    "tests/cluster/test_distill.py::test_elastic_shrink_and_grow_on_a_multi_node_cluster",  # ~3 min
    "tests/cluster/test_sweep.py::test_a_killed_sweep_reruns_only_its_unfinished_members_and_writes_the_frontier",
    "tests/cluster/test_other_shapes.py::test_another_shape_through_the_ml1m_config[synthetic-200x5000]",
    "tests/cluster/test_other_shapes.py::test_another_shape_through_the_ml1m_config[ml100k]",
    "tests/cluster/test_precompute.py::test_killed_precompute_reruns_to_the_identical_store[s3]",  # [local] stays
    "tests/cluster/test_distill.py::test_checkpoint_resumes_mid_epoch_at_another_worker_count[2-1]",  # [1-2] stays
    "tests/cluster/test_teacher.py::test_checkpoint_resumes_at_another_worker_count[2-1]",  # [1-2] stays
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid in SLOW:
            item.add_marker(pytest.mark.slow)
