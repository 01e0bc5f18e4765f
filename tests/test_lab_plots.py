"""Lab figures are drawn from the results data alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradguard import lab
from gradguard.lab._registry import EXPERIMENTS
from gradguard.lab.plots import write_plots


def test_quick_run_writes_the_depth_activation_figure(tmp_path: Path) -> None:
    result = lab.run(["depth-activation"], quick=True, out=tmp_path, progress=False)
    figure = result.run_dir / "depth-activation.png"
    assert figure.is_file()
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert figure.stat().st_size > 10_000


def test_figures_need_only_the_json(tmp_path: Path) -> None:
    result = lab.run(["depth-activation"], quick=True, out=tmp_path / "run", progress=False)
    data = json.loads((result.run_dir / "results.json").read_text())
    written = write_plots(data, tmp_path)
    assert [p.name for p in written] == ["depth-activation.png"]


def test_experiments_without_a_plot_are_skipped(tmp_path: Path) -> None:
    assert write_plots({"experiments": [{"name": "no-plot-here"}]}, tmp_path) == []
    assert callable(EXPERIMENTS["depth-activation"].plot)


def test_plot_rejects_missing_fields(tmp_path: Path) -> None:
    with pytest.raises(KeyError):
        EXPERIMENTS["depth-activation"].plot({"name": "depth-activation"}, tmp_path)
