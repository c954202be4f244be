"""The configuration sections the math components own: models, training, distillation, evaluation.

The top-level schema (:mod:`cluster.config`) composes these with the data sections
(:mod:`data_pipeline.config`) and the engine's; nothing here knows of either.
Every section is a frozen pydantic model that rejects unknown keys.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    """A config section: frozen, unknown keys rejected, defaults validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ItemDimBand(Section):
    """A popularity band of the item table: the next ``items`` most frequent training items, ``dim`` wide."""

    items: Optional[int] = Field(None, gt=0, description="Items in this band; null (last band only) = all the rest.")
    dim: int = Field(gt=0, description="Width of these items' own vectors (projected up to d_model).")


class ModelConfig(Section):
    """A SASRec-style causal Transformer over item ids."""

    d_model: int = Field(64, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(2, gt=0)
    ffn_dim: int = Field(256, gt=0)
    max_len: int = Field(50, gt=0)
    dropout: float = Field(0.2, ge=0, lt=1)
    tied_embeddings: bool = True
    # Mixed-dimension item embeddings (Ginart et al., 2019): popular items get wide vectors, rare ones
    # narrow vectors projected up to d_model. On a large catalog the item table is most of a small
    # model's parameters; this spends them where the interactions are. None = one d_model-wide table.
    item_dims: Optional[list[ItemDimBand]] = None

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelConfig":
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        return self

    @model_validator(mode="after")
    def _item_dims(self) -> "ModelConfig":
        if self.item_dims is None:
            return self
        if not self.item_dims:
            raise ValueError("item_dims must list at least one band (or be null for a uniform table)")
        if self.item_dims[-1].items is not None or any(b.items is None for b in self.item_dims[:-1]):
            raise ValueError("item_dims: every band but the last needs `items`; the last must leave it null (all the rest)")
        too_wide = [b.dim for b in self.item_dims if b.dim > self.d_model]
        if too_wide:
            raise ValueError(f"item_dims: band widths {too_wide} exceed d_model ({self.d_model})")
        if not self.tied_embeddings:
            raise ValueError("item_dims needs tied_embeddings: the banded table both embeds and scores items")
        return self


class TrainConfig(Section):
    epochs: int = Field(10, gt=0)
    batch_size: int = Field(128, gt=0, description="Global batch size (all workers together).")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up from 0 to lr over this many optimiser steps.")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="After warm-up: constant lr, or cosine decay to 0 at the last planned step."
    )
    grad_clip: float = Field(1.0, ge=0)
    loss: Literal["full_ce", "sampled_softmax"] = "full_ce"
    num_negatives: int = Field(256, gt=0, description="Negatives per position for sampled_softmax.")
    eval_batch_size: int = Field(512, gt=0)
    # Stop when validation NDCG@10 has not improved for this many epochs (0 = never).
    patience: int = Field(0, ge=0)


class DistillConfig(Section):
    loss: Literal["kl_topk", "kl_topk_tail", "kl_sampled", "reverse_kl", "jsd", "ranking", "dkd", "kl_bands"] = "kl_topk_tail"
    # T=1 by default: the only temperature at which the top-k + tail bucket is exact (the store keeps
    # the T=1 normaliser); at T=2 the equal-tail approximation inflates the tail on a large catalog.
    temperature: float = Field(1.0, gt=0)
    alpha: float = Field(0.2, ge=0, le=1, description="Weight of the hard-label loss; 1 = no teacher.")
    ranking_top: int = Field(10, gt=0, description="Teacher top-K used as weighted positives by loss=ranking.")
    dkd_target_weight: float = Field(1.0, ge=0, description="loss=dkd: weight of the target term (TCKD).")
    dkd_nontarget_weight: float = Field(8.0, ge=0, description="loss=dkd: weight of the non-target term (NCKD).")
    band_weight: float = Field(
        1.0, ge=0, description="loss=kl_bands: weight of the KD within each popularity band of the teacher's top-k "
                               "(distill.metrics.POPULARITY_BANDS of the training counts), added to plain KD.")
    # The streaming order: J virtual shards, fixed for a run, independent of the worker count (J >= workers).
    num_virtual_shards: int = Field(16, gt=0)
    prefetch_blocks: int = Field(3, gt=0)
    checkpoint_every_steps: int = Field(50, gt=0, description="Mid-epoch checkpoints (plus one at every epoch end).")
    log_consumed: bool = Field(False, description="Audit log of the rows each step consumed (student/consumed/).")
    augmented: Literal["auto", "use", "skip"] = Field(
        "auto", description="The store's teacher-labelled augmented rows: auto = train on them when the store has them; "
                            "use = require them (refused if the store has none); skip = real rows only.")
    init_from_teacher: bool = Field(
        False, description="Start the distilled student's item table from the teacher's top principal item directions."
    )
    embedding_hint: float = Field(
        0.0, ge=0, description="Weight of the item-embedding hint (distill.hints): the student's item vectors, through a "
                               "learned projection, pulled toward the teacher's by cosine; 0 = off. Next-item task only."
    )


class EvalConfig(Section):
    ks: list[int] = Field(default_factory=lambda: [10, 20])
    filter_seen: bool = True
    batch_size: int = Field(512, gt=0)

    @model_validator(mode="after")
    def _ks(self) -> "EvalConfig":
        if not self.ks or any(k <= 0 for k in self.ks):
            raise ValueError("ks must be a non-empty list of positive integers")
        return self
