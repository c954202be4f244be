"""The plan's checks of what a run reads (the dataset against the config, the catalog, model sizes)
and its problem types; :mod:`cluster.plan` composes them into the run plan."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from cluster.config import Config, ConfigError
from data_pipeline.dataset import damaged_files, dataset_settings, settings_differ
from data_pipeline.layout import RunLayout
from distill.config import ModelConfig
from distill.sizing import count_parameters


class PlanError(ConfigError):
    """A plan that cannot work; the message lists every problem, stage by stage."""

    def __init__(self, problems: list["Problem"]):
        self.problems = problems
        by_message: dict[str, list[str]] = {}  # one line per problem, naming every stage it stops
        for p in problems:
            by_message.setdefault(p.message, []).append(p.stage)
        lines = [f"[{', '.join(stages)}] {message}" for message, stages in by_message.items()]
        super().__init__("the run cannot work as configured:\n  " + "\n  ".join(lines))


@dataclass(frozen=True)
class Problem:
    stage: str
    message: str
    kind: str = "config"  # or "memory": a fact of the machines at launch, not of the data (prepare ignores it)


def dataset_problems(cfg: Config, dataset: dict[str, Any], storage: dict[str, Any]) -> list[Problem]:
    """The prepared dataset against the config and its own manifest.

    Made from other data settings (path, format, columns, filters): not this run's, since every
    stage after it would silently train and report on the old data. A file missing or of
    another size than recorded: damaged, refused for every stage that reads it.
    """
    problems, data_url = [], RunLayout(cfg.run.run_dir).data
    prepared_for = dataset.get("task", "next_item")
    if prepared_for != cfg.run.task:
        problems.append(Problem("prepare", f"{data_url} was prepared for the {prepared_for} task and this run's run.task is "
                                           f"{cfg.run.task}: every stage after it reads that task's examples. Use another "
                                           "run.run_dir for this task"))
    wanted = dataset_settings(cfg.data, cfg.run.seed, cfg.run.task)
    recorded = dataset.get("settings") or _legacy_settings(dataset, wanted)
    differs = {key: values for key, values in settings_differ(recorded, wanted).items() if key != "task"}  # said above
    if differs:
        what = "; ".join(f"data.{key}: prepared from {theirs!r}, config says {ours!r}" for key, (theirs, ours) in differs.items())
        problems.append(Problem("prepare", f"{data_url} was prepared with other data settings ({what}), and every stage "
                                           f"after it learnt from that data. Use another run.run_dir, or delete "
                                           f"{cfg.run.run_dir} to start this run afresh"))
    damaged = damaged_files(data_url, dataset, storage)
    if damaged:
        shown = "; ".join(damaged[:5]) + (f"; and {len(damaged) - 5} more" if len(damaged) > 5 else "")
        for stage in ("train-teacher", "precompute", "distill --baseline", "evaluate"):
            problems.append(Problem(stage, f"the prepared dataset is damaged: {shown}. Delete {data_url} and run prepare "
                                           "again (the stages after it are kept only if the new data is identical)"))
    return problems



def catalog_problems(cfg: Config, num_items: int) -> list[Problem]:
    """What cannot work with a catalog of ``num_items`` items (checked by prepare before it writes anything)."""
    problems = []
    if cfg.precompute.k > num_items and cfg.run.task == "next_item":  # a rating store keeps every level instead
        problems.append(Problem("precompute", f"precompute.k={cfg.precompute.k} is larger than the catalog ({num_items} items)"))
    for k in cfg.eval.ks if cfg.run.task == "next_item" else []:  # ranking cut-offs
        if k > num_items:  # validation (train-teacher, distill) and the test report use them
            for stage in ("train-teacher", "distill", "distill --baseline", "evaluate"):
                problems.append(Problem(stage, f"eval.ks contains {k}, larger than the catalog ({num_items} items)"))
    return problems


# The options of one KD loss each: set for another loss they would do nothing.
LOSS_OPTIONS = {"ranking": ("ranking_top",), "dkd": ("dkd_target_weight", "dkd_nontarget_weight"), "kl_bands": ("band_weight",)}


def task_problems(cfg: Config) -> list[Problem]:
    """Settings the run has no use for, refused rather than ignored: a KD loss's options under another loss, and
    for the rating task (``run.task=rating``) next-item settings: its store keeps the teacher's whole distribution
    over the few rating levels (no top-k, no sampled labels) and its loss is the temperature KL of those
    distributions mixed with the cross-entropy."""
    fields = type(cfg.distill).model_fields
    problems = [Problem("distill", f"distill.{name} applies to distill.loss={loss} only (this run's is {cfg.distill.loss}): "
                                   f"remove it, or set distill.loss={loss}")
                for loss, names in LOSS_OPTIONS.items() if loss != cfg.distill.loss
                for name in names if getattr(cfg.distill, name) != fields[name].default]
    if cfg.run.task != "rating":
        return problems
    if cfg.precompute.num_sampled:
        problems.append(Problem("precompute", "precompute.num_sampled has no use for run.task=rating (the store keeps the "
                                              "whole rating distribution); set it to 0"))
    if cfg.distill.loss != type(cfg.distill).model_fields["loss"].default:  # the default stands for "the task's own"
        problems.append(Problem("distill", f"distill.loss={cfg.distill.loss} is a next-item loss; run.task=rating distils "
                                           "by temperature KL of the rating distributions mixed with CE (distill.alpha, "
                                           "distill.temperature): remove distill.loss"))
    if cfg.distill.embedding_hint:
        problems.append(Problem("distill", "distill.embedding_hint is built for the next-item task; run.task=rating "
                                           "distils the rating distributions only: set it to 0"))
    return problems


def size_warnings(cfg: Config, num_items: int, teacher: Optional[dict[str, Any]]) -> list[Problem]:
    """A student at least as large as its teacher saves no serving cost: worth a word before training it."""
    teacher_params = (teacher or {}).get("params") or count_parameters(
        ModelConfig.model_validate(teacher["model"]) if teacher else cfg.teacher.model, num_items)
    student = count_parameters(cfg.student.model, num_items)
    if student < teacher_params:
        return []
    return [Problem("distill", f"the student ({student:,} parameters) is at least as large as its teacher "
                               f"({teacher_params:,}): distilling saves no serving cost. Shrink student.model")]


def _legacy_settings(manifest: dict[str, Any], wanted: dict[str, Any]) -> dict[str, Any]:
    """What a manifest written before settings were recorded says: its source, format and filters
    (the settings it does not record are taken to match)."""
    recorded = dict(wanted)
    recorded["format"] = manifest.get("format", wanted["format"])
    if "path" in wanted and manifest.get("source") not in (None, "synthetic"):
        recorded["path"] = manifest["source"]
    for key in ("min_user_interactions", "min_item_interactions", "min_rating"):
        if key in wanted and key in manifest.get("filters", {}):
            recorded[key] = manifest["filters"][key]
    if wanted["format"] == "synthetic" and "synthetic" in manifest:
        recorded.update(synthetic=manifest["synthetic"], seed=manifest.get("seed"))
    return recorded


def ensemble_members(cfg: Config, teacher: Optional[dict[str, Any]], dataset: Optional[dict[str, Any]],
                     storage: dict[str, Any]) -> tuple[list[dict[str, Any]], list[Problem]]:
    """The export metadata of ``teacher.ensemble``'s members, and what keeps them from labelling with
    the run's teacher: a missing export, another catalog or dataset, another window (``max_len``)."""
    from data_pipeline.exports import ExportError, read_export_meta

    metas, problems = [], []
    for url in cfg.teacher.ensemble:
        try:
            meta = read_export_meta(url, storage)
        except ExportError as exc:
            problems.append(Problem("precompute", f"teacher.ensemble: {exc}"))
            continue
        metas.append(meta)
        if dataset and (meta["num_items"] != dataset["num_items"]
                        or meta.get("dataset_fingerprint") not in (None, dataset["fingerprint"])):
            problems.append(Problem("precompute", f"teacher.ensemble: the model at {url} was trained on another dataset "
                                                  f"({meta['num_items']} items, dataset {str(meta.get('dataset_fingerprint'))[:12]}…)"))
        if dataset and meta.get("rating_values") != dataset.get("rating_values"):
            problems.append(Problem("precompute", f"teacher.ensemble: the model at {url} is a "
                                                  f"{'rating' if meta.get('rating_values') else 'next-item'} model, the "
                                                  f"dataset is prepared for the {dataset.get('task', 'next_item')} task"))
        if teacher and meta["model"]["max_len"] != teacher["model"]["max_len"]:
            problems.append(Problem("precompute", f"teacher.ensemble: the model at {url} reads {meta['model']['max_len']} items "
                                                  f"of history, the run's teacher {teacher['model']['max_len']}: an ensemble "
                                                  "labels the same positions, so its members need the same max_len"))
    return metas, problems


def offload_problems(cfg: Config) -> list[Problem]:
    """NVMe offload needs a local folder and DeepSpeed's async I/O op (libaio), checked before any worker starts."""
    ds = cfg.deepspeed
    if "nvme" not in (ds.offload_optimizer, ds.offload_params):
        return []
    if "://" in ds.nvme_path:
        return [Problem("train-teacher", f"deepspeed.nvme_path={ds.nvme_path} must be a local folder (on each node's own disk)")]
    from deepspeed.ops.op_builder import AsyncIOBuilder  # the builder of this machine's accelerator

    if not AsyncIOBuilder().is_compatible(verbose=False):
        return [Problem("train-teacher", "deepspeed.offload_*=nvme needs DeepSpeed's async I/O op, which needs libaio: "
                                         "install libaio-dev (`apt-get install libaio-dev`, as `make setup` does), "
                                         "or offload to cpu")]
    return []
