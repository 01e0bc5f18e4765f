"""``gradguard diagnose``: targets, exit codes, JSON and HTML output, clear usage errors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gradguard.cli import app


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One torch thread, as the lab runs: tiny kernels stall when another process holds a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "diagnose_models.py"
runner = CliRunner()


def run(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["diagnose", *args])
    return result.exit_code, result.stdout, result.stderr


def test_help_lists_diagnose() -> None:
    result = runner.invoke(app, ["--help"])
    assert "diagnose" in result.output


def test_healthy_example_exits_zero() -> None:
    code, out, _ = run(f"{EXAMPLES}:he_relu", "--input-shape", "64,784", "--classes", "10")
    assert code == 0, out
    assert "gradguard diagnosis: healthy" in out


@pytest.mark.parametrize(
    ("factory", "shape", "verdict"),
    [
        ("deep_sigmoid", "64,784", "vanishing"),
        ("relu_normal", "64,784", "exploding"),
        ("tanh_rnn", "16,100,8", "exploding"),
    ],
)
def test_unhealthy_examples_exit_one_and_json_is_parseable(
    factory: str, shape: str, verdict: str
) -> None:
    code, out, _ = run(f"{EXAMPLES}:{factory}", "--input-shape", shape, "--json")
    assert code == 1
    data = json.loads(out)
    assert data["verdict"] == verdict
    assert data["recommendations"]


def test_html_is_written(tmp_path: Path) -> None:
    page = tmp_path / "out" / "diag.html"
    page.parent.mkdir()
    code, _, err = run(f"{EXAMPLES}:deep_tanh", "--input-shape", "32,784", "--html", str(page))
    assert code == 1
    assert page.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert str(page) in err


def test_module_targets_are_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(
        "from torch import nn\n"
        "def small():\n"
        "    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, _ = run("mypkg.nets:small", "--input-shape", "16,8", "--classes", "3")
    assert code == 0, out


@pytest.mark.parametrize(
    ("target", "shape", "message"),
    [
        ("no_colon_here", "4,4", "TARGET must be package.module:factory"),
        ("missing/file.py:f", "4,4", "no such file: missing/file.py"),
        ("no_such_module_xyz:f", "4,4", "cannot import module 'no_such_module_xyz'"),
        (f"{EXAMPLES}:nope", "4,4", "has no factory 'nope'; callables there: "),
        (f"{EXAMPLES}:he_relu", "64,abc", "--input-shape must be positive integers"),
        (f"{EXAMPLES}:he_relu", "64,0", "--input-shape must be positive integers"),
        (f"{EXAMPLES}:he_relu", "10000000000,10000000000", "cannot make a batch of that shape"),
        (f"{EXAMPLES}:he_relu", "64,10", "the model failed on the inputs given"),
        ("torch.nn:Identity", "4,4", "has no parameters"),
        ("torch.nn:Linear", "4,4", "torch.nn:Linear() failed: TypeError"),
        ("math:pi", "4,4", "has no factory 'pi'"),
    ],
)
def test_usage_errors_exit_two_with_one_clear_line(target: str, shape: str, message: str) -> None:
    code, out, err = run(target, "--input-shape", shape)
    assert code == 2
    assert out == ""
    assert message in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_factory_returning_a_non_module(tmp_path: Path) -> None:
    source = tmp_path / "bad.py"
    source.write_text("def make():\n    return 42\n")
    code, _, err = run(f"{source}:make", "--input-shape", "4,4")
    assert code == 2
    assert "returned int, not a torch.nn.Module" in err


def test_classes_must_be_at_least_two() -> None:
    code, _, err = run(f"{EXAMPLES}:he_relu", "--input-shape", "8,784", "--classes", "1")
    assert code == 2
    assert "--classes must be at least 2" in err


def test_console_script_exit_codes_without_traceback() -> None:
    script = Path(sys.executable).with_name("gradguard")
    bad = subprocess.run(
        [str(script), "diagnose", f"{EXAMPLES}:nope", "--input-shape", "4,784"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert "has no factory 'nope'" in bad.stderr
    missing = subprocess.run(
        [str(script), "diagnose", f"{EXAMPLES}:he_relu"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert missing.returncode == 2  # click's own usage error: --input-shape is required
    assert "--input-shape" in missing.stderr


@pytest.mark.parametrize(
    ("html", "message"),
    [
        ("missing/diag.html", "the directory {tmp}/missing does not exist; create it first"),
        (".", "--html {tmp} is a directory: give a file path"),
        ("/dev/full", "/dev/full: No space left on device; free some disk space and run again."),
    ],
)
def test_html_that_cannot_be_written_exits_two_with_one_line(
    tmp_path: Path, html: str, message: str
) -> None:
    page = tmp_path / html if not html.startswith("/") else Path(html)
    if html.startswith("/") and not page.exists():
        pytest.skip(f"{html} is not on this system")
    code, _, err = run(f"{EXAMPLES}:he_relu", "--input-shape", "8,784", "--html", str(page))
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("gradguard diagnose: error: ")
    assert message.format(tmp=tmp_path) in lines[0]


@pytest.mark.parametrize(
    ("source", "code", "message"),
    [
        ("import sys\nsys.exit(3)\n", 2, "importing {file} called sys.exit(3); a factory module"),
        ("def make(:\n", 2, "importing {file} failed: SyntaxError"),
        ("def make():\n    raise SystemExit('no')\n", 2, "{file}:make() called sys.exit('no')"),
        ("import json\ndef make():\n    return json.loads('{{')\n", 2,
         "{file}:make() failed: JSONDecodeError"),
        ("def make():\n    raise KeyboardInterrupt\n", 130, "interrupted."),
    ],
)  # fmt: skip
def test_a_target_that_exits_fails_or_is_interrupted(
    tmp_path: Path, source: str, code: int, message: str
) -> None:
    target = tmp_path / "net.py"
    target.write_text(source)
    status, out, err = run(f"{target}:make", "--input-shape", "4,4")
    assert status == code
    assert out == ""
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert message.format(file=target) in err
