"""The one typed configuration schema of recdistill.

A run is configured by a YAML file plus ``dotted.key=value`` command-line
overrides. Both are merged into a plain dict and validated here, once, into a
tree of frozen pydantic models that the rest of the code receives explicitly.
Unknown keys are errors that name the key and list the valid ones.
"""

from __future__ import annotations

import copy
import hashlib
import json
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration problem, with a message that names the key at fault."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class RunConfig(_Section):
    run_dir: str = Field("runs/tiny", description="Output root; any fsspec URL.")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class ColumnMapping(_Section):
    """Column names of a CSV/Parquet interaction log."""

    user: str = "user_id"
    item: str = "item_id"
    timestamp: Optional[str] = "timestamp"
    rating: Optional[str] = None


class SyntheticConfig(_Section):
    """Size and structure of the embedded synthetic dataset (data.format=synthetic)."""

    num_users: int = Field(2000, gt=0)
    num_items: int = Field(500, gt=1)
    num_clusters: int = Field(20, gt=0)
    min_length: int = Field(8, ge=3)
    max_length: int = Field(40, ge=3)
    zipf_exponent: float = Field(1.1, gt=0)
    # Probability that the next item follows the Markov cluster transition (vs. a random popular item).
    transition_prob: float = Field(0.8, ge=0, le=1)
    # Probability that the next cluster is the current one's preferred successor.
    successor_prob: float = Field(0.7, ge=0, le=1)

    @model_validator(mode="after")
    def _lengths(self) -> "SyntheticConfig":
        if self.max_length < self.min_length:
            raise ValueError("max_length must be >= min_length")
        if self.num_clusters > self.num_items:
            raise ValueError("num_clusters must be <= num_items")
        return self


class DataConfig(_Section):
    path: str = Field("", description="Input interaction log; any fsspec URL. Ignored for synthetic.")
    format: Literal["sasrec", "movielens_udata", "movielens_dat", "csv", "parquet", "synthetic"] = "synthetic"
    columns: ColumnMapping = ColumnMapping()
    csv_delimiter: str = ","
    min_rating: Optional[float] = None
    min_user_interactions: int = Field(3, ge=3, description="Users with fewer are dropped (leave-one-out needs 3).")
    min_item_interactions: int = Field(1, ge=1)
    rows_per_shard: int = Field(50_000, gt=0)
    row_group_size: int = Field(64, gt=0, description="Users per Parquet row group (the streaming block of the baseline).")
    storage_options: dict[str, Any] = Field(default_factory=dict)
    synthetic: SyntheticConfig = SyntheticConfig()


class ItemDimBand(_Section):
    """A popularity band of the item table: the next ``items`` most frequent training items, ``dim`` wide."""

    items: Optional[int] = Field(None, gt=0, description="Items in this band; null (last band only) = all the rest.")
    dim: int = Field(gt=0, description="Width of these items' own vectors (projected up to d_model).")


class ModelConfig(_Section):
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


class TrainConfig(_Section):
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


class TeacherConfig(_Section):
    model: ModelConfig = ModelConfig(d_model=64, num_layers=2, num_heads=2, ffn_dim=256)
    train: TrainConfig = TrainConfig()
    checkpoint: Optional[str] = Field(None, description="An exported teacher to use instead of training one.")


class StudentConfig(_Section):
    model: ModelConfig = ModelConfig(d_model=16, num_layers=1, num_heads=1, ffn_dim=64)
    train: TrainConfig = TrainConfig()
    bf16: Literal["auto", "true", "false"] = Field(
        "auto", description="bf16 autocast of the student's forward (losses stay fp32); auto = on GPUs that support it."
    )


