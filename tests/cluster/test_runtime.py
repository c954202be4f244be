import pytest
from pydantic import ValidationError

from cluster.config import DeepSpeedConfig

from distill.config import TrainConfig
from cluster.runtime import (NVME_PARAM_BUFFERS, OPTIMIZER_SUB_GROUP, clear_swap_dir, deepspeed_config, folder_bytes,
                             nvme_swap_dir, select_runtime, use_gpu_for_scaling)


def test_gpu_selects_cuda_nccl_bf16():
    rt = select_runtime("auto", "auto", cuda_available=True, bf16_supported=True)
    assert (rt.device, rt.backend, rt.bf16, rt.accelerator) == ("cuda", "nccl", True, "cuda")


def test_gpu_without_bf16_support_uses_fp32():
    assert select_runtime("auto", "auto", cuda_available=True, bf16_supported=False).bf16 is False


def test_cpu_falls_back_to_gloo_fp32():
    rt = select_runtime("auto", "auto", cuda_available=False)
    assert (rt.device, rt.backend, rt.bf16, rt.accelerator) == ("cpu", "gloo", False, "cpu")


def test_explicit_cpu_on_a_gpu_machine():
    assert select_runtime("cpu", "auto", cuda_available=True).device == "cpu"


def test_cuda_requested_without_gpu_is_an_error():
    with pytest.raises(RuntimeError, match="no CUDA"):
        select_runtime("cuda", "auto", cuda_available=False)


def test_use_gpu_for_scaling():
    assert use_gpu_for_scaling("auto", cuda_available=True) is True
    assert use_gpu_for_scaling("auto", cuda_available=False) is False
    assert use_gpu_for_scaling("false", cuda_available=True) is False


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_batch_arithmetic_and_optimizer(stage):
    train = TrainConfig(batch_size=100, lr=0.01, warmup_steps=10)
    cpu = select_runtime("cpu", "auto", cuda_available=False)
    cfg = deepspeed_config(DeepSpeedConfig(zero_stage=stage), train, micro_batch_size=34, world_size=3, runtime=cpu)
    assert cfg["train_batch_size"] == 34 * 3 * cfg["gradient_accumulation_steps"]
    assert cfg["zero_optimization"]["stage"] == stage
    assert cfg["optimizer"]["params"]["torch_adam"] is True  # FusedAdam needs CUDA
    assert cfg["scheduler"]["params"]["warmup_num_steps"] == 10
    gpu = select_runtime("auto", "auto", cuda_available=True, bf16_supported=True)
    cfg_gpu = deepspeed_config(DeepSpeedConfig(zero_stage=stage), train, 34, 3, gpu)
    assert cfg_gpu["bf16"]["enabled"] is True and cfg_gpu["optimizer"]["params"]["torch_adam"] is False


def test_no_scheduler_without_warmup_and_offload_options():
    cpu = select_runtime("cpu", "auto", cuda_available=False)
    ds = DeepSpeedConfig(zero_stage=3, offload_optimizer=True, offload_params=True)
    cfg = deepspeed_config(ds, TrainConfig(warmup_steps=0), 8, 2, cpu)
    assert "scheduler" not in cfg
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_cosine_schedule_goes_to_deepspeed_with_the_run_length():
    cpu = select_runtime("cpu", "auto", cuda_available=False)
    train = TrainConfig(lr_schedule="cosine", warmup_steps=5)
    cfg = deepspeed_config(DeepSpeedConfig(zero_stage=3), train, 8, 2, cpu, total_steps=300)
    assert cfg["scheduler"]["type"] == "WarmupCosineLR"
    assert cfg["scheduler"]["params"]["total_num_steps"] == 300 and cfg["scheduler"]["params"]["warmup_num_steps"] == 5
    with pytest.raises(ValueError, match="total_steps"):
        deepspeed_config(DeepSpeedConfig(zero_stage=3), train, 8, 2, cpu)


def test_nvme_offload_is_zero_infinity_with_buffers_sized_to_the_model():
    cpu = select_runtime("cpu", "auto", cuda_available=False)
    ds = DeepSpeedConfig(zero_stage=3, offload_optimizer="nvme", offload_params="nvme", nvme_path="/scratch/ds")
    cfg = deepspeed_config(ds, TrainConfig(warmup_steps=0), 4, 2, cpu, swap_buffer_numel=8_388_608)
    zero = cfg["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "nvme" and zero["offload_optimizer"]["nvme_path"] == "/scratch/ds"
    assert zero["offload_param"] == {"device": "nvme", "pin_memory": False, "nvme_path": "/scratch/ds",
                                     "buffer_count": NVME_PARAM_BUFFERS, "buffer_size": 8_388_608, "max_in_cpu": 0}
    assert zero["sub_group_size"] == OPTIMIZER_SUB_GROUP and "aio" in cfg
    # On a GPU the host buffers are pinned (faster copies); on a CPU-only host pinning only costs RAM.
    gpu = select_runtime("auto", "auto", cuda_available=True, bf16_supported=True)
    assert deepspeed_config(ds, TrainConfig(warmup_steps=0), 4, 2, gpu, swap_buffer_numel=10)["zero_optimization"][
        "offload_param"]["pin_memory"] is True
    with pytest.raises(ValueError, match="swap_buffer_numel"):
        deepspeed_config(ds, TrainConfig(warmup_steps=0), 4, 2, cpu)
    # Without offload nothing of it appears.
    plain = deepspeed_config(DeepSpeedConfig(zero_stage=3), TrainConfig(warmup_steps=0), 4, 2, cpu)
    assert "aio" not in plain and "offload_param" not in plain["zero_optimization"]


def test_each_run_swaps_in_its_own_folder_which_a_start_clears(tmp_path):
    ds = DeepSpeedConfig(zero_stage=3, offload_optimizer="nvme", nvme_path=str(tmp_path))
    ours, theirs = nvme_swap_dir(ds, "s3://bucket/run1"), nvme_swap_dir(ds, "s3://bucket/run2")
    assert ours != theirs and ours == nvme_swap_dir(ds, "s3://bucket/run1") and ours.startswith(str(tmp_path))
    assert nvme_swap_dir(DeepSpeedConfig(zero_stage=3, offload_optimizer="cpu", nvme_path=str(tmp_path)), "r") is None
    for folder in (ours, theirs):  # an earlier attempt's files, and another job's
        (tmp_path / folder / "optimizer" / "rank1").mkdir(parents=True)
        (tmp_path / folder / "optimizer" / "rank1" / "7_gradient_0_256.tensor.swp").write_bytes(b"x" * 1000)
    assert folder_bytes(ours) == 1000 and folder_bytes(str(tmp_path / "absent")) == 0
    clear_swap_dir(ours, local_rank=1)  # not the node's first worker: leaves it to local rank 0
    assert folder_bytes(ours) == 1000
    clear_swap_dir(ours, local_rank=0)
    assert folder_bytes(ours) == 0 and list((tmp_path / ours).iterdir()) == [] and folder_bytes(theirs) == 1000


@pytest.mark.parametrize("settings, message", [
    ({"offload_optimizer": "nvme"}, "nvme_path"),
    ({"offload_params": "cpu", "zero_stage": 2}, "zero_stage 3"),
    ({"offload_optimizer": "cpu", "zero_stage": 0}, "zero_stage >= 1"),
    ({"offload_params": "disk"}, "nvme"),
])
def test_offload_settings_that_cannot_work_are_refused(settings, message):
    with pytest.raises(ValidationError, match=message):
        DeepSpeedConfig(**settings)
