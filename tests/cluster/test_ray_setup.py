"""cluster.ray_setup: the local cluster our stages start."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.integration


def test_state_api_inside_the_job_reaches_this_clusters_own_dashboard(ray_session):
    """Ray Train's placement-group cleaner asks the state API whether the controller is alive.

    It must reach this cluster (not fail every second, and not find another cluster on the
    machine, where the controller does not exist and its workers would be torn down).
    """
    ray = ray_session

    @ray.remote(num_cpus=0)
    class Probe:
        def ping(self) -> int:
            return 1

    @ray.remote(num_cpus=0)
    def ask_state_api(actor_id: str) -> tuple[str, str]:
        from ray.util.state import get_actor

        return os.environ.get("RAY_API_SERVER_ADDRESS", ""), get_actor(actor_id, timeout=30).state

    probe = Probe.remote()
    assert ray.get(probe.ping.remote()) == 1
    address, state = ray.get(ask_state_api.remote(probe._actor_id.hex()))
    assert address.startswith("http://127.0.0.1:")
    assert state == "ALIVE"
    ray.kill(probe)


def test_more_workers_than_the_cluster_holds_are_refused_with_the_numbers(ray_session, tmp_path, capsys):
    from cluster.cli import main
    from cluster.ray_setup import ResourceError, require_resources
    from conftest import small_config

    run_dir = tmp_path / "run"
    # A pipeline is refused before its first stage (prepare runs on the driver, but would be wasted).
    assert main(["pipeline", "--config", "configs/tiny.yaml", f"run.run_dir={run_dir}", "scaling.num_workers=4"]) == 2
    assert "CPU: needs 4, the cluster has 2" in capsys.readouterr().err and not (run_dir / "data").exists()
    assert main(["prepare", "--config", "configs/tiny.yaml", f"run.run_dir={run_dir}"]) == 0
    capsys.readouterr()
    assert main(["distill", "--baseline", "--config", "configs/tiny.yaml", f"run.run_dir={run_dir}", "scaling.num_workers=4"]) == 2
    err = capsys.readouterr().err
    assert "cannot start 4 workers" in err and "CPU: needs 4, the cluster has 2" in err and "Traceback" not in err
    assert not (run_dir / "baseline").exists() and not (run_dir / "ray").exists()
    # Elastic: only the lower bound has to fit now; an autoscaling cluster is not judged by its nodes of the moment.
    require_resources(small_config(run_dir, "scaling.num_workers=4", "scaling.min_workers=2"), elastic=True)
    require_resources(small_config(run_dir, "scaling.num_workers=4", "scaling.autoscaling=true"))
    with pytest.raises(ResourceError, match="cannot start 1 worker with scaling.cpus_per_worker=2.5 .CPU: needs 2.5"):
        require_resources(small_config(run_dir, "scaling.num_workers=1", "scaling.cpus_per_worker=2.5"))


def test_free_ports_come_from_outside_the_kernels_ephemeral_range_and_skip_ports_in_use():
    """Serve's proxy once failed to bind a port from bind(0): a Ray worker had taken it from the ephemeral range."""
    import socket

    from cluster.ray_setup import free_port

    ports = {free_port() for _ in range(20)}
    assert all(20000 <= p < 32768 for p in ports) and len(ports) > 10
    held = []
    try:
        for port in ports:  # hold these: free_port must not hand them out again
            s = socket.socket()
            s.bind(("127.0.0.1", port))
            held.append(s)
        assert all(free_port() not in ports for _ in range(50))
    finally:
        for s in held:
            s.close()
