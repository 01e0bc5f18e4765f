"""The console script: version, help, lab and bench wiring."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

import gradguard
from gradguard.cli import app

runner = CliRunner()


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"gradguard {gradguard.__version__}"


def test_help_lists_the_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("lab", "bench"):
        assert command in result.output


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("gradguard")
    completed = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, check=True, timeout=120
    )
    assert completed.stdout.startswith("gradguard ")


def test_lab_list_names_the_first_experiment() -> None:
    result = runner.invoke(app, ["lab", "--list"])
    assert result.exit_code == 0
    assert "depth-activation" in result.output


def test_lab_unknown_experiment_is_a_clear_error() -> None:
    result = runner.invoke(app, ["lab", "no-such-experiment"])
    assert result.exit_code == 2
    assert "no-such-experiment" in result.output
    assert "depth-activation" in result.output


def test_lab_quick_writes_a_run_directory(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["lab", "--quick", "--out", str(out), "depth-activation"])
    assert result.exit_code == 0, result.output
    assert "depth-activation" in result.output
    data = json.loads((out / "results.json").read_text())
    assert data["quick"] is True
    assert (out / "results.md").is_file()
