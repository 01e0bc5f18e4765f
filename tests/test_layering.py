"""Imports point downstream (DESIGN.md): checked by reading each module's imports."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "gradguard"

# module -> gradguard modules it must never import
UPSTREAM_OF_GUARD = {"guard", "lab", "cli", "integrations"}
FORBIDDEN = {
    "errors": {"stats", "clip", "records", "detect", "sinks"} | UPSTREAM_OF_GUARD,
    "causes": {"stats", "clip", "records", "detect", "sinks", "errors"} | UPSTREAM_OF_GUARD,
    "_foreach": {"stats", "clip", "records", "detect", "sinks"} | UPSTREAM_OF_GUARD,
    # Reprs from the constructor's arguments: used by policies, detectors and recovery.
    "_repr": {"stats", "clip", "records", "detect", "sinks", "recover", "_foreach"}
    | UPSTREAM_OF_GUARD,
    # The flat gradient buffer: below stats (stats finds it), beside _foreach.
    "_flat": {"stats", "clip", "records", "detect", "sinks"} | UPSTREAM_OF_GUARD,
    # The clip policies' argument checks and device state: below clip, beside _foreach.
    "_clip_state": {"stats", "clip", "records", "detect", "sinks", "_foreach"} | UPSTREAM_OF_GUARD,
    "stats": {"clip", "records", "detect", "sinks"} | UPSTREAM_OF_GUARD,
    "clip": {"records", "detect", "sinks"} | UPSTREAM_OF_GUARD,
    # Shape-batched norms: below the policies, beside _foreach. AGC: a policy clip exports.
    "_batched": {"stats", "clip", "records", "detect", "sinks"} | UPSTREAM_OF_GUARD,
    "_agc": {"clip", "records", "detect", "sinks"} | UPSTREAM_OF_GUARD,
    # ValueClip's CPU path: below the policies and the statistics, beside _foreach.
    "_value_clip": {"stats", "clip", "records", "detect", "sinks"} | UPSTREAM_OF_GUARD,
    # Builds the flat buffer from the layout: above stats, below the policies and the guard.
    "_flatten": {"clip", "records", "detect", "sinks"} | UPSTREAM_OF_GUARD,
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
    # Which activation follows a layer: read by init and diagnose, so it imports neither.
    "_activations": {"stats", "clip", "records", "detect", "recover", "sinks", "diagnose"}
    | {"init", "_jacobian"}
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


def module_files(module: str) -> list[Path]:
    """The module's file, or every file of the package of that name (``diagnose/``)."""
    package = SRC / module
    return sorted(package.rglob("*.py")) if package.is_dir() else [SRC / f"{module}.py"]


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_imports_point_downstream(module: str) -> None:
    for path in module_files(module):
        imported = gradguard_imports(path)
        where = path.relative_to(SRC)
        assert not imported & FORBIDDEN[module], f"{where} imports {imported & FORBIDDEN[module]}"


def test_packages_are_checked_file_by_file() -> None:
    files = {path.relative_to(SRC).as_posix() for path in module_files("diagnose")}
    assert {"diagnose/__init__.py", "diagnose/measure.py", "diagnose/verdict.py"} <= files


def _is_type_checking(test: ast.expr) -> bool:
    """``TYPE_CHECKING`` or ``typing.TYPE_CHECKING``: a block type checkers alone run."""
    if isinstance(test, ast.Attribute):
        return test.attr == "TYPE_CHECKING"
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"


def runtime_imports(path: Path) -> set[str]:
    """Modules ``path`` imports when it runs (in functions too), outside ``if TYPE_CHECKING:``."""
    found: set[str] = set()
    stack: list[ast.AST] = [ast.parse(path.read_text())]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        stack.extend(ast.iter_child_nodes(node))
    return found


# Read by the report, which reads run directories only (DESIGN.md): no torch at run time.
TORCH_FREE = sorted(
    ["records.py", "causes.py", "_files.py", "errors.py"]
    + [f"report/{p.name}" for p in (SRC / "report").glob("*.py")]
)


