"""``recdistill sweep``: a family of students from one soft-label store, and the frontier they draw.

The store is computed once; students are cheap. The members are every size in
``sweep.fractions`` (of the teacher's parameters: the widest model like ``student.model``
that fits, :func:`distill.sizing.fit_to_budget`) times every seed in ``sweep.seeds``, each
distilled and (``sweep.twins``) its twin trained without the teacher. Each member is the
student recipe (:mod:`cluster.distill`'s worker loop) as its own Ray Train run, writing
``run_dir/sweep/<member>/``. Levers (``sweep.variants``: named overrides of ``distill.*`` /
``student.train.*``) add one distilled member per size, seed and variant, all compared with
the same twin; ``sweep.with_augmented`` adds members trained on the store's augmented rows.
``sweep.schedules`` (named overrides of ``student.train.*``) trains every member, twins too, under
each schedule as well; the frontier keeps each member's and each twin's best on validation.
``sweep.concurrent`` of them run at once, several
``TorchTrainer`` s under this one driver, each with its own workers.

A member is finished when its ``history.json`` says complete under its own stage
fingerprint; a rerun (after a crash or a kill of this driver) trains only the others, each
resuming its own checkpoints. Then :mod:`cluster.frontier` scores them all on the test split.
"""

from __future__ import annotations

import logging
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Optional

from cluster import frontier
from cluster.common import save_resolved_config
from cluster.config import Config, ConfigError, build_config
from cluster.plan import RunPlan, build_plan, training_complete
from cluster.student_batches import augmentation_in_use, student_source
from data_pipeline import fsio
from data_pipeline.layout import RunLayout
from distill.config import ModelConfig
from distill.sizing import count_parameters, fit_to_budget

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Member:
    name: str  # e.g. "1in10-s0-kd"; "-kdaug" when trained on teacher-labelled augmented rows too
    fraction: float  # of the teacher's parameters
    seed: int
    baseline: bool  # the twin: the same student without the teacher
    model: ModelConfig
    params: int
    augmented: bool = False  # distilled on the store's augmented rows too
    variant: str = ""  # a name in sweep.variants: its overrides apply to this (distilled) member
    schedule: str = ""  # a name in sweep.schedules: its student.train overrides apply to this member, twin or not

    @property
    def twin_name(self) -> str:
        """The twin's name before its schedule is chosen (the frontier picks it on validation)."""
        return f"{size_label(self.fraction)}-s{self.seed}-twin"

    @property
    def choice(self) -> str:
        """The member's name without its schedule: members that differ only by schedule compete on validation."""
        return self.name.split(SCHEDULE_MARK)[0]


SCHEDULE_MARK = "--"  # "1in10-s0-kd--lr2": the member 1in10-s0-kd under the schedule lr2 (names have no "--" otherwise)


def size_label(fraction: float) -> str:
    """0.1 -> "1in10"; a fraction that is not 1/n keeps its digits (0.3 -> "0.3")."""
    inverse = Fraction(fraction).limit_denominator(1000)
    return f"1in{inverse.denominator}" if inverse.numerator == 1 else f"{fraction:g}"


def plan_members(cfg: Config, plan: RunPlan) -> list[Member]:
    """Every member of the sweep, sized against the teacher; a size no model fits is a ConfigError."""
    num_items = plan.dataset["num_items"]
    teacher = plan.teacher.get("params") or count_parameters(ModelConfig.model_validate(plan.teacher["model"]), num_items)
    if cfg.sweep.with_augmented and not (plan.store or {}).get("augmentation"):
        raise ConfigError(f"sweep.with_augmented: the soft-label store at {RunLayout(cfg.run.run_dir).soft_labels} has no "
                          "augmented rows; set precompute.augment.ratio > 0 and run precompute again")
    # Without with_augmented, the distilled members train as distill.augmented says (and are "-kdaug" when that
    # includes augmented rows); with it, each size and seed gets both.
    if cfg.sweep.with_augmented:
        kinds = [(False, False), (False, True)]
    else:
        kinds = [(False, augmentation_in_use(cfg, plan.store) is not None)]
    if cfg.sweep.twins:
        kinds.append((True, False))
    members = []
    for fraction in cfg.sweep.fractions:
        try:
            model = fit_to_budget(cfg.student.model, num_items, int(fraction * teacher))
        except ValueError as exc:
            raise ConfigError(f"sweep.fractions: {fraction:g} of the teacher's {teacher:,} parameters: {exc}") from None
        params = count_parameters(model, num_items)
        for seed in cfg.sweep.seeds:
            group = []
            for order, schedule in enumerate(["", *cfg.sweep.schedules]):
                for baseline, augmented in kinds:
                    kind = "twin" if baseline else "kdaug" if augmented else "kd"
                    for variant in ([""] if baseline else ["", *cfg.sweep.variants]):
                        name = (f"{size_label(fraction)}-s{seed}-{kind}" + (f"-{variant}" if variant else "")
                                + (f"{SCHEDULE_MARK}{schedule}" if schedule else ""))
                        group.append((order, Member(name, fraction, seed, baseline, model, params, augmented, variant, schedule)))
            # The first distilled member and its twin train first, then the others, then each schedule's in turn:
            # a sweep cut short has its comparison.
            members += [m for _, m in sorted(group, key=lambda om: (om[0], 0 if om[1] is group[0][1] or om[1].baseline else 1))]
    named: dict[str, Member] = {}
    for member in members:
        if member.name in named:  # one folder and one Ray run for two members: refused before anything trains
            raise ConfigError(f"sweep: two members would be named {member.name} (fractions {named[member.name].fraction:g} and "
                              f"{member.fraction:g}, seeds {cfg.sweep.seeds}): list each size and seed once")
        named[member.name] = member
        member_config(cfg, member)  # every variant's overrides are valid before anything trains
    return members


