"""What a training recipe needs to know about its task (``run.task``), in one place.

The recipes (:mod:`cluster.train_teacher`, and in turn the others) keep their Ray and DeepSpeed
wiring and their loops; a :class:`TrainingTask` tells them which model to build, what a training
example and a batch are, which loss the engine minimises, and how validation scores a model.
``select`` is the validation metric the best model is chosen on, oriented so that larger is better.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import pyarrow as pa
import torch
from torch import nn

from distill.config import ModelConfig


@dataclass(frozen=True)
class TrainingTask:
    name: str
    #: (model config, dataset manifest) -> the model
    build: Callable[[ModelConfig, dict[str, Any]], nn.Module]
    #: the model -> the module whose forward(*batch) returns (sum of losses, number of examples)
    objective: Callable[[nn.Module], nn.Module]
    #: (train table, max_len) -> the training examples, one per sequence
    examples: Callable[[pa.Table, int], list]
    #: (examples, max_len) -> the batch tensors the objective takes
    batch: Callable[[list, int], tuple[torch.Tensor, ...]]
    #: (model, valid table, dataset manifest, eval config, batch size, rank, world, device, max_len) -> metrics
    validate: Callable[..., dict[str, float]]
    #: max_len -> a batch with no example (a rank's short last step still takes part in the collectives)
    empty_batch: Callable[[int], tuple[torch.Tensor, ...]]
    #: the metric models are selected on, and its sign (larger is better after it)
    metric: str
    sign: float
    # The student's side (cluster.distill):
    #: (model, bf16, item-embedding hint or None) -> the module DDP wraps: its forward takes a batch's tensors
    student_forward: Callable[..., nn.Module]
    #: (table, store spec or None for the twin, max_len) -> a cluster.student_batches.StudentBatch
    student_batch: Callable[..., Any]
    #: (forward, batch, alpha, distill config, kd options, device, hint items or None) -> the loss terms
    #: distill.training.mixed_loss mixes
    student_terms: Callable[..., dict]
    #: the teacher export's item table (distill.init_from_teacher, distill.embedding_hint)
    item_table_key: str

    def select(self, metrics: dict[str, float]) -> float:
        return self.sign * metrics[self.metric]


def _zeros(width: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(1, width, dtype=torch.long), torch.zeros(1, width, dtype=torch.long)


def _next_item() -> TrainingTask:
    from cluster.student_batches import batch_from_dataset, batch_from_store
    from distill.losses import distillation_terms
    from distill.model import PAD_ID, SequentialRecommender
    from distill.sequences import next_item_batch
    from distill.training import NextItemObjective, PositionLogits, distributed_ranking_eval, training_sequences

    def student_terms(forward, batch, alpha, dcfg, kd_options, device, hint_items=None):
        if hint_items is None:
            logits, hint = forward(batch.inputs.to(device)), None
        else:  # one forward for both, so that DDP sees the hint's projection used
            logits, hint = forward(batch.inputs.to(device), hint_items)
        targets = batch.targets[batch.inputs != PAD_ID].to(device)
        soft = {k: v.to(device) for k, v in batch.soft.items()} if batch.soft else None
        terms = distillation_terms(dcfg.loss, alpha, dcfg.temperature, logits, targets, soft, batch.augmented, **kd_options)
        return terms if hint is None else {**terms, "hint": hint}

    def validate(model, valid, dataset, eval_cfg, batch_size, rank, world, device, max_len):
        return distributed_ranking_eval(model.score_last, valid, dataset["num_items"], eval_cfg.ks, batch_size, rank, world,
                                        device, max_len)

    return TrainingTask(
        name="next_item",
        build=lambda cfg, dataset: SequentialRecommender(cfg, dataset["num_items"]),
        objective=NextItemObjective,
        examples=training_sequences,
        batch=next_item_batch,
        validate=validate,
        empty_batch=_zeros,  # (inputs, targets) of width max_len
        metric="ndcg@10", sign=1.0,
        student_forward=lambda model, bf16, hint=None: PositionLogits(model, bf16=bf16, hint=hint),
        student_batch=lambda table, spec, max_len: (batch_from_dataset(table, max_len) if spec is None
                                                    else batch_from_store(table, spec, max_len)),
        student_terms=student_terms,
        item_table_key="item_emb.weight")


def _rating() -> TrainingTask:
    from cluster.student_batches import rating_batch_from_dataset, rating_batch_from_store
    from distill.rating import rating_terms
    from distill.rating_model import RatingModel
    from distill.rating_training import (RatingObjective, RatingPositions, distributed_rating_eval, rating_batch,
                                         rating_training_sequences)

    def student_terms(forward, batch, alpha, dcfg, kd_options, device, hint_items=None):
        if hint_items is not None:  # the plan refuses distill.embedding_hint for this task
            raise ValueError("the rating task has no item-embedding hint")
        logits, targets = forward(batch.inputs.to(device), batch.targets.to(device))
        teacher = batch.soft["log_probs"].to(device) if batch.soft else None
        augmented = batch.augmented.to(device) if batch.augmented is not None else None
        return rating_terms(logits, targets, teacher, alpha, dcfg.temperature, augmented)

    def validate(model, valid, dataset, eval_cfg, batch_size, rank, world, device, max_len):
        return distributed_rating_eval(model, valid, dataset["rating_values"], batch_size, rank, world, device)

    return TrainingTask(
        name="rating",
        build=lambda cfg, dataset: RatingModel(cfg, dataset["num_items"], len(dataset["rating_values"])),
        objective=RatingObjective,
        examples=rating_training_sequences,
        batch=rating_batch,
        validate=validate,
        empty_batch=lambda max_len: _zeros(max_len + 1),  # (items, levels): whole sequences
        # The distribution is what the teacher hands on: select on its likelihood.
        metric="nll", sign=-1.0,
        student_forward=lambda model, bf16, hint=None: RatingPositions(model, bf16=bf16),
        student_batch=lambda table, spec, max_len: (rating_batch_from_dataset(table, max_len) if spec is None
                                                    else rating_batch_from_store(table, spec, max_len)),
        student_terms=student_terms,
        item_table_key="trunk.item_emb.weight")


def training_task(name: str, dataset: Optional[dict[str, Any]] = None) -> TrainingTask:
    """The task ``run.task`` names; with the dataset's manifest, checked against the task it was prepared for."""
    if dataset is not None and dataset.get("task", "next_item") != name:
        raise ValueError(f"the dataset was prepared for the {dataset.get('task', 'next_item')} task, and this run's "
                         f"run.task is {name}: prepare it again under another run.run_dir")
    if name == "next_item":
        return _next_item()
    if name == "rating":
        return _rating()
    raise ValueError(f"unknown task {name!r}; valid tasks: next_item, rating")
