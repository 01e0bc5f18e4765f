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


def test_lab_only_selects_experiments_in_order(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["lab", "--quick", "--out", str(out), "--only", "selu", "--only", "depth-activation"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert [e["name"] for e in data["experiments"]] == ["selu", "depth-activation"]


def test_lab_seeds_sets_how_many_seeds_the_full_variants_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["lab", "--only", "depth-activation", "--seed", "3", "--seeds", "2", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert data["quick"] is False
    assert [e["seeds"] for e in data["experiments"]] == [[3, 4]]  # its own default is 5


def test_lab_seeds_rejects_quick_and_counts_below_one(tmp_path: Path) -> None:
    quick = runner.invoke(app, ["lab", "--quick", "--seeds", "2", "--out", str(tmp_path / "a")])
    assert quick.exit_code == 2
    assert "quick variants run one seed" in quick.output
    zero = runner.invoke(app, ["lab", "--seeds", "0", "--out", str(tmp_path / "b")])
    assert zero.exit_code == 2
    assert "seeds must be an int >= 1, got 0" in zero.output
    assert not (tmp_path / "a").exists()
    assert not (tmp_path / "b").exists()


def test_report_writes_html_for_a_guarded_run(tmp_path: Path) -> None:
    import torch

    import gradguard as gg

    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gg.Guard(model, optimizer, log_every=5, run_dir=tmp_path / "run") as guard:
        for _ in range(10):
            optimizer.zero_grad()
            loss = model(torch.randn(4, 3)).pow(2).mean()
            loss.backward()
            guard.step(loss)
    result = runner.invoke(app, ["report", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    html = (tmp_path / "run" / "report.html").read_text()
    assert html.lstrip().lower().startswith("<!doctype html")


def test_report_on_a_directory_that_is_no_run_is_a_usage_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "is not a run directory" in " ".join(result.output.split())


def test_bench_detection_runs_the_chosen_scenarios_and_writes_the_table(tmp_path: Path) -> None:
    out = tmp_path / "detection.md"
    args = ["bench", "detection", "--quick", "--seeds", "1", "--only", "nan_log0"]
    completed = subprocess.run(
        [str(Path(sys.executable).with_name("gradguard")), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    assert "nan_log0 seed 0 quick: pathological" in completed.stdout
    table = out.read_text()
    assert "| nan_log0 (quick) | 0 | pathological |" in table
    assert "Recall: 1 / 1" in table


def test_bench_unknown_benchmark_or_scenario_is_a_clear_error() -> None:
    unknown = runner.invoke(app, ["bench", "speed"])
    assert unknown.exit_code == 2
    assert "overhead or detection" in unknown.output
    scenario = runner.invoke(app, ["bench", "detection", "--quick", "--only", "no_such_run"])
    assert scenario.exit_code == 2
    assert "no_such_run" in scenario.output


def _guarded_run(run_dir: Path, nan_at: int | None) -> None:
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    with gradguard.Guard(model, optimizer, run_dir=run_dir, tensorboard=False) as guard:
        for step in range(1, 31):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            if step == nan_at:
                model[0].weight.grad[0, 0] = float("nan")  # type: ignore[index]
            guard.step(loss)


def test_report_prints_the_verdict_and_strict_fails_on_a_warning(tmp_path: Path) -> None:
    _guarded_run(tmp_path / "clean", nan_at=None)
    _guarded_run(tmp_path / "nan", nan_at=12)
    clean = runner.invoke(app, ["report", "--strict", str(tmp_path / "clean")])
    assert clean.exit_code == 0, clean.output
    assert "healthy: no events in 30 steps." in clean.output
    nan = runner.invoke(app, ["report", str(tmp_path / "nan")])
    assert nan.exit_code == 0
    assert "1 step skipped for non-finite gradients" in nan.output
    strict = runner.invoke(app, ["report", "--strict", str(tmp_path / "nan")])
    assert strict.exit_code == 1
