"""The examples run as documented (for a few steps)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str) -> str:
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


def test_plain_loop_skips_the_injected_faults_and_logs(tmp_path: Path) -> None:
    out = run_example("plain_loop.py", "--steps", "120", "--run-dir", str(tmp_path / "run"))
    assert "2 steps skipped" in out
    assert out.count("nonfinite") == 2
    for name in ("meta.json", "metrics.jsonl", "layers.jsonl", "events.jsonl"):
        assert (tmp_path / "run" / name).is_file()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 120


@pytest.mark.slow
def test_amp_loop_agrees_with_the_scaler() -> None:
    out = run_example("amp_loop.py", "--steps", "40")
    skipped = int(out.split(";")[1].split()[0])
    assert skipped > 0  # the large initial scale overflows fp16 at first
    assert "final loss" in out


def test_timm_agc_trains_a_timm_model_with_gradguards_agc(tmp_path: Path) -> None:
    try:
        import timm  # noqa: F401
    except Exception as error:  # noqa: BLE001 - no torchvision, or one built for another torch
        pytest.skip(f"timm cannot be imported here ({type(error).__name__}: {error})")
    out = run_example("timm_agc.py", "--steps", "5", "--run-dir", str(tmp_path / "run"))
    assert re.search(r"resnet10t: test accuracy 0\.\d{3} after 5 steps; AGC clipped at [1-5] ", out)
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 5
