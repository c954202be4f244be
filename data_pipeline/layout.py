"""Where each stage reads and writes under one ``run_dir`` (any fsspec URL).

These names are a public contract: scripts and later stages depend on them.
"""

from __future__ import annotations

from dataclasses import dataclass

from data_pipeline.fsio import join as join_url


@dataclass(frozen=True)
class RunLayout:
    run_dir: str

    @property
    def data(self) -> str:
        return join_url(self.run_dir, "data")

    @property
    def teacher(self) -> str:
        return join_url(self.run_dir, "teacher")

    @property
    def soft_labels(self) -> str:
        return join_url(self.run_dir, "soft_labels")

    @property
    def student(self) -> str:
        return join_url(self.run_dir, "student")

    @property
    def baseline(self) -> str:
        return join_url(self.run_dir, "baseline")

    @property
    def sweep(self) -> str:
        return join_url(self.run_dir, "sweep")

    @property
    def report(self) -> str:
        return join_url(self.run_dir, "report")

    @property
    def config(self) -> str:
        return join_url(self.run_dir, "config.yaml")

    @property
    def metrics(self) -> str:
        return join_url(self.report, "metrics.json")