class DistillConfig(_Section):
    loss: Literal["kl_topk", "kl_topk_tail", "kl_sampled", "reverse_kl", "jsd", "ranking"] = "kl_topk_tail"
    # T=1 by default: the only temperature at which the top-k + tail bucket is exact (the store keeps
    # the T=1 normaliser); at T=2 the equal-tail approximation inflates the tail on a large catalog.
    temperature: float = Field(1.0, gt=0)
    alpha: float = Field(0.2, ge=0, le=1, description="Weight of the hard-label loss; 1 = no teacher.")
    ranking_top: int = Field(10, gt=0, description="Teacher top-K used as weighted positives by loss=ranking.")
    # The streaming order: J virtual shards, fixed for a run, independent of the worker count (J >= workers).
    num_virtual_shards: int = Field(16, gt=0)
    prefetch_blocks: int = Field(3, gt=0)
    checkpoint_every_steps: int = Field(50, gt=0, description="Mid-epoch checkpoints (plus one at every epoch end).")
    log_consumed: bool = Field(False, description="Audit log of the rows each step consumed (student/consumed/).")
    init_from_teacher: bool = Field(
        False, description="Start the distilled student's item table from the teacher's top principal item directions."
    )


class PrecomputeConfig(_Section):
    k: int = Field(64, gt=0, description="Top-k ids and logits stored per position.")
    dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    num_sampled: int = Field(0, ge=0, description="Draws per position for sampled soft labels (0 = off).")
    # Rows are whole training sequences (up to max_len positions each).
    rows_per_shard: int = Field(1024, gt=0)
    row_group_size: int = Field(64, gt=0, description="Sequences per row group: the streaming reader's block.")
    batch_size: int = Field(32, gt=0, description="Sequences per teacher forward (memory: batch x max_len x catalog floats).")


class ScalingConfig(_Section):
    num_workers: int = Field(2, gt=0)
    min_workers: Optional[int] = Field(None, gt=0, description="Elastic lower bound (distill).")
    use_gpu: Literal["auto", "true", "false"] = "auto"
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(3, ge=-1)
    address: Optional[str] = Field(None, description="Ray address; None starts or joins a local cluster.")
    elastic_resize_interval_s: float = Field(60.0, ge=0, description="How often an elastic run looks for more workers.")

    @model_validator(mode="after")
    def _bounds(self) -> "ScalingConfig":
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(f"min_workers ({self.min_workers}) must be <= num_workers ({self.num_workers})")
        return self


class DeepSpeedConfig(_Section):
    zero_stage: int = Field(3, ge=0, le=3)
    offload_optimizer: bool = False
    offload_params: bool = False
    bf16: Literal["auto", "true", "false"] = "auto"


class EvalConfig(_Section):
    ks: list[int] = Field(default_factory=lambda: [10, 20])
    filter_seen: bool = True
    batch_size: int = Field(512, gt=0)

    @model_validator(mode="after")
    def _ks(self) -> "EvalConfig":
        if not self.ks or any(k <= 0 for k in self.ks):
            raise ValueError("ks must be a non-empty list of positive integers")
        return self


class Config(_Section):
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    teacher: TeacherConfig = TeacherConfig()
    student: StudentConfig = StudentConfig()
    distill: DistillConfig = DistillConfig()
    precompute: PrecomputeConfig = PrecomputeConfig()
    scaling: ScalingConfig = ScalingConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    eval: EvalConfig = EvalConfig()

    def check_catalog(self, num_items: int) -> None:
        """Checks that depend on the dataset (known only after prepare)."""
        if self.precompute.k > num_items:
            raise ConfigError(f"precompute.k={self.precompute.k} is larger than the catalog ({num_items} items)")
        for k in self.eval.ks:
            if k > num_items:
                raise ConfigError(f"eval.ks contains {k}, larger than the catalog ({num_items} items)")

    def with_absolute_paths(self) -> "Config":
        """Local relative paths made absolute, so Ray workers (whose working directory differs) find them."""

        def absolute(url: str) -> str:
            return url if not url or "://" in url else str(Path(url).expanduser().resolve())

        data = self.data.model_copy(update={"path": absolute(self.data.path)})
        run = self.run.model_copy(update={"run_dir": absolute(self.run.run_dir)})
        updates: dict[str, Any] = {"data": data, "run": run}
        if self.teacher.checkpoint:
            updates["teacher"] = self.teacher.model_copy(update={"checkpoint": absolute(self.teacher.checkpoint)})
        return self.model_copy(update=updates)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------
