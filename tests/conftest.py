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
    "teacher.model.d_model=32",
    "teacher.model.ffn_dim=64",
    "teacher.model.max_len=20",
    "teacher.train.batch_size=64",
    "teacher.train.epochs=3",
    "student.model.max_len=20",
    "precompute.k=16",
    "scaling.max_failures=0",
]


def small_config(run_dir: Path | str, *overrides: str):
    from distill.config import load_config

    return load_config(ROOT / "configs" / "tiny.yaml", [f"run.run_dir={run_dir}", *SMALL_RUN, *overrides]).with_absolute_paths()


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for the whole test session (address="local": never joins a stray head)."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
