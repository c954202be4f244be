"""Hosting an exported teacher for inference across Ray Train workers under ZeRO-3.

Each worker holds 1/W of every parameter; DeepSpeed gathers a layer's weights
just before that layer runs and frees them after. ZeRO-3's gathers are
collectives, so every worker must run every forward: :func:`lockstep_batches`
(in distill.training) gives each rank the same number of batches, padding the short ones.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
from safetensors import safe_open

from data_pipeline import fsio
from distill.config import ModelConfig
from data_pipeline.exports import WEIGHTS, ensemble_fingerprint, load_export, read_export_meta, verify_export
from distill.ensemble import ensemble_log_probs, mixture_log_probs
from cluster.memory_plan import BLOCKS_IN_FLIGHT, largest_block_params
from cluster.models import build_model, load_weights


def inference_ds_config(zero_stage: int, bf16: bool, block_params: int = 0) -> dict[str, Any]:
    """DeepSpeed config for a forward-only engine (the batch sizes are placeholders DeepSpeed requires).

    ``block_params``: the largest Transformer block's parameters. ZeRO-3 keeps a gathered parameter
    while at most ``stage3_max_live_parameters`` are gathered and its next use comes within
    ``stage3_max_reuse_distance``; DeepSpeed's defaults (1e9 each) let a forward gather the whole
    1B model on every worker (measured: 3.4 GB above the partitions on each of 2 workers). Bounding
    both to the blocks in flight frees each block after it runs, as hosting is meant to.
    """
    zero: dict[str, Any] = {"stage": zero_stage, "stage3_param_persistence_threshold": 0}
    if zero_stage == 3 and block_params > 0:
        in_flight = BLOCKS_IN_FLIGHT * block_params
        zero.update(stage3_max_live_parameters=in_flight, stage3_max_reuse_distance=in_flight,
                    stage3_prefetch_bucket_size=block_params)
    return {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
    }


class ShardedTeacher:
    """An exported teacher loaded into the current Ray Train worker group under ZeRO.

    Every rank constructs it (collectively) and then calls :meth:`score_last` the same
    number of times. ``zero_stage=3`` partitions the parameters; 0 replicates them.
    """

    def __init__(
        self,
        export_url: str,
        storage_options: Optional[dict[str, Any]] = None,
        zero_stage: int = 3,
        bf16: bool = False,
        device: torch.device | str = "cpu",
    ):
        import deepspeed

        self.meta = read_export_meta(export_url, storage_options)
        self.model_cfg = ModelConfig.model_validate(self.meta["model"])
        self.num_items = int(self.meta["num_items"])
        self.fingerprint = self.meta["fingerprint"]
        self.device = torch.device(device)
        ds_config = inference_ds_config(zero_stage, bf16, largest_block_params(self.model_cfg))
        init = deepspeed.zero.Init(config_dict_or_path=ds_config) if zero_stage == 3 else contextlib.nullcontext()
        with init:  # a next-item model, or a rating model when the export has rating_values
            model = build_model(self.model_cfg, self.num_items, self.meta.get("rating_values"))
        self._load_weights(model, export_url, storage_options, zero_stage)
        self.engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config)
        self.engine.eval()
        self.bf16 = bf16

    def _load_weights(self, model: torch.nn.Module, url: str, storage_options, zero_stage: int) -> None:
        """Rank 0 reads tensors one at a time and DeepSpeed scatters them into the partitions."""
        import deepspeed
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        if zero_stage != 3:
            load_weights(model, load_export(url, storage_options)[0])
            return
        handle = None
        if rank == 0:
            local = _local_copy(fsio.join(url, WEIGHTS), storage_options)
            handle = safe_open(local, framework="pt")
            verify_export(url, storage_options)
        seen: set[int] = set()
        for name, param in model.named_parameters():
            if id(param) in seen:  # the tied output weight is item_emb.weight
                continue
            seen.add(id(param))
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if rank == 0:
                    param.data.copy_(handle.get_tensor(name).to(param.dtype))
        for name, buffer in model.named_buffers():  # not partitioned: rank 0 reads, everyone receives
            if rank == 0:
                buffer.copy_(handle.get_tensor(name).to(buffer.dtype))
            if dist.is_initialized():
                dist.broadcast(buffer, src=0)

    def local_parameter_count(self) -> int:
        """Parameters this rank stores (its ZeRO-3 partitions, or everything when not partitioned)."""
        total, seen = 0, set()
        for p in self.engine.module.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
        return total

    @torch.no_grad()
    def logits_all(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, L) left-padded ids, L <= max_len -> (B, L, num_items + 1) fp32 scores at every position. Collective."""
        module = self.engine.module
        return module.scores(module(inputs.to(self.device))).float()

    @torch.no_grad()
    def rating_log_probs(self, items: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """A rating teacher on (B, L) left-padded whole sequences of (item, level) -> (B, L-1, R) fp32
        log-probabilities of each position's rating (:meth:`distill.rating_model.RatingModel.sequence_logits`).
        Collective."""
        logits, _, _ = self.engine.module.sequence_logits(items.to(self.device), levels.to(self.device))
        return torch.log_softmax(logits.float(), dim=-1)

    @torch.no_grad()
    def score_last(self, histories: torch.Tensor) -> torch.Tensor:
        """(B, L) left-padded ids -> (B, num_items + 1) fp32 next-item scores. Collective under ZeRO-3."""
        inputs = histories[:, -self.model_cfg.max_len :].to(self.device)
        return self.engine.module.score_last(inputs).float()


class EnsembleTeacher:
    """Several exported teachers hosted side by side (each its own ZeRO engine), answering as one:
    the mixture of their distributions (:func:`distill.ensemble.ensemble_log_probs`).

    The same interface as :class:`ShardedTeacher`; ``fingerprint`` is the ensemble's
    (:func:`data_pipeline.exports.ensemble_fingerprint`), ``members`` lists (url, fingerprint).
    Every member must score the same catalog with the same ``max_len`` (the run plan checks).
    """

    def __init__(self, export_urls: list[str], storage_options=None, zero_stage: int = 3, bf16: bool = False,
                 device: torch.device | str = "cpu"):
        self.teachers = [ShardedTeacher(url, storage_options, zero_stage, bf16, device) for url in export_urls]
        first = self.teachers[0]
        self.meta, self.model_cfg, self.num_items, self.device = first.meta, first.model_cfg, first.num_items, first.device
        self.members = [(url, t.fingerprint) for url, t in zip(export_urls, self.teachers)]
        self.fingerprint = ensemble_fingerprint([t.fingerprint for t in self.teachers])

    def local_parameter_count(self) -> int:
        return sum(t.local_parameter_count() for t in self.teachers)

    def logits_all(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, L, num_items + 1) log-probabilities of the mixture. Collective (every member in turn)."""
        return ensemble_log_probs(t.logits_all(inputs) for t in self.teachers)  # lazily: one member's logits at a time

    def score_last(self, histories: torch.Tensor) -> torch.Tensor:
        return ensemble_log_probs(t.score_last(histories) for t in self.teachers)

    def rating_log_probs(self, items: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """Rating teachers: the mixture of the members' rating distributions (B, L-1, R). Collective."""
        return mixture_log_probs(t.rating_log_probs(items, levels) for t in self.teachers)


def host_teacher(export_urls: list[str], storage_options=None, zero_stage: int = 3, bf16: bool = False,
                 device: torch.device | str = "cpu"):
    """One exported teacher (:class:`ShardedTeacher`) or, given several, their :class:`EnsembleTeacher`."""
    if len(export_urls) == 1:
        return ShardedTeacher(export_urls[0], storage_options, zero_stage, bf16, device)
    return EnsembleTeacher(export_urls, storage_options, zero_stage, bf16, device)


def _local_copy(url: str, storage_options) -> str:
    """safetensors needs a local file for lazy reads; remote exports are downloaded once."""
    fs, path = fsio.get_fs(url, storage_options)
    if fsio.is_local(fs):
        return path
    import tempfile

    local = tempfile.NamedTemporaryFile(prefix="recdistill-teacher-", suffix=".safetensors", delete=False).name
    fs.get_file(path, local)
    return local

