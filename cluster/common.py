"""Small helpers every stage uses: the resolved config on disk (secrets redacted) and where the run's models are."""

from __future__ import annotations

import signal
import subprocess
import threading
from importlib import metadata
from pathlib import Path

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


def code_version() -> dict[str, str]:
    """The code that produced a result: the git commit of this checkout when there is one (a
    ``ray job submit`` working dir may have none), and the installed package version."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    try:
        version = metadata.version("recdistill")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {"commit": commit or "unknown", "version": version}


def restore_interrupt() -> None:
    """Let SIGINT interrupt this process even when it started with SIGINT ignored.

    A job a non-interactive shell starts in the background (``nohup recdistill ... &``) inherits
    SIGINT ignored, and Python then never raises KeyboardInterrupt: ``kill -INT`` would not reach
    the interrupt path (checkpoints kept, one line, exit 130), and a sweep, whose members train on
    other threads, could only be killed. Called first by the command-line entry points.
    """
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
