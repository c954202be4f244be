"""The one typed configuration schema of recdistill.

A run is configured by a YAML file plus ``dotted.key=value`` command-line
overrides. Both are merged into a plain dict and validated here, once, into a
tree of frozen pydantic models that the rest of the code receives explicitly.
Unknown keys are errors that name the key and list the valid ones.

Each package owns its sections: ``data`` and ``precompute`` are
:mod:`data_pipeline.config`'s, the models, ``distill`` and ``eval`` are
:mod:`distill.config`'s; ``run``, ``scaling`` and ``deepspeed`` (the engine) are
defined here, where the top-level :class:`Config` composes them all.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from data_pipeline.config import DataConfig, PrecomputeConfig
from distill.config import DistillConfig, EvalConfig, ModelConfig, Section, TrainConfig


class ConfigError(ValueError):
    """A configuration problem, with a message that names the key at fault."""


class RunConfig(Section):
    run_dir: str = Field("runs/tiny", description="Output root; any fsspec URL.")
    task: Literal["next_item", "rating"] = Field("next_item", description=(
        "next_item: rank the catalog for a user's next item. rating: predict a distribution over the rating a user "
        "gives an item (needs rated data)."))
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class TeacherConfig(Section):
    model: ModelConfig = ModelConfig(d_model=64, num_layers=2, num_heads=2, ffn_dim=256)
    train: TrainConfig = TrainConfig()
    checkpoint: Optional[str] = Field(None, description="An exported teacher to use instead of training one.")
    ensemble: list[str] = Field(default_factory=list, description=(
        "More exported teachers (other seeds or architectures, trained on this dataset): precompute labels with the "
        "mixture of their distributions and this run's teacher's, and evaluate scores the ensemble too."))


class StudentConfig(Section):
    model: ModelConfig = ModelConfig(d_model=16, num_layers=1, num_heads=1, ffn_dim=64)
    train: TrainConfig = TrainConfig()
    bf16: Literal["auto", "true", "false"] = Field(
        "auto", description="bf16 autocast of the student's forward (losses stay fp32); auto = on GPUs that support it."
    )


class ScalingConfig(Section):
    num_workers: int = Field(2, gt=0)
    min_workers: Optional[int] = Field(None, gt=0, description="Elastic lower bound (distill).")
    use_gpu: Literal["auto", "true", "false"] = "auto"
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(3, ge=-1)
    address: Optional[str] = Field(None, description="Ray address; None starts or joins a local cluster.")
    elastic_resize_interval_s: float = Field(60.0, ge=0, description="How often an elastic run looks for more workers.")
    autoscaling: bool = Field(False, description="The Ray cluster adds nodes on demand: start even if the nodes there now "
                                                 "cannot hold the workers (else refused up front, with the numbers).")
    start_attempts: int = Field(3, gt=0, description="Tries to start the worker group (each waits 60 s for resources).")
    memory_per_node_gb: Optional[float] = Field(None, gt=0, description=(
        "Host RAM the workers of one node may use together; None = this machine's available memory "
        "(the memory plan refuses a launch whose estimate exceeds it)."))
    gpu_memory_gb: Optional[float] = Field(None, gt=0, description="Memory of one GPU; None = read from the driver's GPU.")

    @model_validator(mode="after")
    def _bounds(self) -> "ScalingConfig":
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(f"min_workers ({self.min_workers}) must be <= num_workers ({self.num_workers})")
        return self


OffloadDevice = Literal["none", "cpu", "nvme"]


class DeepSpeedConfig(Section):
    """The teacher's engine (train-teacher, and precompute's hosting). None of these change what is learned:
    a checkpoint resumes under other offload settings (ZeRO's states are the same tensors wherever they live)."""

    zero_stage: int = Field(3, ge=0, le=3)
    offload_optimizer: OffloadDevice = Field("none", description=(
        "Where ZeRO keeps the optimizer states and fp32 master weights: none (beside the model), cpu (host RAM), or "
        "nvme (ZeRO-Infinity: files under nvme_path, streamed through DeepSpeed's async I/O)."))
    offload_params: OffloadDevice = Field("none", description="ZeRO-3 only: where each worker's parameter partition "
                                                              "lives between uses (none, cpu or nvme).")
    nvme_path: Optional[str] = Field(None, description="A local folder on fast disk for nvme offload; each worker writes "
                                                       "its own files under it (needs its free space, planned).")
    activation_checkpointing: bool = Field(False, description=(
        "Keep only each Transformer block's input in the forward and recompute the block in the backward: "
        "activations shrink by about the number of tensors a block keeps, for about one more forward of compute."))
    bf16: Literal["auto", "true", "false"] = "auto"

    @field_validator("offload_optimizer", "offload_params", mode="before")
    @classmethod
    def _offload_from_bool(cls, value: Any) -> Any:
        # Configs written before nvme existed say true/false.
        return {True: "cpu", False: "none"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _offload_needs(self) -> "DeepSpeedConfig":
        if "nvme" in (self.offload_optimizer, self.offload_params) and not self.nvme_path:
            raise ValueError("nvme offload needs nvme_path: a local folder on fast disk (e.g. /local_nvme/recdistill)")
        if self.offload_params != "none" and self.zero_stage != 3:
            raise ValueError(f"offload_params={self.offload_params} needs zero_stage 3 (it is {self.zero_stage}): only ZeRO-3 "
                             "partitions the parameters")
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage >= 1 (ZeRO partitions the optimizer states it offloads)")
        return self


def _check_named_overrides(what: str, name: str, overrides: list[str], prefixes: tuple[str, ...], why: str) -> None:
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise ValueError(f"{what} name {name!r}: use lowercase letters, digits and _ (it names a folder)")
    if not overrides:
        raise ValueError(f"{what} {name!r} lists no overrides")
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if key == "distill.augmented":
            raise ValueError(f"{what} {name!r}: distill.augmented is the sweep's to set (sweep.with_augmented)")
        if "=" not in text or not key.startswith(prefixes):
            raise ValueError(f"{what} {name!r}: {text!r} must be a dotted override of a "
                             f"{' or '.join(p + '*' for p in prefixes)} key ({why})")


class SweepConfig(Section):
    """``recdistill sweep``: a family of students trained from one soft-label store."""

    fractions: list[float] = Field(default_factory=lambda: [0.2, 0.1, 0.02],
                                   description="Student sizes as fractions of the teacher's parameters, each in (0, 1).")
    seeds: list[int] = Field(default_factory=lambda: [0])
    twins: bool = Field(True, description="Also train each student's twin without the teacher (alpha=1).")
    concurrent: int = Field(2, gt=0, description="Members trained at the same time (each its own Ray Train run).")
    workers_per_member: int = Field(1, gt=0)
    with_augmented: bool = Field(False, description="Also distil each member on the store's teacher-labelled augmented rows "
                                                    "(a third member per size and seed, '-kdaug'); the '-kd' members then skip them.")
    variants: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Levers measured on the frontier: name -> dotted overrides under distill.* or student.train.* "
                    "(e.g. {dkd: [distill.loss=dkd], a05: [distill.alpha=0.5]}). Each size and seed gets one more "
                    "distilled member per variant ('-kd-<name>'), compared with the same twin.")
    schedules: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Training schedules tried by every member alike, distilled and twin: name -> dotted overrides of "
                    "student.train.* (e.g. {lr2: [student.train.lr=0.002], ep60: [student.train.epochs=60]}). Each member "
                    "also trains under each schedule ('<member>--<name>'; 'base' is the run's own), and the frontier keeps, for each member and "
                    "for its twin apart, the schedule with the best validation NDCG@10: equal budgets, chosen on "
                    "validation, never on test.")

    @model_validator(mode="after")
    def _variants(self) -> "SweepConfig":
        for name, overrides in self.variants.items():
            _check_named_overrides("variant", name, overrides, ("distill.", "student.train."),
                                   "the store, the sizes and the twins are shared by every member")
        for name, overrides in self.schedules.items():
            if name == "base":
                raise ValueError("schedule name 'base' is reserved: it names the run's own student.train in the frontier")
            _check_named_overrides("schedule", name, overrides, ("student.train.",),
                                   "a schedule applies to twins too, which read no distill.* setting")
        return self

    @model_validator(mode="after")
    def _sizes(self) -> "SweepConfig":
        bad = [f for f in self.fractions if not 0 < f < 1]
        if bad or not self.fractions:
            raise ValueError(f"fractions must be a non-empty list of sizes between 0 and 1 (of the teacher's parameters); "
                             f"got {bad or self.fractions}: a student at least as large as its teacher saves nothing")
        if not self.seeds:
            raise ValueError("seeds must list at least one seed")
        return self