def member_config(cfg: Config, member: Member) -> Config:
    """The run's config as this member trains it: its model, its seed, its workers."""
    tree = cfg.to_dict()
    tree["student"]["model"] = member.model.model_dump(mode="json")
    tree["run"]["seed"] = member.seed
    tree["scaling"].update(num_workers=cfg.sweep.workers_per_member, min_workers=None)
    if not member.baseline:
        tree["distill"]["augmented"] = "use" if member.augmented else "skip"
    overrides = cfg.sweep.variants.get(member.variant, []) + cfg.sweep.schedules.get(member.schedule, [])
    try:
        return build_config(tree, overrides)
    except ConfigError as exc:
        where = " and ".join(f"sweep.{section}.{name}" for section, name in (("variants", member.variant), ("schedules", member.schedule)) if name)
        raise ConfigError(f"{where}: {exc}") from None


def member_folder(cfg: Config, member: Member) -> str:
    return fsio.join(RunLayout(cfg.run.run_dir).sweep, member.name)


def finished(cfg: Config, plan: RunPlan, member: Member) -> bool:
    mcfg = member_config(cfg, member)
    teacher_fp = None if member.baseline else student_source(plan.store["teacher_fingerprint"], mcfg, plan.store)
    return training_complete(member_folder(cfg, member), mcfg,
                             "baseline" if member.baseline else "student", teacher_fp)


def _train(cfg: Config, plan: RunPlan, member: Member) -> None:
    from ray.train.torch import TorchTrainer

    from cluster.distill import student_train_loop
    from cluster.ray_setup import fit, run_config, scaling_config, torch_config

    mcfg = member_config(cfg, member)
    trainer = TorchTrainer(
        student_train_loop,
        train_loop_config={"config": mcfg.to_dict(), "baseline": member.baseline, "teacher_url": plan.teacher_url,
                           "soft_manifest": None if member.baseline else plan.store, "out_url": member_folder(cfg, member)},
        scaling_config=scaling_config(mcfg),
        torch_config=torch_config(mcfg),
        run_config=run_config(mcfg, name=f"sweep-{member.name}"),
    )
    fit(trainer, lambda: finished(cfg, plan, member), mcfg, f"sweep-{member.name}")
    print(f"sweep: {member.name} finished", flush=True)


def run(cfg: Config, plan: Optional[RunPlan] = None) -> dict[str, Any]:
    from cluster.ray_setup import Interrupted, ensure_ray, require_resources

    plan = plan or build_plan(cfg)
    plan.require("distill")  # the store, its teacher and the dataset
    members = plan_members(cfg, plan)
    save_resolved_config(cfg)
    todo = [m for m in members if not finished(cfg, plan, m)]
    print(f"sweep: {len(members)} members ({len(members) - len(todo)} already finished), {cfg.sweep.concurrent} at a time, "
          f"{cfg.sweep.workers_per_member} worker(s) each -> {RunLayout(cfg.run.run_dir).sweep}")
    width = max(len(m.name) for m in members)
    for m in members:
        state = "to train" if m in todo else "finished"
        print(f"  {m.name:<{width}} {m.params:>12,} parameters  d_model {m.model.d_model:<5} {state}")
    if todo:
        ensure_ray(cfg)
        require_resources(member_config(cfg, todo[0]))
        pool = ThreadPoolExecutor(max_workers=cfg.sweep.concurrent, thread_name_prefix="sweep-member")
        futures = [pool.submit(_train, cfg, plan, m) for m in todo]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for future in done:
                future.result()  # the first failure, if any, ends the sweep (finished members are kept)
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            # The members' fits run on pool threads, which Ctrl-C does not reach: without this they train on
            # (and the interpreter waits for them at exit). Their last checkpoints are kept for the rerun.
            import ray

            ray.shutdown()
            raise Interrupted("interrupted; every finished member is kept, and a rerun trains only the others") from None
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
    result = frontier.write(cfg, plan, [(m, member_folder(cfg, m)) for m in members])
    print(frontier.format_table(result))
    return result
