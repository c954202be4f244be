"""The project's map, enforced: which package may import which, and no module over 500 lines.

``cluster/`` (recipes, plan, engine wiring) may import both component packages; ``distill/``
(math) and ``data_pipeline/`` (data) import neither each other, nor ``cluster``, nor Ray or
DeepSpeed, anywhere in a module (top level or inside functions).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "distill": {"ray", "deepspeed", "cluster", "data_pipeline", "bench"},
    "data_pipeline": {"ray", "deepspeed", "cluster", "distill", "bench"},
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_component_packages_import_no_engine_and_not_each_other(package):
    bad = {str(p.relative_to(ROOT)): sorted(_imports(p) & FORBIDDEN[package]) for p in sorted((ROOT / package).rglob("*.py"))}
    assert {k: v for k, v in bad.items() if v} == {}


def test_no_module_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py")
            if not any(part.startswith(".") or part in ("build", "runs") for part in p.relative_to(ROOT).parts)
            and (n := len(p.read_text().splitlines())) > 500}
    assert long == {}
