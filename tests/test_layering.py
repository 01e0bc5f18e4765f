"""Imports point downstream (DESIGN.md): checked by reading each module's imports."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "gradguard"

# module -> gradguard modules it must never import
UPSTREAM_OF_GUARD = {"guard", "lab", "cli", "bench", "integrations"}
FORBIDDEN = {
    "errors": {"stats", "clip", "records", "detect", "sinks"} | UPSTREAM_OF_GUARD,
    "causes": {"stats", "clip", "records", "detect", "sinks", "errors"} | UPSTREAM_OF_GUARD,
    "_foreach": {"stats", "clip", "records", "detect", "sinks"} | UPSTREAM_OF_GUARD,
    "stats": {"clip", "records", "detect", "sinks"} | UPSTREAM_OF_GUARD,
    "clip": {"records", "detect", "sinks"} | UPSTREAM_OF_GUARD,
    "records": {"stats", "clip", "detect", "sinks"} | UPSTREAM_OF_GUARD,
    "detect": {"stats", "clip", "sinks", "_foreach"} | UPSTREAM_OF_GUARD,
    "sinks": {"stats", "clip", "detect", "_foreach"} | UPSTREAM_OF_GUARD,
    "trackers": {"stats", "clip", "detect", "_foreach", "recover"} | UPSTREAM_OF_GUARD,
    "recover": {"stats", "clip", "detect", "sinks", "_foreach"} | UPSTREAM_OF_GUARD,
    # Diagnosis and initialization run before training: they read stats, never the step loop.
    "diagnose": {"clip", "records", "detect", "recover", "sinks"} | UPSTREAM_OF_GUARD,
    "init": {"stats", "clip", "records", "detect", "recover", "sinks", "diagnose", "_jacobian"}
    | UPSTREAM_OF_GUARD,
    "_jacobian": {"stats", "clip", "records", "detect", "recover", "sinks", "diagnose", "init"}
    | UPSTREAM_OF_GUARD,
}


def gradguard_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gradguard"):
            parts = node.module.split(".")
            if len(parts) > 1:
                found.add(parts[1])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "gradguard" and len(parts) > 1:
                    found.add(parts[1])
    return found


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_imports_point_downstream(module: str) -> None:
    imported = gradguard_imports(SRC / f"{module}.py")
    assert not imported & FORBIDDEN[module], f"{module} imports {imported & FORBIDDEN[module]}"


def test_core_needs_only_torch_and_numpy() -> None:
    allowed_third_party = {"torch", "numpy"}
    for module in ("errors", "_foreach", "stats", "clip", "records", "detect", "sinks", "guard"):
        tree = ast.parse((SRC / f"{module}.py").read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module.split(".")[0]]
            for name in names:
                if name in sys.stdlib_module_names or name in ("gradguard", "__future__"):
                    continue
                assert name in allowed_third_party, f"{module} imports {name}"
