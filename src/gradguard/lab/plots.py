"""Figures for a lab run, drawn from ``results.json`` data only (no torch, no recomputation).

Each plot declares the experiment it draws; a run without that experiment, or a machine
without matplotlib, simply gets no figure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

PlotFn = Callable[[Mapping[str, Any], Path], Path]

_COLORS = {
    "sigmoid": "#d62728",
    "tanh": "#ff7f0e",
    "relu": "#1f77b4",
    "leaky_relu": "#17becf",
    "elu": "#2ca02c",
    "selu": "#9467bd",
}


def plot_depth_activation(experiment: Mapping[str, Any], out_dir: Path) -> Path:
    """Per-layer gradient norm through the deepest network, one line per activation and init.

    The picture of vanishing gradients: under PyTorch's default init sigmoid, tanh and the
    ReLU family fall by orders of magnitude toward the input; under the matching scheme all
    but sigmoid stay flat.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = experiment["measurements"]
    depth = max(row["depth"] for row in rows)
    first_seed = min(row["seed"] for row in rows)
    chosen = [r for r in rows if r["depth"] == depth and r["seed"] == first_seed]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, init in zip(axes, ("default", "matched"), strict=True):
        for row in (r for r in chosen if r["init"] == init):
            norms = [n if n > 0 else math.nan for n in row["grad_norms"]]
            label = row["activation"] + ("" if init == "default" else f" ({row['scheme']})")
            ax.plot(
                range(1, len(norms) + 1),
                norms,
                marker=".",
                color=_COLORS.get(row["activation"]),
                label=label,
            )
        ax.set_yscale("log")
        ax.set_xlabel("layer (input → output)")
        ax.set_title(
            "PyTorch default init U(±1/√n)" if init == "default" else "matching init scheme"
        )
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("gradient norm at initialization")
    fig.suptitle(f"Gradient flow through a {depth}-layer MLP on digits (seed {first_seed})")
    fig.tight_layout()
    path = out_dir / "depth-activation.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


PLOTS: dict[str, PlotFn] = {"depth-activation": plot_depth_activation}


def write_plots(results: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Draw every figure the run's experiments have; return the files written.

    Returns an empty list when matplotlib is not installed (the ``report`` extra).
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return []
    return [
        PLOTS[experiment["name"]](experiment, out_dir)
        for experiment in results["experiments"]
        if experiment["name"] in PLOTS
    ]