@pytest.mark.parametrize("module", TORCH_FREE)
def test_report_side_never_imports_torch(module: str) -> None:
    torch = {name for name in runtime_imports(SRC / module) if name.split(".")[0] == "torch"}
    assert not torch, f"{module} imports {torch} at run time: import it under TYPE_CHECKING"


def test_report_reaches_only_torch_free_modules() -> None:
    """Every gradguard module the report imports at run time, transitively, is checked."""
    seen: set[str] = set()
    todo = [f"report/{p.name}" for p in (SRC / "report").glob("*.py")]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        for name in runtime_imports(SRC / module):
            parts = name.split(".")
            if parts[0] != "gradguard" or len(parts) == 1:
                continue
            path = "/".join(parts[1:])
            for candidate in (f"{path}.py", f"{path}/__init__.py", "/".join(parts[1:-1]) + ".py"):
                if (SRC / candidate).is_file():
                    todo.append(candidate)
                    break
    assert seen <= set(TORCH_FREE), f"the report imports {sorted(seen - set(TORCH_FREE))}"


def test_core_needs_only_torch_and_numpy() -> None:
    allowed_third_party = {"torch", "numpy"}
    for module in ("errors", "_foreach", "stats", "clip", "records", "detect", "sinks", "guard"):
        trees = [ast.parse(path.read_text()) for path in module_files(module)]
        for node in (n for tree in trees for n in ast.walk(tree)):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module.split(".")[0]]
            for name in names:
                if name in sys.stdlib_module_names or name in ("gradguard", "__future__"):
                    continue
                assert name in allowed_third_party, f"{module} imports {name}"


# The guard's parts: downstream of the guard (they never import it at run time, only its
# type under TYPE_CHECKING), and each only what its role needs.
GUARD_PARTS = {
    "protocols": {"stats", "clip", "records", "detect", "sinks", "recover", "errors"},
    "_amp": {"stats", "clip", "records", "detect", "sinks", "recover"},
    "_ring": {"clip", "detect", "sinks", "recover"},
    "_stepping": {"detect", "sinks", "recover"},
    "_checks": {"sinks", "recover"},
    "_accumulate": {"stats", "clip", "records", "detect", "sinks", "recover"},
    "_ownership": {"stats", "clip", "records", "detect", "sinks", "recover"},
    "_meta": {"stats", "clip", "records", "detect", "sinks", "recover"},
    "_compile": {"stats", "clip", "records", "detect", "sinks", "recover", "errors"},
    "_guarded_optimizer": {"stats", "clip", "records", "detect", "sinks", "recover"},
    "_run_facts": {"detect", "sinks", "recover"},
    "_updates": {"clip", "records", "detect", "sinks", "recover"},
    # helpers below everything: files written atomically, process-group plumbing
    "_files": {"stats", "clip", "records", "detect", "sinks", "recover", "errors"},
    "_distributed": {"stats", "clip", "records", "detect", "sinks", "recover"},
}


@pytest.mark.parametrize("module", sorted(GUARD_PARTS))
def test_guard_parts_point_downstream(module: str) -> None:
    imported = {
        name.split(".")[1]
        for name in runtime_imports(SRC / f"{module}.py")
        if name.startswith("gradguard.")
    }
    forbidden = GUARD_PARTS[module] | UPSTREAM_OF_GUARD
    assert not imported & forbidden, f"{module} imports {imported & forbidden} at run time"


def test_every_module_of_the_core_is_checked() -> None:
    checked = set(FORBIDDEN) | set(GUARD_PARTS) | {"guard", "__init__", "trackers"}
    core = {p.stem for p in SRC.glob("*.py")}
    unchecked = core - checked - {"cli", "explain"}  # cli is the top; explain: next to guard
    assert not unchecked, f"no layering rule for {sorted(unchecked)}"
