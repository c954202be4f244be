"""Small helpers every stage uses: the resolved config on disk (secrets redacted) and where the run's models are."""

from __future__ import annotations

from typing import Any

import yaml

from data_pipeline import fsio
from data_pipeline.layout import RunLayout
from cluster.config import Config


SECRET_WORDS = ("key", "secret", "token", "password", "credential")


def redact(value: Any) -> Any:
    """A copy of nested options with every secret-looking value replaced, for files and logs."""
    if isinstance(value, dict):
        return {k: "***" if any(w in str(k).lower() for w in SECRET_WORDS) else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def save_resolved_config(cfg: Config) -> None:
    """Write the fully resolved config to ``run_dir/config.yaml`` (storage credentials redacted)."""
    tree = cfg.to_dict()
    tree["data"]["storage_options"] = redact(tree["data"]["storage_options"])
    text = yaml.safe_dump(tree, sort_keys=False)
    fsio.atomic_write_bytes(RunLayout(cfg.run.run_dir).config, text.encode(), cfg.data.storage_options)


def teacher_url(cfg: Config) -> str:
    """The run's teacher: ``teacher.checkpoint`` when given (an export trained elsewhere), else this run's own."""
    return cfg.teacher.checkpoint or RunLayout(cfg.run.run_dir).teacher


def model_exports(cfg: Config) -> dict[str, str]:
    """Report name -> export folder of every trained model a run evaluates and reports on."""
    layout = RunLayout(cfg.run.run_dir)
    return {"teacher": teacher_url(cfg), "student_kd": layout.student, "student_baseline": layout.baseline}
