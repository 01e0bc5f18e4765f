"""The report reads a run directory without torch; ``import gradguard`` loads names on use.

Each check runs in a fresh interpreter (``sys.executable``), since this test process has
imported torch long before: the child prints what it found as JSON on its last line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import gradguard as gg


def run_child(code: str) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter; the JSON object it prints last is returned."""
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory written by a real guard, with a non-finite step among ten."""
    path = tmp_path_factory.mktemp("no-torch") / "run"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, optimizer, log_every=5, run_dir=path)
    for step in range(1, 11):
        optimizer.zero_grad(set_to_none=True)
        loss = model(torch.randn(16, 4)).pow(2).mean()
        if step == 7:
            loss = loss * float("nan")
        loss.backward()
        guard.step(loss)
    guard.close()
    assert [event.kind for event in guard.events] == ["nonfinite"]
    return path


def test_write_report_leaves_torch_unimported(run_dir: Path) -> None:
    found = run_child(
        f"""
        import json, sys
        import gradguard.report
        imported = "torch" in sys.modules
        path = gradguard.report.write_report({str(run_dir)!r})
        level, sentence = gradguard.report.run_verdict({str(run_dir)!r})
        print(json.dumps({{"torch_on_import": imported, "torch": "torch" in sys.modules,
                          "path": str(path), "level": level}}))
        """
    )
    assert found["torch_on_import"] is False
    assert found["torch"] is False
    assert found["level"] != "ok"  # the non-finite step was read from events.jsonl
    page = Path(found["path"]).read_text(encoding="utf-8")
    assert "nonfinite" in page


def test_cli_report_leaves_torch_unimported(run_dir: Path) -> None:
    (run_dir / "report.html").unlink(missing_ok=True)
    found = run_child(
        f"""
        import json, sys
        sys.argv = ["gradguard", "report", {str(run_dir)!r}]
        from gradguard.cli import main
        try:
            main()
        except SystemExit as stop:
            status = stop.code
        print(json.dumps({{"status": status, "torch": "torch" in sys.modules}}))
        """
    )
    assert found == {"status": 0, "torch": False}
    assert (run_dir / "report.html").is_file()


def test_import_gradguard_loads_torch_only_when_a_torch_name_is_used() -> None:
    found = run_child(
        """
        import json, sys
        import gradguard
        steps = {"import": "torch" in sys.modules}
        gradguard.__version__, gradguard.GradGuardError, gradguard.Event, gradguard.ConfigError
        steps["torch-free names"] = "torch" in sys.modules
        guard = gradguard.Guard
        steps["Guard"] = "torch" in sys.modules
        print(json.dumps({"steps": steps, "guard": f"{guard.__module__}.{guard.__name__}"}))
        """
    )
    assert found["steps"] == {"import": False, "torch-free names": False, "Guard": True}
    assert found["guard"] == "gradguard.guard.Guard"


def test_every_public_name_is_the_object_its_module_defines() -> None:
    found = run_child(
        """
        import importlib, json, types
        import gradguard
        wrong = []
        for name in gradguard.__all__:
            value = getattr(gradguard, name)
            if name == "init":
                expected = importlib.import_module("gradguard.init")
            elif name == "__version__":
                expected = value if isinstance(value, str) else None
            else:
                expected = getattr(importlib.import_module(value.__module__), name)
            if value is not expected or name not in dir(gradguard):
                wrong.append(name)
        print(json.dumps({"wrong": wrong, "count": len(gradguard.__all__)}))
        """
    )
    assert found == {"wrong": [], "count": len(gg.__all__)}


def test_from_imports_and_submodules_keep_their_meaning() -> None:
    found = run_child(
        """
        import json, types
        import gradguard.lab  # imports the submodule gradguard.diagnose first
        import gradguard as gg
        from gradguard import NormClip, diagnose, init
        print(json.dumps({
            "diagnose": [type(gg.diagnose).__name__, gg.diagnose is diagnose],
            "NormClip": NormClip is gg.NormClip,
            "init": isinstance(init, types.ModuleType) and init is gg.init,
            "detect": gg.detect.__name__,
        }))
        """
    )
    assert found == {
        "diagnose": ["function", True],
        "NormClip": True,
        "init": True,
        "detect": "gradguard.detect",
    }


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        gg.no_such_name  # type: ignore[attr-defined]  # noqa: B018
    assert not hasattr(gg, "__no_such_dunder__")
