"""The run plan: every decision of a job, made once on the driver before any worker starts.

:func:`build_plan` reads the validated config and what already exists under
``run.run_dir`` (the dataset manifest, the teacher's export, the soft-label store's
manifest, each training stage's ``history.json``), never the data itself beyond
manifests, Parquet footers and counts, and never starts Ray. From them it decides:

* each stage's inputs (with fingerprints), what it writes, its worker count, and
  whether it is done, resumes, or runs;
* the storage layout: row-group and file sizes of the example shards and of the
  soft-label store, derived from the row counts, the global batch and the reader's
  virtual shards (:mod:`data_pipeline.block_layout`) unless set explicitly;
* every problem that would make a stage fail, with the key or file at fault and the fix.

Stages read their decisions from the plan; ``recdistill plan`` prints it and
``pipeline`` refuses a plan with any problem before its first stage.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Optional

from cluster.common import teacher_url
from cluster import memory_plan
from cluster.config import Config, stage_fingerprint
from cluster.student_batches import augmentation_in_use, label_settings, student_source
from cluster.plan_checks import (PlanError, Problem, catalog_problems, dataset_problems, ensemble_members, offload_problems,
                                 size_warnings, task_problems)
from data_pipeline import block_layout, fsio
from data_pipeline import soft_labels
from data_pipeline.dataset import DataError, load_manifest, read_split
from data_pipeline.exports import ExportError, ensemble_fingerprint, read_export_meta
from data_pipeline.layout import RunLayout

STAGES = ("prepare", "train-teacher", "precompute", "distill", "distill --baseline", "evaluate")
#: The data's row groups when nothing else decides them (a dataset prepared before plans existed).
LEGACY_ROW_GROUP = 64


@dataclass
class StagePlan:
    name: str
    action: str  # "run", "resume", "done" (skipped) or "given" (teacher.checkpoint)
    reads: dict[str, str]
    writes: str
    workers: str
    fingerprints: dict[str, Optional[str]] = field(default_factory=dict)
    # Peak memory per worker; estimated by the stages that can (None: not estimated yet).
    memory_estimate: Optional[str] = None
    # An input that does not exist yet; fine in a pipeline (an earlier stage makes it), fatal alone.
    missing_input: Optional[str] = None


@dataclass
class StorageLayout:
    num_virtual_shards: int
    data_rows_per_shard: int
    data_row_group_size: Optional[int]  # None: decided by prepare from the row count (the plan's rule)
    store_rows_per_shard: Optional[int]
    store_row_group_size: Optional[int]
    origin: dict[str, str] = field(default_factory=dict)  # setting -> explicit / derived / as written / at prepare
    fill: dict[str, float] = field(default_factory=dict)  # reader -> mean global batch / best possible


@dataclass
class RunPlan:
    run_dir: str
    dataset: Optional[dict[str, Any]]
    num_sequences: Optional[int]  # training sequences (users with >= 2 training items): the store's rows
    teacher_url: str
    teacher: Optional[dict[str, Any]]
    store: Optional[dict[str, Any]]  # the committed store's manifest, only when it fits this run
    layout: StorageLayout
    stages: dict[str, StagePlan]
    problems: list[Problem]
    warnings: list[Problem] = field(default_factory=list)  # works, but probably not what the user wants
    # Who labels the store: the teacher, or the mixture of it and teacher.ensemble's members (their fingerprint).
    labels_fingerprint: Optional[str] = None
    # Peak memory per worker of each training stage against the nodes' capacity (cluster.memory_plan).
    memory: dict[str, "memory_plan.StageMemory"] = field(default_factory=dict)

    def stage(self, name: str) -> StagePlan:
        return self.stages[name]

    def check(self, stages: Iterable[str] = STAGES, memory: bool = True) -> None:
        """Raise :class:`PlanError` listing every problem of ``stages`` (``memory=False``: but the memory plan's)."""
        wanted = set(stages)
        found = [p for p in self.problems if p.stage in wanted and (memory or p.kind != "memory")]
        if found:
            raise PlanError(found)

    def require(self, stage: str) -> None:
        """Before running ``stage`` on its own: no problem, and every input already there."""
        self.check([stage])
        missing = self.stages[stage].missing_input
        if missing:
            raise PlanError([Problem(stage, missing)])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------
# Building


def data_row_group_rule(cfg: Config):
    """The rule prepare applies to size the example shards' row groups once it knows the row counts
    (``data.row_group_size`` when set): the largest whose deal fills the student's global batch."""
    if cfg.data.row_group_size:
        return lambda shard_rows: cfg.data.row_group_size
    J, B, seed = cfg.distill.num_virtual_shards, cfg.student.train.batch_size, cfg.run.seed
    return lambda shard_rows: block_layout.choose_row_group_size(shard_rows, J, B, seed)


def build_plan(cfg: Config) -> RunPlan:
    """The plan of ``cfg``'s run, from the config and the manifests under ``run.run_dir``."""
    return _Planner(cfg).build()


class _Planner:
    """Reads what exists once, then decides stage by stage (in pipeline order)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.paths = RunLayout(cfg.run.run_dir)
        self.storage = cfg.data.storage_options
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []
        self.stages: dict[str, StagePlan] = {}
        self.memory: dict[str, memory_plan.StageMemory] = {}

    def problem(self, stage: str, message: str) -> None:
        self.problems.append(Problem(stage, message))

    def build(self) -> RunPlan:
        cfg = self.cfg
        self.dataset = _try(lambda: load_manifest(self.paths.data, self.storage), DataError)
        self.num_sequences = self._num_sequences()
        self.teacher_url = teacher_url(cfg)
        self.teacher = _try(lambda: read_export_meta(self.teacher_url, self.storage), ExportError)
        self.layout = StorageLayout(
            num_virtual_shards=cfg.distill.num_virtual_shards,
            data_rows_per_shard=cfg.data.rows_per_shard,
            data_row_group_size=None,
            store_rows_per_shard=None,
            store_row_group_size=None,
        )
        self._check_config()
        self._prepare()
        self._train_teacher()
        self._precompute()
        self._student("distill", baseline=False)
        self._student("distill --baseline", baseline=True)
        self.stages["evaluate"] = StagePlan(
            "evaluate", "run", {"dataset": self.paths.data, "models": "every export present"}, self.paths.metrics, "driver",
            missing_input=None if self.dataset else f"no prepared dataset at {self.paths.data}: run `recdistill prepare` first")
        if self.dataset:
            self.warnings += size_warnings(self.cfg, self.dataset["num_items"], self.teacher)
            self._memory()
        return RunPlan(self.cfg.run.run_dir, self.dataset, self.num_sequences, self.teacher_url, self.teacher,
                       self.store, self.layout, self.stages, self.problems, self.warnings, self.labels_fingerprint, self.memory)

    # ---- checks that need nothing but the config

    def _check_config(self) -> None:
        cfg = self.cfg
        self.problems += task_problems(cfg)
        J, B = cfg.distill.num_virtual_shards, cfg.student.train.batch_size
        for stage in ("distill", "distill --baseline"):
            if B < J:
                self.problem(stage, f"student.train.batch_size ({B}) is smaller than distill.num_virtual_shards ({J}): "
                                    "every virtual shard adds at least one row per step. Raise the batch or lower the shards")
            if cfg.scaling.num_workers > J:
                self.problem(stage, f"scaling.num_workers ({cfg.scaling.num_workers}) exceeds distill.num_virtual_shards "
                                    f"({J}), the most workers the streaming reader can feed. Lower the workers or raise the shards")

    # ---- stages

    def _prepare(self) -> None:
        cfg, paths = self.cfg, self.paths
        source = "synthetic generator" if cfg.data.format == "synthetic" else cfg.data.path
        stage = StagePlan("prepare", "done" if self.dataset else "run", {"input": source}, paths.data, "driver")
        self.stages["prepare"] = stage
        if self.dataset:
            stage.fingerprints["dataset"] = self.dataset["fingerprint"]
            self.problems += dataset_problems(cfg, self.dataset, self.storage)
            self.problems += catalog_problems(cfg, self.dataset["num_items"])
            self._data_layout()
            return
        self.layout.data_row_group_size = cfg.data.row_group_size
        self.layout.origin["data.row_group_size"] = "explicit" if cfg.data.row_group_size else "at prepare, from the row count"
        if cfg.data.format != "synthetic":
            if not cfg.data.path:
                self.problem("prepare", f"data.path is not set (data.format is {cfg.data.format}): give the input log's URL")
            elif not _exists(cfg.data.path, self.storage):
                self.problem("prepare", f"data.path {cfg.data.path} does not exist: check the path (and data.storage_options)")

    def _data_layout(self) -> None:
        """The baseline streams the training split as prepare wrote it: check its deal."""
        cfg, split = self.cfg, self.dataset["splits"]["train"]
        written = split.get("row_group_size")
        self.layout.data_row_group_size = written or LEGACY_ROW_GROUP
        self.layout.origin["data.row_group_size"] = "as written" if written else "as written (assumed 64: an older dataset)"
        groups = block_layout.shard_row_groups(split["rows"], self.layout.data_row_group_size)
        fill = block_layout.batch_fill(groups, cfg.distill.num_virtual_shards, cfg.student.train.batch_size, cfg.run.seed)
        self.layout.fill["baseline"] = round(fill.ratio, 3)
        if fill.ratio < block_layout.MIN_FILL:
            fix = ("lower data.row_group_size" if cfg.data.row_group_size
                   else "re-run prepare (it now sizes row groups from the data), or use another run.run_dir")
            self.problem("distill --baseline", _fill_message(f"the training split under {self.paths.data}", groups, fill, cfg, fix))

    def _train_teacher(self) -> None:
        cfg, paths = self.cfg, self.paths
        reads = {"dataset": paths.data}
        workers = f"{cfg.scaling.num_workers} (DeepSpeed ZeRO-{cfg.deepspeed.zero_stage})"
        if cfg.teacher.checkpoint:
            stage = StagePlan("train-teacher", "given", reads, self.teacher_url, workers)
            if self.teacher is None:
                self.problem("train-teacher", f"teacher.checkpoint {cfg.teacher.checkpoint} holds no exported model "
                                              "(export.json missing): check the URL, or remove the key to train a teacher")
        else:
            stage = StagePlan("train-teacher", self._progress(paths.teacher, "teacher"), reads, paths.teacher, workers)
        stage.fingerprints["stage"] = stage_fingerprint(cfg, "teacher")
        if stage.action in ("run", "resume"):
            self.problems += offload_problems(cfg)
        if self.teacher:
            stage.fingerprints["teacher"] = self.teacher["fingerprint"]
        self.stages["train-teacher"] = stage
        if self.teacher and self.dataset:
            where = "teacher.checkpoint" if cfg.teacher.checkpoint else self.teacher_url
            if self.teacher["num_items"] != self.dataset["num_items"]:
                self.problem("precompute", f"the teacher at {self.teacher_url} ({where}) scores {self.teacher['num_items']} "
                                              f"items, the dataset has {self.dataset['num_items']}: it belongs to another dataset")
            elif self.teacher.get("dataset_fingerprint") not in (None, self.dataset["fingerprint"]):
                self.problem("precompute", f"the teacher at {self.teacher_url} ({where}) was trained on dataset "
                                              f"{self.teacher['dataset_fingerprint'][:12]}…, this run's is "
                                              f"{self.dataset['fingerprint'][:12]}…: use another run.run_dir or teacher")
        if not self.dataset:
            stage.missing_input = f"no prepared dataset at {paths.data}: run `recdistill prepare` first"

    def _precompute(self) -> None:
        cfg, paths = self.cfg, self.paths
        stage = StagePlan("precompute", "run", {"teacher": self.teacher_url, "dataset": paths.data}, paths.soft_labels,
                          f"{cfg.scaling.num_workers} (teacher hosted under ZeRO-{cfg.deepspeed.zero_stage})")
        self.stages["precompute"] = stage
        self.store, self.store_problem = None, None
        members, problems = ensemble_members(cfg, self.teacher, self.dataset, self.storage)
        self.problems += problems
        self.labels_fingerprint = None
        if self.teacher and len(members) == len(cfg.teacher.ensemble):
            self.labels_fingerprint = ensemble_fingerprint([self.teacher["fingerprint"], *(m["fingerprint"] for m in members)])
            if members:
                stage.fingerprints["teacher ensemble"] = self.labels_fingerprint
        if self.labels_fingerprint and self.dataset:  # the store must fit the teacher (ensemble) that exists now
            try:
                self.store = soft_labels.load_store_manifest(
                    paths.soft_labels, self.storage, expect_teacher=self.labels_fingerprint,
                    expect_dataset=self.dataset["fingerprint"], expect_num_items=self.dataset["num_items"])
                self._check_store_spec()
                stage.fingerprints["store teacher"] = self.store["teacher_fingerprint"]
            except soft_labels.SoftLabelError as exc:
                self.store, self.store_problem = None, str(exc)
        # Done unless the teacher is still to be trained (in a pipeline, a new teacher means new labels).
        if self.store is not None and self.stages["train-teacher"].action in ("done", "given"):
            stage.action = "done"
        if self.store is not None:
            self._store_layout_as_written()
        else:
            self._store_layout_to_write()
        if not self.teacher:
            stage.missing_input = f"no teacher export at {self.teacher_url}: run `recdistill train-teacher` first"
        if not self.dataset:
            stage.missing_input = f"no prepared dataset at {paths.data}: run `recdistill prepare` first"

    def _check_store_spec(self) -> None:
        """A store of other label settings (k, value dtype, sampled labels) is not this run's: precompute re-runs."""
        pcfg, spec = self.cfg.precompute, self.store.get("spec", {})
        store_task = "rating" if spec.get("num_levels") else "next_item"
        if store_task != self.cfg.run.task:
            raise soft_labels.SoftLabelError(f"soft labels at {self.paths.soft_labels} were computed for the {store_task} task, "
                                             f"this run's run.task is {self.cfg.run.task}: run precompute again")
        differs = {key: (spec.get(key), value) for key, value in label_settings(self.cfg).items() if spec.get(key) != value}
        written = (self.store.get("augmentation") or {}).get("settings")
        if written != pcfg.augment.settings():
            differs["augmentation"] = (written, pcfg.augment.settings())
        # The seed draws the sampled labels and the augmented rows: with either, a store of another seed holds other values.
        seed = self.store.get("provenance", {}).get("seed")
        if (spec.get("num_sampled") or written) and seed != self.cfg.run.seed:
            differs["run.seed"] = (seed, self.cfg.run.seed)
        if differs:
            what = ", ".join(f"{key} {theirs} (config: {ours})" for key, (theirs, ours) in differs.items())
            raise soft_labels.SoftLabelError(f"soft labels at {self.paths.soft_labels} hold other labels: {what}; run precompute again")

    def _store_layout_as_written(self) -> None:
        store = self.store
        rows = [s["rows"] for s in store["shards"]]
        # The layout the workers wrote with (in the provenance): a rerun must find its shards under the same one.
        written = store.get("provenance", {}).get("layout", {})
        group = store.get("row_group_size") or written.get("row_group_size")
        self.layout.store_rows_per_shard = written.get("rows_per_shard") or (max(rows) if rows else None)
        self.layout.origin["precompute.rows_per_shard"] = "as written"
        if group is None:  # a store written before the manifest recorded it: read its footers
            from data_pipeline.streaming import list_blocks

            files = [fsio.join(self.paths.soft_labels, s["file"]) for s in store["shards"]]
            groups = [b.num_rows for b in list_blocks(files, self.storage, rows)]
            self.layout.origin["precompute.row_group_size"] = "as written (from the Parquet footers)"
            self.layout.store_row_group_size = max(groups) if groups else None
        else:
            groups = block_layout.shard_row_groups(rows, group)
            self.layout.origin["precompute.row_group_size"] = "as written"
            self.layout.store_row_group_size = group
        self._check_store_fill(groups, "distill", f"the soft-label store at {self.paths.soft_labels}",
                               "re-run precompute into a fresh store (delete it) so that its row groups are sized for this run")

    def _store_layout_to_write(self) -> None:
        cfg, n = self.cfg, self.num_sequences
        explicit_rows, explicit_group = cfg.precompute.rows_per_shard, cfg.precompute.row_group_size
        self.layout.origin["precompute.rows_per_shard"] = "explicit" if explicit_rows else "derived"
        self.layout.origin["precompute.row_group_size"] = "explicit" if explicit_group else "derived"
        if n is None:  # no dataset yet: decided when the plan is rebuilt after prepare
            for key, value in (("precompute.rows_per_shard", explicit_rows), ("precompute.row_group_size", explicit_group)):
                if value is None:
                    self.layout.origin[key] = "after prepare, from the row count"
            self.layout.store_rows_per_shard, self.layout.store_row_group_size = explicit_rows, explicit_group
            return
        rows_per_shard = explicit_rows or block_layout.choose_store_rows_per_shard(n)
        shard_rows = block_layout.shard_sizes(n, rows_per_shard)
        augmented = round(cfg.precompute.augment.ratio * n)  # augmented rows come in shards of their own
        if augmented and augmentation_in_use(cfg, None) is not None:
            shard_rows = shard_rows + block_layout.shard_sizes(augmented, rows_per_shard)
        group = explicit_group or block_layout.choose_row_group_size(
            shard_rows, cfg.distill.num_virtual_shards, cfg.student.train.batch_size, cfg.run.seed)
        self.layout.store_rows_per_shard, self.layout.store_row_group_size = rows_per_shard, group
        fix = "lower precompute.row_group_size (or remove it: the plan then sizes row groups itself)"
        self._check_store_fill(block_layout.shard_row_groups(shard_rows, group), "precompute",
                               f"precompute.row_group_size={group} over {n:,} sequences", fix)

    def _check_store_fill(self, groups: list[int], stage: str, what: str, fix: str) -> None:
        cfg = self.cfg
        fill = block_layout.batch_fill(groups, cfg.distill.num_virtual_shards, cfg.student.train.batch_size, cfg.run.seed)
        self.layout.fill["distill"] = round(fill.ratio, 3)
        if fill.ratio < block_layout.MIN_FILL:
            self.problem(stage, _fill_message(what, groups, fill, cfg, fix))

    def _student(self, name: str, baseline: bool) -> None:
        cfg, paths = self.cfg, self.paths
        folder = paths.baseline if baseline else paths.student
        reads = {"dataset": paths.data} if baseline else {"store": paths.soft_labels, "teacher": self.teacher_url}
        workers = str(cfg.scaling.num_workers) if cfg.scaling.min_workers is None else f"{cfg.scaling.min_workers}..{cfg.scaling.num_workers} (elastic)"
        teacher_fp = None if baseline or not self.labels_fingerprint else student_source(self.labels_fingerprint, cfg, self.store)
        # The distilled student's fingerprint includes its teacher's: checked against the export there now
        # (a pipeline that trains a new teacher checks again when it re-plans after train-teacher).
        knowable = baseline or self.labels_fingerprint is not None
        action = self._progress(folder, "baseline" if baseline else "student", teacher_fp, check=knowable)
        stage = StagePlan(name, action, reads, folder, workers)
        if knowable:
            stage.fingerprints["stage"] = stage_fingerprint(cfg, "baseline" if baseline else "student", teacher_fp)
        self.stages[name] = stage
        if not self.dataset:
            stage.missing_input = f"no prepared dataset at {paths.data}: run `recdistill prepare` first"
        elif not baseline and self.store is None:
            stage.missing_input = self.store_problem or (
                f"no soft-label store for this run's teacher at {paths.soft_labels}: run `recdistill precompute` first")
        if self.dataset and action == "done":  # a student of an earlier dataset in this run_dir is not this run's
            export = _try(lambda: read_export_meta(folder, self.storage), ExportError) or {}
            trained_on = export.get("dataset_fingerprint")
            if trained_on and trained_on != self.dataset["fingerprint"]:
                self.problem(name, f"{folder} holds a student trained on dataset {trained_on[:12]}…, this run's is "
                                   f"{self.dataset['fingerprint'][:12]}…: delete {folder} and "
                                   f"{fsio.join(cfg.run.run_dir, 'ray', 'baseline' if baseline else 'student')} to train it again")
        if not baseline and cfg.distill.augmented == "use" and augmentation_in_use(cfg, self.store) is None:
            where = (f"the soft-label store at {paths.soft_labels} has no augmented rows" if self.store is not None
                     else "precompute.augment.ratio is 0, so the store will have no augmented rows")
            self.problem(name, f"distill.augmented=use, but {where}: set precompute.augment.ratio > 0 (and run precompute "
                               "again), or distill.augmented=auto")
        for option in ("init_from_teacher", "embedding_hint"):  # both read the teacher's item table from its export
            if not baseline and getattr(cfg.distill, option) and self.teacher and self.teacher["model"].get("item_dims"):
                self.problem(name, f"distill.{option} needs a teacher with a uniform item table (its item_dims is set)")

    def _memory(self) -> None:
        """Each stage's peak memory per worker (cluster.memory_plan); a stage that will run and does not fit is a problem."""
        num_items = self.dataset["num_items"]
        teacher = self.teacher if self.teacher and "params" in self.teacher else None
        for name in ("train-teacher", "precompute", "distill", "distill --baseline"):
            stage = self.stages[name]
            if name == "train-teacher" and stage.action == "given":
                continue
            check = memory_plan.check_stage(self.cfg, name, num_items, self.num_sequences or 0, teacher)
            stage.memory_estimate = check.estimate.summary()
            self.memory[name] = check
            if check.problems and stage.action in ("run", "resume"):
                fixes = ("; settings that would fit: " + "; or ".join(check.fixes)) if check.fixes else (
                    "; no setting tried here fits: use machines with more memory")
                self.problems.append(Problem(name, "the memory plan says it does not fit: " + "; ".join(check.problems) + fixes,
                                             "memory"))

    # ---- helpers

    def _progress(self, folder: str, stage: str, teacher_fp: Optional[str] = None, check: bool = True) -> str:
        """"done", "resume" or "run" from the stage's ``history.json``; a history of other settings is a problem."""
        action, recorded = stage_progress(self.cfg, folder, stage, teacher_fp)
        if check and recorded is not None:
            self.problem(_STAGE_COMMANDS[stage],
                         f"{folder} holds a {stage} trained with other settings (stage fingerprint {recorded}, this config's "
                         f"{stage_fingerprint(self.cfg, stage, teacher_fp)}), and its checkpoints under "
                         f"{fsio.join(self.cfg.run.run_dir, 'ray', stage)} would be resumed. "
                         "Use another run.run_dir, or delete both to train this one from scratch")
        if check and action == "resume":
            self._check_continuable(folder, stage)
        return action

    def _check_continuable(self, folder: str, stage: str) -> None:
        """A finished training asked for more epochs continues from its last checkpoint; without one it would
        start again from epoch 1 and overwrite its export with a worse model: refused."""
        history = fsio.read_json(fsio.join(folder, "history.json"), self.storage)
        checkpoints = fsio.join(self.cfg.run.run_dir, "ray", stage)
        if history.get("complete") and not _exists(fsio.join(checkpoints, "checkpoint_manager_snapshot.json"), self.storage):
            train, ran = _train_asked(self.cfg, stage), len(history.get("history", []))
            if history.get("stopped_early"):
                asked, fix = f"stopped early under patience {history['patience']}; patience {train.patience} is asked", \
                    f"patience {history['patience']}"
            else:
                asked, fix = f"finished {ran} epochs; {train.epochs} are asked", f"{ran} epochs"
            self.problem(_STAGE_COMMANDS[stage],
                         f"{folder} holds a {stage} that {asked} for, but there is no checkpoint under {checkpoints} to "
                         f"continue from (training again would overwrite its export). Ask for {fix}, or delete {folder} to "
                         "train it anew")

    def _num_sequences(self) -> Optional[int]:
        if not self.dataset:
            return None
        train = self.dataset["splits"]["train"]
        if "num_sequences" in train:
            return int(train["num_sequences"])
        # An older manifest: count the training histories of >= 2 items (one column of the split).
        lengths = read_split(self.paths.data, "train", self.storage, self.dataset).column("items").combine_chunks()
        import pyarrow.compute as pc

        return int(pc.sum(pc.greater_equal(pc.list_value_length(lengths), 2)).as_py() or 0)


def stage_progress(cfg: Config, folder: str, stage: str, teacher_fp: Optional[str] = None) -> tuple[str, Optional[str]]:
    """A training stage's progress from its ``history.json``: ("run" | "resume" | "done", the recorded stage
    fingerprint when it is another configuration's, else None). Histories from before fingerprints count as ours."""
    history = _try(lambda: fsio.read_json(fsio.join(folder, "history.json"), cfg.data.storage_options), FileNotFoundError)
    if history is None:
        return "run", None
    recorded = history.get("stage_fingerprint")
    other = recorded if recorded not in (None, stage_fingerprint(cfg, stage, teacher_fp)) else None
    # Epochs are not in the fingerprint (under a constant lr), so that asking for more continues a finished
    # training from its checkpoint: one that ran out of epochs (not stopped early) is done only if it ran as
    # many as asked. (Under a cosine schedule they are: more epochs are another training.)
    # Likewise one stopped early under a smaller patience than is asked now (or when none is: 0), so that the
    # members of a sweep never compare trainings stopped by different rules.
    # Histories from before "stopped_early" (or "patience") was recorded count as done.
    train = _train_asked(cfg, stage)
    stopped, stopped_at = history.get("stopped_early"), history.get("patience")
    more_patience = stopped is True and stopped_at is not None and (train.patience == 0 or train.patience > stopped_at)
    more_asked = (stopped is False or more_patience) and len(history.get("history", [])) < train.epochs
    return ("done" if history.get("complete") and not more_asked else "resume"), other


#: The command that trains each training stage (a plan problem names it).
_STAGE_COMMANDS = {"teacher": "train-teacher", "student": "distill", "baseline": "distill --baseline"}


def _train_asked(cfg: Config, stage: str):
    return (cfg.teacher if stage == "teacher" else cfg.student).train


def training_complete(folder: str, cfg: Config, stage: str, teacher_fingerprint: Optional[str] = None) -> bool:
    """``stage`` finished (early stop or last epoch) with this configuration, not merely exported a best-so-far model."""
    action, other = stage_progress(cfg, folder, stage, teacher_fingerprint)
    return action == "done" and other is None


def _fill_message(what: str, groups: list[int], fill: block_layout.Fill, cfg: Config, fix: str) -> str:
    sizes = [g for g in groups if g]
    return (f"{what}: {len(sizes)} row groups of {min(sizes, default=0)}-{max(sizes, default=0)} rows dealt into "
            f"distill.num_virtual_shards={cfg.distill.num_virtual_shards} give global batches of {fill.mean_batch:.1f} rows "
            f"on average, {100 * fill.ratio:.0f}% of the {fill.best_batch:.1f} possible with student.train.batch_size="
            f"{cfg.student.train.batch_size} (at least {100 * block_layout.MIN_FILL:.0f}% needed). Fix: {fix}")


def _try(read, *errors):
    try:
        return read()
    except errors:
        return None


def _exists(url: str, storage: dict[str, Any]) -> bool:
    try:
        fs, path = fsio.get_fs(url, storage)
        return bool(fs.exists(path))
    except Exception:  # an unreachable store: the prepare stage reports it with its own message
        return True
