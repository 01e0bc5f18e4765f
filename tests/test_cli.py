"""The console script: version, help, lab, bench and report wiring; exit statuses, errors."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NoReturn

import pytest
from click.testing import Result
from typer.testing import CliRunner

import gradguard
from gradguard.cli import EXIT_CODE_MEANINGS, ExitCode, app

runner = CliRunner()
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


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
    args = ["lab", "--quick", "--out", str(out), "--only", "early-stopping"]
    result = runner.invoke(app, [*args, "--only", "depth-activation"])  # two processes
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert [e["name"] for e in data["experiments"]] == ["early-stopping", "depth-activation"]


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


@pytest.mark.parametrize(
    ("args", "module"),
    [(["bench", "--quick"], "overhead_bench"), (["bench", "detection"], "detection")],
)
def test_bench_outside_a_checkout_says_where_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], module: str
) -> None:
    monkeypatch.setattr("gradguard.cli.BENCHMARKS", tmp_path / "benchmarks")
    result = runner.invoke(app, args)
    assert result.exit_code == ExitCode.USAGE
    line = error_line(result, "bench")
    assert "runs from a checkout of gradguard installed editable" in line
    assert f"{tmp_path / 'benchmarks' / module}.py does not exist." in line


def test_the_overhead_benchmark_is_not_in_the_package() -> None:
    package = Path(gradguard.__file__).parent
    assert not (package / "bench.py").exists()
    assert (BENCHMARKS / "overhead_bench.py").is_file()


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


# --- exit statuses and errors: one line on stderr, never a traceback -------------------------


def error_line(result: Result, command: str) -> str:
    """The one line a failed command printed on stderr (and no traceback anywhere)."""
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"gradguard {command}: error: "), lines[0]
    return lines[0]


def small_run(run_dir: Path) -> Path:
    """A three-step run directory in the documented format, written directly."""
    run_dir.mkdir(parents=True)
    (run_dir / "meta.json").write_text(json.dumps({"layer_names": ["0"], "config": {}}))
    rows = [{"step": s, "loss": 1.0 / s, "grad_norm": 1.0, "lr": 0.1} for s in (1, 2, 3)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    layers = "".join(json.dumps({"step": s, "norms": [1.0]}) + "\n" for s in (1, 2, 3))
    (run_dir / "layers.jsonl").write_text(layers)
    return run_dir


def test_exit_codes_are_distinct_and_listed_in_the_help() -> None:
    assert {code.name: int(code) for code in ExitCode} == {
        "OK": 0,
        "PATHOLOGY": 1,
        "USAGE": 2,
        "CLAIMS_FAILED": 3,
        "INTERRUPTED": 130,
    }
    text = " ".join(runner.invoke(app, ["--help"]).output.split())
    for code in ExitCode:
        assert f"{int(code)} {EXIT_CODE_MEANINGS[code]}" in text
    for words in ("0 ok", "1 a pathology found", "2 usage or input error", "3 a lab claim",
                  "130 interrupted (Ctrl-C)"):  # fmt: skip
        assert words in text


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "is not a run directory: it does not exist"),
        ("file", "is not a run directory: it is a file"),
        ("empty", "is not a run directory: it has neither meta.json nor metrics.jsonl"),
        ("lab-not-object", "results.json cannot be used: it holds no JSON object"),
        ("lab-not-json", "results.json cannot be used: it is not valid JSON"),
    ],
)
def test_report_on_no_run_directory_exits_two_with_one_line(
    tmp_path: Path, setup: str, message: str
) -> None:
    target = tmp_path / "target"
    if setup == "file":
        target.write_text("x")
    elif setup != "missing":
        target.mkdir()
    if setup.startswith("lab"):
        (target / "results.json").write_text("[1, 2]" if setup == "lab-not-object" else "{")
    result = runner.invoke(app, ["report", str(target)])
    assert result.exit_code == ExitCode.USAGE == 2
    line = error_line(result, "report")
    assert str(target) in line
    assert message in line


@pytest.mark.parametrize(
    ("code", "reason", "fix"),
    [
        (errno.EACCES, "Permission denied", "check its permissions or choose another path"),
        (errno.ENOSPC, "No space left on device", "free some disk space and run again"),
        (errno.EROFS, "Read-only file system", "the file system is read-only"),
    ],
)
def test_report_that_cannot_be_written_exits_two_naming_the_file_and_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, reason: str, fix: str
) -> None:
    run_dir = small_run(tmp_path / "run")

    def refuse(self: Path, *args: Any, **kwargs: Any) -> int:
        raise OSError(code, reason, str(self))

    monkeypatch.setattr(Path, "write_text", refuse)
    result = runner.invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 2
    line = error_line(result, "report")
    assert f"{run_dir / 'report.html.tmp'}: {reason}; {fix}" in line
    assert not (run_dir / "report.html.tmp").exists()


def test_console_script_reports_a_damaged_run_with_reading_notes(tmp_path: Path) -> None:
    run_dir = small_run(tmp_path / "run")
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "loss": "abc", "grad_norm": [1, 2]}\n[1, 2]\n42\n}{\n')
        f.write('{"step": null}\n{"step": 5, "loss": NaN, "skipped": "yes"}\n')
    with (run_dir / "events.jsonl").open("w") as f:
        f.write('{"step": 2, "kind": "spike", "layers": 5, "advice": "text", "severity": 3}\n')
    (run_dir / "layers.jsonl").write_text('{"step": 1, "norms": "x"}\n{"step": 2')
    completed = subprocess.run(
        [str(Path(sys.executable).with_name("gradguard")), "report", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert "Traceback" not in completed.stderr
    assert f"Wrote {run_dir / 'report.html'}" in completed.stdout
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "Reading notes" in page
    notes = [
        "metrics.jsonl line 4",
        "metrics.jsonl line 5",
        "metrics.jsonl line 7",
        "events.jsonl line 1",
        "layers.jsonl line 1",
        "layers.jsonl: the torn last",
    ]
    for text in notes:
        assert text in page


@pytest.mark.parametrize("command", ["report", "lab", "bench", "diagnose"])
def test_ctrl_c_exits_130_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    def interrupt(*args: Any, **kwargs: Any) -> NoReturn:
        raise KeyboardInterrupt

    import gradguard.lab
    import gradguard.report

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import overhead_bench  # benchmarks/, which `gradguard bench` imports from the checkout

    args = {
        "report": ["report", str(small_run(tmp_path / "run"))],
        "lab": ["lab", "--quick", "--out", str(tmp_path / "lab")],
        "bench": ["bench", "--quick"],
        "diagnose": ["diagnose", f"{tmp_path / 'net.py'}:make", "--input-shape", "4,4"],
    }[command]
    monkeypatch.setattr(gradguard.report, "write_report", interrupt)
    monkeypatch.setattr(gradguard.lab, "run", interrupt)
    monkeypatch.setattr(overhead_bench, "run_overhead", interrupt)
    (tmp_path / "net.py").write_text("def make():\n    raise KeyboardInterrupt\n")
    result = runner.invoke(app, args)
    assert result.exit_code == ExitCode.INTERRUPTED == 130
    assert error_line(result, command).endswith("error: interrupted.")


def test_lab_strict_exits_three_when_a_claim_is_not_reproduced_at_this_scale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gradguard.lab

    failed = SimpleNamespace(as_expected=False, run_dir=tmp_path)
    monkeypatch.setattr(gradguard.lab, "run", lambda **kwargs: failed)
    monkeypatch.setattr(gradguard.lab, "print_summary", lambda result, console: None)
    assert runner.invoke(app, ["lab", "--quick"]).exit_code == 0
    strict = runner.invoke(app, ["lab", "--quick", "--strict"])
    assert strict.exit_code == ExitCode.CLAIMS_FAILED == 3
    assert f"Results: {tmp_path}" in strict.stdout
    failed.as_expected = True  # every claim reproduced, or refuted at every scale
    assert runner.invoke(app, ["lab", "--quick", "--strict"]).exit_code == 0


@pytest.mark.parametrize(
    ("args", "command", "message"),
    [
        (["bench", "--rounds", "0"], "bench", "rounds must be an int >= 1"),
        (["bench", "--out", "/nonexistent-dir/x.md"], "bench",
         "--out /nonexistent-dir/x.md: the directory /nonexistent-dir does not exist"),
        (["bench", "speed"], "bench", "unknown benchmark 'speed': overhead or detection"),
        (["lab", "--quick", "--out", "FILE", "selu"], "lab", "File exists"),
        (["lab", "no-such-experiment"], "lab", "no-such-experiment"),
    ],
)  # fmt: skip
def test_bad_arguments_exit_two_with_one_line(
    tmp_path: Path, args: list[str], command: str, message: str
) -> None:
    (tmp_path / "FILE").write_text("x")
    args = [str(tmp_path / a) if a == "FILE" else a for a in args]
    result = runner.invoke(app, args)
    assert result.exit_code == ExitCode.USAGE
    assert message in error_line(result, command)


@pytest.mark.parametrize(
    "args",
    [
        ["lab", "--quick", "--seed", "-1"],
        ["lab", "--quick", "--seed", "99999999999999999999"],
        ["diagnose", "x.py:f", "--input-shape", "4,4", "--seed", "-1"],
    ],
)
def test_seeds_out_of_range_are_usage_errors(args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == ExitCode.USAGE
    assert "--seed" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", ["lab", "bench", "diagnose", "report"])
def test_help_paragraphs_are_wrapped_by_the_terminal_not_by_the_source(command: str) -> None:
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "80", "TERM": "dumb"})
    assert result.exit_code == 0
    description = result.output.split("Usage:", 1)[1].split("╭", 1)[0].splitlines()[2:]
    lines = [line.strip() for line in description]
    for line, following in zip(lines, [*lines[1:], ""], strict=True):
        # only a paragraph's last line may be short (a source line break shows as one)
        assert len(line) >= 50 or not line or not following, (line, following)
    assert "``" not in result.output
