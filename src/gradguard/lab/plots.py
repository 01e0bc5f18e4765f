"""Figures for a lab run, drawn from ``results.json`` data only (no torch, no recomputation).

Each plot declares the experiment it draws; a run without that experiment, or a machine
without matplotlib, simply gets no figure.
"""

from __future__ import annotations

import importlib
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


_ARM_STYLE = {
    "clean": ("#2ca02c", "clean (no fault)"),
    "guard": ("#d62728", "fault, Guard only"),
    "rollback": ("#1f77b4", "fault, Guard + Rollback"),
}


def _kept_and_abandoned(
    steps: list[int], values: list[float]
) -> tuple[dict[int, float], list[list[tuple[int, float]]]]:
    """Split one arm's calls into the path kept and the stretches a rollback abandoned.

    A rollback makes the step numbers go back; the calls it undid form an abandoned
    stretch, and for each step the last value recorded is the one the run kept.
    """
    kept: dict[int, float] = {}
    stretches: list[list[tuple[int, float]]] = [[]]
    for i, (step, value) in enumerate(zip(steps, values, strict=True)):
        if i and step <= steps[i - 1]:
            stretches.append([])
        stretches[-1].append((step, value))
        kept[step] = value
    # Every stretch but the last was cut short by a rollback: keep its undone part only.
    abandoned = [
        [(s, v) for s, v in stretch if s >= nxt[0][0]]
        for stretch, nxt in zip(stretches, stretches[1:], strict=False)
    ]
    return kept, abandoned


def _recovery_marks(rollback: Mapping[str, Any]) -> tuple[list[tuple[int, float]], list[int]]:
    """Return the rollback arm's ``(fired at, restored)`` pairs and its cool-down ends."""
    rollbacks = [
        (int(e["step"]), float(e["value"]))
        for e in rollback["events"]
        if e["kind"] == "rollback" and math.isfinite(float(e["value"]))
    ]
    cooldowns = [int(e["step"]) for e in rollback["events"] if e["kind"] == "cooldown"]
    return rollbacks, cooldowns


def _draw_arms(ax: Any, arms: Mapping[str, Mapping[str, Any]], field: str) -> None:
    """Draw one field of every arm: the kept path solid, stretches undone dotted."""
    for name, (color, label) in _ARM_STYLE.items():
        row = arms[name]
        values = [float(v) for v in row[field]]  # "nan"/"inf" text from results.json
        kept, abandoned = _kept_and_abandoned(row["steps"], values)
        ax.plot(list(kept), list(kept.values()), color=color, lw=0.8, label=label)
        for stretch in abandoned:
            xs, ys = zip(*stretch, strict=True)
            ax.plot(xs, ys, color=color, lw=1.0, ls=":", label="_undone")
    ax.set_yscale("log")
    ax.grid(True, which="major", alpha=0.3)


def plot_recovery(experiment: Mapping[str, Any], out_dir: Path) -> Path:
    """Loss and gradient norm per step of the three arms of the first seed.

    Left the whole run, right a close-up of the fault. The fault window (LR x100) is
    shaded; the rollback (an arrow from the step it fired at back to the snapshot it
    restored) and the end of the cool-down are marked. Steps a rollback undid are dotted.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = experiment["measurements"]
    config = experiment["config"]
    first_seed = min(row["seed"] for row in rows)
    arms = {row["arm"]: row for row in rows if row["seed"] == first_seed}
    fault, lr_steps = config["fault_step"], config["lr_steps"]
    rollbacks, cooldowns = _recovery_marks(arms["rollback"])
    fig, axes = plt.subplots(
        2, 2, figsize=(12, 6.6), sharey="row", gridspec_kw={"width_ratios": (1.5, 1)}
    )
    for row_axes, field in zip(axes, ("loss", "grad_norm"), strict=True):
        for ax in row_axes:
            _draw_arms(ax, arms, field)
            ax.axvspan(fault - 0.5, fault + lr_steps - 0.5, color="#ff7f0e", alpha=0.3, lw=0)
            for fired, restored in rollbacks:
                ax.axvline(restored, color="#1f77b4", ls="--", lw=0.8)
                ax.axvline(fired, color="#1f77b4", ls="-.", lw=0.8)
            for step in cooldowns:
                ax.axvline(step, color="#7f7f7f", ls="--", lw=0.8)
        row_axes[1].set_xlim(fault - 2 * config["every"], fault + 2 * config["cooldown"])
    zoom = axes[0][1]
    for fired, restored in rollbacks:
        zoom.annotate(
            f"rollback {fired} → {restored:g}",
            xy=(restored, 0.93),
            xytext=(fired + 5, 0.93),
            xycoords=zoom.get_xaxis_transform(),
            textcoords=zoom.get_xaxis_transform(),
            arrowprops={"arrowstyle": "->", "color": "#1f77b4"},
            va="center",
            fontsize=8,
            color="#1f77b4",
        )
    for step in cooldowns:
        zoom.text(
            step + 3,
            0.8,
            "cool-down over",
            transform=zoom.get_xaxis_transform(),
            fontsize=8,
            color="#4d4d4d",
        )
    zoom.text(
        fault - 3,
        0.05,
        f"LR x{config['lr_factor']:g}",
        ha="right",
        transform=zoom.get_xaxis_transform(),
        fontsize=8,
        color="#c85a00",
    )
    axes[0][0].set_ylabel("batch loss (MSE)")
    axes[1][0].set_ylabel("gradient norm")
    for ax in axes[1]:
        ax.set_xlabel("optimizer step (a rollback rewinds it)")
    axes[0][0].set_title("whole run", fontsize=10)
    zoom.set_title("around the fault (dotted: steps the rollback undid)", fontsize=10)
    axes[0][0].legend(fontsize=8, loc="lower left")
    fig.suptitle(
        f"A real divergence, with and without rollback (seed {first_seed}, "
        f"LR x{config['lr_factor']:g} for steps {fault}-{fault + lr_steps - 1})"
    )
    fig.tight_layout()
    path = out_dir / "recovery.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


PLOTS: dict[str, PlotFn] = {
    "depth-activation": plot_depth_activation,
    "recovery": plot_recovery,
}


def write_plots(results: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Draw every figure the run's experiments have; return the files written.

    Returns an empty list when matplotlib is not installed (the ``report`` extra).
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return []
    return [
        plot(experiment, out_dir)
        for experiment in results["experiments"]
        if (plot := _plot_for(experiment["name"])) is not None
    ]


def _plot_for(name: str) -> PlotFn | None:
    """The figure of experiment ``name``: from :data:`PLOTS`, or its module's ``plot``."""
    if name in PLOTS:
        return PLOTS[name]
    try:
        module = importlib.import_module(f"gradguard.lab.{name.replace('-', '_')}")
    except ModuleNotFoundError:
        return None
    plot: PlotFn | None = getattr(module, "plot", None)
    return plot