class AutoscalingSettings(Section):
    """Ray Serve's replica autoscaling (its ``autoscaling_config``)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, gt=0)
    target_ongoing_requests: float = Field(8.0, gt=0, description="Requests in flight per replica that autoscaling aims at.")

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingSettings":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        return self


class ServeConfig(Section):
    """``recdistill serve``: one exported model of the run behind an HTTP endpoint (Ray Serve)."""

    model: str = Field("student_kd", description=(
        "What to serve: student_kd, student_baseline, teacher, or the URL of any export trained on this run's dataset "
        "(e.g. a sweep member's run_dir/sweep/<member>/student)."))
    host: str = Field("127.0.0.1", description="Address the HTTP proxy listens on (0.0.0.0 for other machines).")
    port: int = Field(8000, gt=0, lt=65536)
    route_prefix: str = Field("/recommend", pattern=r"^/")
    app_name: str = "recdistill"
    num_replicas: int = Field(1, gt=0, description="Fixed replica count (ignored when autoscaling is set).")
    autoscaling: Optional[AutoscalingSettings] = None
    cpus_per_replica: float = Field(1.0, ge=0)
    gpus_per_replica: Optional[float] = Field(None, ge=0, description="None: 1 when the cluster has GPUs, else 0.")
    max_batch_size: int = Field(32, gt=0, description="Requests one forward pass answers together (@serve.batch).")
    batch_wait_timeout_s: float = Field(0.002, ge=0, description="How long a batch waits to fill before it runs.")
    max_ongoing_requests: int = Field(128, gt=0, description="Requests a replica accepts at once; more wait in the proxy.")
    max_k: int = Field(100, gt=0, description="Largest k a request may ask for.")
    max_history: int = Field(20_000, gt=0, description=(
        "Longest history a request may send (the model reads its last max_len; all of it filters seen items). "
        "Request bodies over ~64 bytes per item are refused unread (413)."))

    @model_validator(mode="after")
    def _batching(self) -> "ServeConfig":
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                             f"({self.max_batch_size}): a replica could never fill a batch")
        return self


class Config(Section):
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    teacher: TeacherConfig = TeacherConfig()
    student: StudentConfig = StudentConfig()
    distill: DistillConfig = DistillConfig()
    precompute: PrecomputeConfig = PrecomputeConfig()
    scaling: ScalingConfig = ScalingConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    eval: EvalConfig = EvalConfig()
    sweep: SweepConfig = SweepConfig()
    serve: ServeConfig = ServeConfig()

    def with_absolute_paths(self) -> "Config":
        """Local relative paths made absolute, so Ray workers (whose working directory differs) find them."""

        def absolute(url: str) -> str:
            return url if not url or "://" in url else str(Path(url).expanduser().resolve())

        data = self.data.model_copy(update={"path": absolute(self.data.path)})
        run = self.run.model_copy(update={"run_dir": absolute(self.run.run_dir)})
        updates: dict[str, Any] = {"data": data, "run": run}
        teacher: dict[str, Any] = {"ensemble": [absolute(url) for url in self.teacher.ensemble]}
        if self.teacher.checkpoint:
            teacher["checkpoint"] = absolute(self.teacher.checkpoint)
        updates["teacher"] = self.teacher.model_copy(update=teacher)
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
# distill.augmented only says which rows to read: the augmentation actually trained on enters the
# student's fingerprint through its teacher part (cluster.student_batches.student_source).
_OPERATIONAL_DISTILL = {"prefetch_blocks", "checkpoint_every_steps", "log_consumed", "augmented"}


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
        if getattr(section, "lr_schedule", "constant") != "constant":
            # A cosine decays to 0 at the last planned epoch: more epochs are another schedule, not a continuation.
            operational = set(operational) - {"epochs"}
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
