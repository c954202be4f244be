"""The memory plan: its accounting against DeepSpeed's estimators and against itself, and a launch that
does not fit refused before any worker starts, with settings that do fit."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from cluster import memory_plan, ray_setup
from cluster.cli import main
from cluster.config import DeepSpeedConfig, build_config
from cluster.plan import build_plan
from distill.config import ModelConfig

GB = 1024**3
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = ["data.synthetic.num_users=300", "data.synthetic.num_items=80", "data.synthetic.num_clusters=8"]
# A scaled-down "too large" teacher: its activations at a batch of 128 are what does not fit.
LARGE = ["teacher.model.d_model=512", "teacher.model.ffn_dim=2048", "teacher.model.num_layers=6",
         "teacher.model.num_heads=8", "teacher.model.max_len=50", "teacher.train.batch_size=128"]


@pytest.mark.parametrize("offload_params", ["cpu", "none"])
@pytest.mark.parametrize("workers", [1, 4])
def test_offloaded_bf16_states_are_deepspeeds_own_estimate(offload_params, workers):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    params = 1_014_577_152
    ds = DeepSpeedConfig(zero_stage=3, offload_optimizer="cpu", offload_params=offload_params)
    ours = memory_plan.model_state_bytes(params, workers, ds, bf16=True)
    cpu, gpu, largest = estimate_zero3_model_states_mem_needs(
        params, 0, num_gpus_per_node=workers, cpu_offload=True, cpu_offload_params=offload_params == "cpu",
        additional_buffer_factor=1.0)
    assert sum(ours["host"].values()) * workers == pytest.approx(cpu, rel=1e-6)  # host RAM is per node
    assert sum(ours["device"].values()) == pytest.approx(gpu - largest, rel=1e-6)


def test_fp32_zero3_without_offload_keeps_20_bytes_a_parameter_and_nvme_moves_them_to_files():
    plain = memory_plan.model_state_bytes(10**9, 2, DeepSpeedConfig(zero_stage=3), bf16=False)
    assert sum(plain["device"].values()) == 10 * 10**9 and not plain["host"] and not plain["nvme"]
    nvme = memory_plan.model_state_bytes(10**9, 2, DeepSpeedConfig(
        zero_stage=3, offload_optimizer="nvme", offload_params="nvme", nvme_path="/x"), bf16=False)
    assert nvme["host"] == {"fp32 gradients": 2 * 10**9} and sum(nvme["nvme"].values()) == 10 * 10**9
    assert nvme["nvme"]["fp32 gradient files"] == 2 * 10**9  # the step reads the gradients back from files too
    ddp = memory_plan.model_state_bytes(10**6, 4, DeepSpeedConfig(zero_stage=0), bf16=False)
    assert sum(ddp["device"].values()) == 16 * 10**6  # nothing partitioned: parameters, gradients, moments


def test_activations_shrink_with_checkpointing_and_grow_with_the_batch():
    model = ModelConfig(d_model=256, num_layers=8, num_heads=4, ffn_dim=1024, max_len=100)
    full = memory_plan.activation_bytes(model, 1000, 16, training=True, checkpointing=False)
    recomputed = memory_plan.activation_bytes(model, 1000, 16, training=True, checkpointing=True)
    forward = memory_plan.activation_bytes(model, 1000, 16, training=False, checkpointing=False)
    assert recomputed["activations"] * 3 < full["activations"] and forward["activations"] < recomputed["activations"]
    double = memory_plan.activation_bytes(model, 1000, 32, training=True, checkpointing=False)
    assert double["activations"] == 2 * full["activations"] and double["scores"] == 2 * full["scores"]


def _no_ray(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a Ray worker group was about to start")

    monkeypatch.setattr(ray_setup, "ensure_ray", lambda cfg: None)
    monkeypatch.setattr(ray_setup, "fit", refuse)


def _settings(fix: str) -> list[str]:
    """The overrides a fix names: the key=value words before its "(then ...)"."""
    return [word for word in fix.split(" (then")[0].split() if "=" in word]


def test_a_teacher_that_does_not_fit_is_refused_with_settings_that_fit(tmp_path, monkeypatch, capsys):
    _no_ray(monkeypatch)
    run_dir = tmp_path / "run"
    base = [f"run.run_dir={run_dir}", *SMALL, *LARGE, f"deepspeed.nvme_path={tmp_path / 'nvme'}"]
    assert main(["prepare", *base]) == 0
    cfg = build_config({}, base)
    needed = build_plan(cfg).memory["train-teacher"].estimate
    node = needed.rank0_total + needed.host_total  # 2 workers on this 2-CPU node
    limit = f"scaling.memory_per_node_gb={node * 0.6 / GB:.2f}"  # 40% short
    assert main(["train-teacher", *base, limit]) == 2
    err = capsys.readouterr().err
    assert "memory plan says it does not fit" in err and "settings that would fit:" in err, err
    check = build_plan(build_config({}, base + [limit])).memory["train-teacher"]
    assert check.problems and check.fixes
    for fix in check.fixes:  # every setting named really fits, by the same plan
        fixed = build_plan(build_config({}, base + [limit] + _settings(fix)))
        assert not fixed.memory["train-teacher"].problems, (fix, fixed.memory["train-teacher"].problems)
    assert not (run_dir / "ray").exists()  # no worker ever started


@pytest.mark.integration
def test_the_cli_refuses_an_oversized_launch_in_seconds(tmp_path):
    """The real command, as a user types it: refused with the numbers, well inside 30 s, and nothing started."""
    run_dir = tmp_path / "run"
    base = [f"run.run_dir={run_dir}", *SMALL, *LARGE]
    cli = [sys.executable, "-m", "cluster.cli"]
    subprocess.run([*cli, "prepare", *base], check=True, cwd=ROOT, capture_output=True)
    started = time.perf_counter()
    done = subprocess.run([*cli, "train-teacher", *base, "scaling.memory_per_node_gb=2.0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - started
    assert done.returncode == 2, done.stderr[-2000:]
    assert seconds < 30, seconds
    assert "GB of host RAM" in done.stderr and "settings that would fit:" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not (run_dir / "ray").exists()


def test_this_runs_leftover_swap_files_count_as_free_nvme_space(tmp_path):
    from cluster.runtime import nvme_swap_dir

    cfg = build_config({"run": {"run_dir": str(tmp_path / "run")},
                        "deepspeed": {"zero_stage": 3, "offload_optimizer": "nvme", "nvme_path": str(tmp_path / "nvme")}})
    before = memory_plan.capacity(cfg, 1).nvme_free
    leftover = os.path.join(nvme_swap_dir(cfg.deepspeed, cfg.run.run_dir), "optimizer", "rank3")
    os.makedirs(leftover)
    with open(os.path.join(leftover, "1_12.tensor.swp"), "wb") as f:
        f.write(b"x" * 50_000_000)  # cleared when this run's training starts
    after = memory_plan.capacity(cfg, 1).nvme_free
    assert abs(after - before) < 5_000_000  # the disk lost 50 MB, the plan still counts them (other writers aside)