# What a training stage learns from


# Settings that change how long or how a stage runs, not what it learns: a checkpoint made
# under other values of these still belongs to the stage (e.g. more epochs to train longer).
_OPERATIONAL_TRAIN = {"epochs", "patience", "eval_batch_size"}
_OPERATIONAL_DISTILL = {"prefetch_blocks", "checkpoint_every_steps", "log_consumed"}


def stage_fingerprint(
    cfg: Config, stage: Literal["teacher", "student", "baseline"], teacher_fingerprint: Optional[str] = None
) -> str:
    """A short hash of the settings that define what ``stage`` trains.

    Stored in its checkpoints and its ``history.json``: a checkpoint or finished stage with
    another fingerprint was made by another configuration, and must not be resumed or
    reused as if it were this one's. The distilled student also depends on its teacher
    (``teacher_fingerprint``, the export's): a new teacher means a new student.
    """
    # Values at their schema default are left out, so that a new option (added at its default)
    # does not make every finished stage look like another configuration's.
    def settings(section: BaseModel, operational: set[str] = frozenset()) -> dict[str, Any]:
        return section.model_dump(mode="json", exclude=set(operational), exclude_defaults=True)

    if stage == "teacher":
        parts: dict[str, Any] = {"model": settings(cfg.teacher.model), "train": settings(cfg.teacher.train, _OPERATIONAL_TRAIN)}
    elif stage in ("student", "baseline"):
        parts = {"model": settings(cfg.student.model), "train": settings(cfg.student.train, _OPERATIONAL_TRAIN),
                 "distill": None if stage == "baseline" else settings(cfg.distill, _OPERATIONAL_DISTILL)}
    else:
        raise ValueError(f"unknown stage {stage!r}; expected teacher, student or baseline")
    parts["seed"] = cfg.run.seed
    if stage == "student":
        parts["teacher"] = teacher_fingerprint
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------
# Loading, overrides and error messages


def _valid_keys(model_cls: type[BaseModel]) -> list[str]:
    return sorted(model_cls.model_fields)


def _section_at(loc: tuple[Any, ...]) -> type[BaseModel]:
    """The model class that owns the field at ``loc`` (a pydantic error location)."""
    cls: type[BaseModel] = Config
    for part in loc[:-1]:
        if isinstance(part, int):  # an index into a list field: stay with the list's element class
            continue
        field = cls.model_fields.get(str(part))
        section = _section_class(field.annotation) if field is not None else None
        if section is None:
            break
        cls = section
    return cls


def _section_class(annotation: Any) -> Optional[type[BaseModel]]:
    """The section class inside an annotation such as ``X``, ``Optional[X]`` or ``Optional[list[X]]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section_class(arg)
        if found is not None:
            return found
    return None


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            valid = ", ".join(_valid_keys(_section_at(loc)))
            lines.append(f"unknown key '{key}'; valid keys here: {valid}")
        else:
            lines.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` laid over ``base``, recursively for mappings; any other value (lists too) replaces."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", value), the value typed as YAML would type it."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def build_config(tree: dict[str, Any] | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Validate a config tree plus dotted overrides into a :class:`Config`."""
    if not isinstance(tree or {}, dict):
        raise ConfigError("a config file must hold a mapping at the top level")
    # Start from the full default tree, so a partial section (``student.model.dropout=0.3``) keeps
    # its section's own defaults (the student's, not a generic model's) for the keys it leaves out.
    merged = _merge(Config().to_dict(), copy.deepcopy(tree or {}))
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(merged, key, value)
    try:
        return Config.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML file (or nothing: all defaults) and apply overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: a config file must hold a mapping at the top level")
    try:
        return build_config(tree, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path or '<defaults>'}: {exc}") from None
