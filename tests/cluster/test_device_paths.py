"""The paths a GPU cluster takes, on whatever device this machine has.

One rank, no Ray: the teacher trains under DeepSpeed ZeRO-3 with the project's own
DeepSpeed config (``cluster.runtime.deepspeed_config``: on CUDA that means NCCL, bf16
and FusedAdam), its consolidated export is reloaded, and ``ShardedTeacher`` hosts it
for precompute's labels; the student's bf16-autocast forward trains with a
distillation loss. The ``cpu`` variants run everywhere (gloo, fp32) and keep the
script honest; the ``cuda`` variants (marker ``gpu``) need a CUDA device and are
skipped, with that reason, on machines without one. On a GPU machine:
``pytest -m gpu tests/distill/test_device_paths.py`` (no Ray needed).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (run `pytest -m gpu` on a GPU machine)")

_TEACHER_SCRIPT = r"""
import json, sys, tempfile
import torch, deepspeed
from cluster import deepspeed_fixes
from cluster.config import DeepSpeedConfig
from distill.config import ModelConfig, TrainConfig
from cluster.models import load_model
from distill.model import SequentialRecommender
from cluster.precompute import teacher_outputs
from cluster.runtime import deepspeed_config, select_runtime
from distill.sequences import next_item_batch
from cluster.teacher_hosting import ShardedTeacher
from cluster.train_teacher import _export
from distill.training import NextItemObjective

expected_device, offload = sys.argv[1], sys.argv[2]  # offload: none | cpu (ZeRO-Offload of optimizer and parameters)
runtime = select_runtime()  # "auto": what a Ray Train worker on this machine would pick
assert runtime.device == expected_device, runtime
assert runtime.backend == ("nccl" if expected_device == "cuda" else "gloo"), runtime
if expected_device == "cuda":
    assert runtime.bf16 == torch.cuda.is_bf16_supported(), runtime
device = torch.device("cuda", 0) if runtime.use_gpu else torch.device("cpu")
if runtime.use_gpu:
    torch.cuda.set_device(device)
deepspeed.init_distributed(dist_backend=runtime.backend)

num_items, max_len, steps = 50, 12, 30
mcfg = ModelConfig(d_model=32, num_layers=2, num_heads=2, ffn_dim=64, max_len=max_len, dropout=0.0,
                   item_dims=[{"items": 20, "dim": 32}, {"dim": 8}])
tcfg = TrainConfig(lr=5e-3, warmup_steps=5, lr_schedule="cosine", grad_clip=1.0)
ds = DeepSpeedConfig(zero_stage=3, offload_optimizer=offload, offload_params=offload)
ds_config = deepspeed_config(ds, tcfg, 16, 1, runtime, total_steps=steps)
assert ds_config["bf16"]["enabled"] == runtime.bf16
if offload != "none":  # page-locked host buffers exactly when there is a GPU to copy to
    zero = ds_config["zero_optimization"]
    assert zero["offload_optimizer"]["pin_memory"] == zero["offload_param"]["pin_memory"] == runtime.use_gpu, zero
assert ds_config["optimizer"]["params"]["torch_adam"] == (not runtime.use_gpu)  # FusedAdam on CUDA

torch.manual_seed(0)
with deepspeed.zero.Init(config_dict_or_path=ds_config):
    model = SequentialRecommender(mcfg, num_items)
deepspeed_fixes.apply()  # as the teacher recipe does before its engine (FusedAdam's JIT build on CUDA)
engine, *_ = deepspeed.initialize(model=NextItemObjective(model), config=ds_config,
                                  model_parameters=model.parameters())
gen = torch.Generator().manual_seed(0)
def successor_runs(n):  # item i is followed by i + 1: learnable in a few dozen steps
    starts = torch.randint(1, num_items + 1, (n,), generator=gen).tolist()
    return [[(s + j - 1) % num_items + 1 for j in range(max_len + 1)] for s in starts]
losses = []
for _ in range(steps):
    inputs, targets = next_item_batch(successor_runs(16), max_len)
    loss_sum, count = engine(inputs.to(device), targets.to(device))
    loss = loss_sum / count
    engine.backward(loss)
    engine.step()
    losses.append(float(loss))
assert all(l == l for l in losses) and losses[-1] < 0.7 * losses[0], losses

# The consolidated fp32 export (streamed from the engine, one parameter at a time) scores like the engine
# (bf16 rounding aside).
probe, _ = next_item_batch(successor_runs(8), max_len)
engine.eval()
with torch.no_grad():
    engine_scores = engine.module.model.score_last(probe.to(device)).float().cpu()
url = tempfile.mkdtemp(prefix="recdistill-device-export-")
_export(engine.module.model, 3, 0, url, {"role": "teacher"}, num_items, None)
plain, meta = load_model(url)
assert all(t.dtype in (torch.float32, torch.int64) for t in plain.state_dict().values())
with torch.no_grad():
    plain_scores = plain.score_last(probe)
tol = 0.1 if runtime.bf16 else 1e-4
assert (engine_scores - plain_scores).abs().max() <= tol * plain_scores.abs().max(), "export differs from the engine"

# Precompute's hosting: ZeRO-3 inference engine on this device, labels close to the fp32 model's.
teacher = ShardedTeacher(url, zero_stage=3, bf16=runtime.bf16, device=device)
with torch.no_grad():
    hosted = teacher.logits_all(probe).cpu()
    reference = plain.scores(plain(probe)).float()
