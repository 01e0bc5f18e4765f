"""Figures for a lab run, drawn from ``results.json`` data only (no torch, no recomputation).

Each plot declares the experiment it draws; a run without that experiment, or a machine
without matplotlib, simply gets no figure.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

PlotFn = Callable[[Mapping[str, Any], Path], Path | None]

PLOTS: dict[str, PlotFn] = {}


def write_plots(results: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Draw every figure the run's experiments have; return the files written.

    Returns an empty list when matplotlib is not installed (the ``report`` extra).
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return []
    written = []
    for experiment in results["experiments"]:
        plot = _plot_for(experiment["name"])
        path = None if plot is None else plot(experiment, out_dir)
        if path is not None:
            written.append(path)
    return written


def _plot_for(name: str) -> PlotFn | None:
    """The figure of experiment ``name``: its ``plot``, from :data:`PLOTS` or its module."""
    if name in PLOTS:
        return PLOTS[name]
    from gradguard.lab._registry import EXPERIMENTS

    experiment = EXPERIMENTS.get(name)
    if experiment is not None and hasattr(experiment, "plot"):
        return experiment.plot
    try:
        module = importlib.import_module(f"gradguard.lab.{name.replace('-', '_')}")
    except ModuleNotFoundError:
        return None
    plot: PlotFn | None = getattr(module, "plot", None)
    return plot
