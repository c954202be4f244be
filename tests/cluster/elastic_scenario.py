"""Elastic distillation on a one-machine multi-node Ray cluster (run by test_distill.py in its own process).

A 0-CPU head and two 1-CPU worker nodes; `distill` runs with num_workers=(1, 2) in a
background thread while the main thread removes a node mid-epoch (the group shrinks to 1
worker), waits until the 1-worker group has checkpointed, then adds a node back (the
group grows to 2). Prints the student's history.json plus the overrides used as one JSON line.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (conftest helpers)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the project root

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from conftest import registered_checkpoints, small_config  # noqa: E402
from test_distill import STUDENT  # noqa: E402

OVERRIDES = [
    "scaling.num_workers=2",
    "scaling.min_workers=1",
    "scaling.max_failures=4",
    "scaling.elastic_resize_interval_s=2",
    "student.train.epochs=3",
]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")


def main() -> None:
    run_dir = Path(sys.argv[1])
    cfg = small_config(run_dir, *STUDENT, *OVERRIDES)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    from cluster import distill

    errors: list[BaseException] = []

    def train() -> None:
        try:
            distill.run(cfg)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    storage = run_dir / "ray" / "student"
    try:
        wait_for(lambda: any(m.get("workers") == 2 and "step" in m for m in registered_checkpoints(storage)), 300, "a 2-worker checkpoint")
        cluster.remove_node(nodes.pop())  # its worker dies: the group restarts with 1 worker
        wait_for(lambda: any(m.get("workers") == 1 for m in registered_checkpoints(storage)), 300, "a 1-worker checkpoint")
        nodes.append(cluster.add_node(num_cpus=1))  # the elastic monitor grows the group back to 2
        thread.join(timeout=400)
        if thread.is_alive():
            raise TimeoutError("training did not finish")
        if errors:
            raise errors[0]
    finally:
        ray.shutdown()
        cluster.shutdown()
    result = json.loads((run_dir / "student" / "history.json").read_text())
    result["overrides"] = OVERRIDES
    print(json.dumps(result))


if __name__ == "__main__":
    main()