assert hosted.dtype == torch.float32
assert (hosted - reference).abs().max() <= tol * reference.abs().max(), "hosted teacher differs"
labels = teacher_outputs(hosted, probe, 5, 0, None)
ref_labels = teacher_outputs(reference, probe, 5, 0, None)
top1 = [(a[:, 0] == b[:, 0]).mean() for a, b in zip(labels.topk_ids, ref_labels.topk_ids)]
assert min(top1) >= 0.9, top1
print("DEVICE_PATHS_OK " + json.dumps({"device": str(device), "backend": runtime.backend, "bf16": runtime.bf16, "offload": offload,
                                       "first_loss": losses[0], "last_loss": losses[-1],
                                       "gpu": torch.cuda.get_device_name(0) if runtime.use_gpu else None}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_teacher_script(tmp_path: Path, device: str, offload: str = "none") -> dict:
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
        "DS_ACCELERATOR": device,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
    }
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    script = tmp_path / "device_paths.py"
    script.write_text(_TEACHER_SCRIPT)
    # The first CUDA run JIT-builds DeepSpeed's FusedAdam (minutes); the first CPU run its shm comm op.
    proc = subprocess.run([sys.executable, str(script), device, offload], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=900)
    marker = [line for line in proc.stdout.splitlines() if line.startswith("DEVICE_PATHS_OK ")]
    assert proc.returncode == 0 and marker, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(marker[0].split(" ", 1)[1])


@pytest.mark.integration
def test_one_rank_zero3_teacher_trains_exports_and_hosts_on_cpu(tmp_path):
    result = _run_teacher_script(tmp_path, "cpu")
    assert result["backend"] == "gloo" and result["bf16"] is False
    print(result)


@pytest.mark.gpu
@needs_cuda
def test_one_rank_zero3_teacher_trains_exports_and_hosts_on_cuda(tmp_path):
    result = _run_teacher_script(tmp_path, "cuda")
    assert result["backend"] == "nccl" and result["device"] == "cuda:0"
    print(result)


@pytest.mark.gpu
@needs_cuda
def test_an_offloaded_zero3_teacher_trains_exports_and_hosts_on_cuda(tmp_path):
    """The 1B recipe's memory path on a GPU: optimizer states and parameters in pinned host RAM (ZeRO-Offload),
    DeepSpeed's CPU Adam, NCCL and bf16 where the device has it; the same script as without offload."""
    result = _run_teacher_script(tmp_path, "cuda", offload="cpu")
    assert result["backend"] == "nccl" and result["offload"] == "cpu"
    print(result)


@pytest.mark.gpu
@needs_cuda
def test_student_bf16_forward_trains_with_a_distillation_loss_on_cuda():
    from distill.config import ModelConfig
    from distill.losses import distillation_loss
    from distill.model import PAD_ID, SequentialRecommender
    from cluster.runtime import select_runtime
    from distill.training import PositionLogits

    runtime = select_runtime(bf16="auto")
    assert runtime.use_gpu and runtime.backend == "nccl"
    if not runtime.bf16:
        pytest.skip(f"{torch.cuda.get_device_name(0)} has no bf16: the student runs fp32 there")
    device = torch.device("cuda", 0)
    num_items, max_len = 3416, 50  # ML-1M's catalog: the catalog-wide matmul is the student's largest cost
    cfg = ModelConfig(d_model=48, num_layers=1, num_heads=2, ffn_dim=96, max_len=max_len, dropout=0.0,
                      item_dims=[{"items": 400, "dim": 48}, {"items": 1000, "dim": 16}, {"dim": 8}])
    torch.manual_seed(0)
    model = SequentialRecommender(cfg, num_items).to(device)
    bf16, fp32 = PositionLogits(model, bf16=True), PositionLogits(model, bf16=False)
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randint(1, num_items + 1, (16, max_len), generator=gen)
    inputs[:4, :10] = PAD_ID  # left padding
    inputs = inputs.to(device)
    with torch.no_grad():
        low, full = bf16(inputs), fp32(inputs)
    assert low.dtype == torch.float32 and low.shape == full.shape == (int((inputs != PAD_ID).sum()), num_items + 1)
    low, full = low[:, 1:], full[:, 1:]  # column 0 (padding) is masked to the most negative float
    assert not torch.equal(low, full)  # autocast really ran in bf16
    assert (low - full).abs().max() <= 0.05 * full.abs().max()

    # A fixed "teacher": the student should move towards its soft labels.
    teacher_logits = torch.randn(low.shape[0], num_items, generator=gen).to(device) * 3
    values, columns = teacher_logits.topk(64, dim=-1)
    soft = {"topk_ids": columns + 1, "topk_logits": values, "lse": torch.logsumexp(teacher_logits, dim=-1)}
    targets = columns[:, 0] + 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss_sum, count, _ = distillation_loss("kl_topk_tail", 0.2, 1.0, bf16(inputs), targets, soft)
        optimizer.zero_grad(set_to_none=True)
        (loss_sum / count).backward()
        assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
        optimizer.step()
        losses.append(float(loss_sum.detach() / count))
    assert all(v == v for v in losses) and losses[-1] < 0.8 * losses[0], losses
