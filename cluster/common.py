"""Small helpers every stage uses: the resolved config on disk (secrets redacted) and where the run's models are."""

from __future__ import annotations

import yaml

from data_pipeline import fsio
from data_pipeline.credentials import redact
from data_pipeline.layout import RunLayout
from cluster.config import Config


def save_resolved_config(cfg: Config) -> None:
    """Write the fully resolved config to ``run_dir/config.yaml``, every credential redacted
    (storage options, and any URL in the config that carries a user:password or a signature)."""
    tree = redact(cfg.to_dict())
    text = yaml.safe_dump(tree, sort_keys=False)
    fsio.atomic_write_bytes(RunLayout(cfg.run.run_dir).config, text.encode(), cfg.data.storage_options)


def teacher_url(cfg: Config) -> str:
    """The run's teacher: ``teacher.checkpoint`` when given (an export trained elsewhere), else this run's own."""
    return cfg.teacher.checkpoint or RunLayout(cfg.run.run_dir).teacher


def model_exports(cfg: Config) -> dict[str, str]:
    """Report name -> export folder of every trained model a run evaluates and reports on."""
    layout = RunLayout(cfg.run.run_dir)
    return {"teacher": teacher_url(cfg), "student_kd": layout.student, "student_baseline": layout.baseline}
