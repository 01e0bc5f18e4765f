"""Figures for a lab run, drawn from ``results.json`` data only (no torch, no recomputation).

Each registered experiment draws its own figure (:meth:`LabExperiment.plot`); an unknown
experiment, or a machine without matplotlib, simply gets no figure.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def write_plots(results: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Draw every figure the run's experiments have; return the files written.

    Returns an empty list when matplotlib is not installed (the ``report`` extra).
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return []
    from gradguard.lab._registry import EXPERIMENTS

    written = []
    for experiment in results["experiments"]:
        plot = getattr(EXPERIMENTS.get(experiment["name"]), "plot", None)
        path = None if plot is None else plot(experiment, out_dir)
        if path is not None:
            written.append(path)
    return written
