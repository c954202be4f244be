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
