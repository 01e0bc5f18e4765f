"""The report's figures: each declares the fields it needs and draws from a RunData.

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg renderer, never
through ``pyplot``: writing a report leaves the caller's matplotlib backend and open
figures alone. A figure whose fields are missing is not drawn; the report says why.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from gradguard.report._data import FloatArray, RunData, number

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

RED, ORANGE, PURPLE, GREY, BLUE = "#d62728", "#ff7f0e", "#9467bd", "#7f7f7f", "#1f77b4"
MAX_COLUMNS = 600  # heatmap columns; longer runs are binned (geometric mean per bin)
MAX_LAYER_LABELS = 40

#: Why a field can be missing, shown in place of the figure that needs it.
MISSING = {
    "loss": "no loss in metrics.jsonl (guard.step() was called without a loss)",
    "grad_norm": "no grad_norm in metrics.jsonl",
    "lr": "no learning rate in metrics.jsonl",
    "layer_norms": "no per-layer norms (layers.jsonl rows matching the layer_names of meta.json)",
}


def missing_fields(run: RunData, needs: tuple[str, ...]) -> list[str]:
    """The reasons, one per field in ``needs`` that the run does not have."""
    out = []
    for name in needs:
        present = run.layer_matrix[1].size > 0 if name == "layer_norms" else run.has(name)
        if not present:
            out.append(MISSING[name])
    return out


@dataclass(frozen=True)
class Plot:
    """One figure of the report: its title, what it shows, its fields and how to draw it."""

    key: str
    title: str
    caption: str
    needs: tuple[str, ...]
    draw: Callable[[RunData], Figure]


def png(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _figure(height: float, width: float = 11.0) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


# --- event marks shared by the timelines ----------------------------------------------


def _rollback_spans(run: RunData) -> list[tuple[float, float]]:
    """(restored step, step rolled back from) of each rollback that happened."""
    spans = []
    for event in run.events_of("rollback"):
        restored = number(event.get("value"))
        if math.isfinite(restored):
            spans.append((restored, number(event.get("step"))))
    return spans


def _cooldown_spans(run: RunData) -> list[tuple[float, float]]:
    """(first cooled step, last cooled step): after each rollback, until its cool-down event."""
    spans = []
    restored: float | None = None
    for event in run.events:
        if event.get("kind") == "rollback" and math.isfinite(number(event.get("value"))):
            restored = number(event.get("value"))
        elif event.get("kind") == "cooldown" and restored is not None:
            spans.append((restored + 1, number(event.get("step"))))
            restored = None
    return spans


def _mark_events(ax: Axes, run: RunData, metric: str) -> list[Any]:
    """Mark skipped steps, spikes of ``metric``, rollbacks, cool-downs and divergence."""
    handles = _mark_steps(ax, run, metric)
    handles += _mark_spans(ax, run)
    return handles


def _mark_steps(ax: Axes, run: RunData, metric: str) -> list[Any]:
    """Single-step marks: skipped steps, spikes, vanishing/exploding onsets, divergence."""
    from matplotlib.lines import Line2D

    handles: list[Any] = []
    skipped = run.steps[run.flag("skipped")]
    if skipped.size:
        ax.vlines(skipped, 0, 1, transform=ax.get_xaxis_transform(), color=RED, lw=0.9, alpha=0.7)
        handles.append(Line2D([], [], color=RED, lw=0.9, label="skipped step"))
    spikes = [e for e in run.events_of("spike") if e.get("metric") == metric]
    if spikes:
        xs = [number(e["step"]) for e in spikes]
        ys = [number(e.get("value")) for e in spikes]
        ax.scatter(xs, ys, marker="^", s=60, color=ORANGE, zorder=5, edgecolor="black", lw=0.5)
        handles.append(Line2D([], [], color=ORANGE, marker="^", ls="", label="spike"))
    lines: list[tuple[tuple[str, ...], str, str, str]] = [
        (("vanishing", "exploding"), PURPLE, ":", "vanishing/exploding onset"),
        (("divergence",), "black", "--", "divergence"),
    ]
    for kinds, color, style, label in lines:
        if metric != "grad_norm" and kinds[0] == "vanishing":
            continue  # per-layer conditions belong on the gradient-norm plot
        found = [number(e["step"]) for e in run.events_of(*kinds)]
        if found:
            ax.vlines(found, 0, 1, transform=ax.get_xaxis_transform(), color=color, ls=style)
            handles.append(Line2D([], [], color=color, ls=style, label=label))
    return handles


def _mark_spans(ax: Axes, run: RunData) -> list[Any]:
    """Step ranges: those a rollback undid (grey) and the LR cool-down after it (blue)."""
    from matplotlib.patches import Patch

    handles: list[Any] = []
    rollbacks = _rollback_spans(run)
    for start, stop in rollbacks:
        ax.axvspan(start, stop, color=GREY, alpha=0.18, lw=0)
        ax.axvline(start, color=GREY, lw=1.2)
    if rollbacks:
        handles.append(Patch(color=GREY, alpha=0.35, label="rolled back (restored at left edge)"))
    cooldowns = _cooldown_spans(run)
    for start, stop in cooldowns:
        ax.axvspan(start, stop, color=BLUE, alpha=0.10, lw=0)
    if cooldowns:
        handles.append(Patch(color=BLUE, alpha=0.25, label="LR cool-down"))
    return handles


def _series(ax: Axes, run: RunData, values: FloatArray, label: str, color: str) -> list[Any]:
    """Plot a metric over the final rows; rows a rollback undid as faint dots."""
    from matplotlib.lines import Line2D

    final = run.final
    (line,) = ax.plot(run.steps[final], values[final], color=color, lw=1.0, label=label)
    handles: list[Any] = [line]
    if (~final).any():
        ax.plot(run.steps[~final], values[~final], ".", color=GREY, ms=3, alpha=0.6)
        handles.append(Line2D([], [], color=GREY, marker=".", ls="", label="undone by rollback"))
    return handles


def _legend(ax: Axes, handles: list[Any]) -> None:
    """The legend beside the axes, where it never hides a mark."""
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0))


def _log_if_wide(ax: Axes, values: FloatArray, ratio: float = 100.0) -> None:
    """Log y axis when every finite value is positive and they span ``ratio`` or more."""
    finite = values[np.isfinite(values)]
    if finite.size and (finite > 0).all() and finite.max() >= ratio * finite.min():
        ax.set_yscale("log")


# --- the figures --------------------------------------------------------------------------


def draw_loss(run: RunData) -> Figure:
    """Loss over steps with skipped steps, loss spikes, rollbacks and cool-downs marked."""
    fig = _figure(3.4)
    ax = fig.subplots()
    loss = run.column("loss")
    handles = _series(ax, run, loss, "loss", BLUE)
    handles += _mark_events(ax, run, "loss")
    _log_if_wide(ax, loss)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    _legend(ax, handles)
    return fig


def clip_threshold(config: dict[str, Any]) -> float | None:
    """The fixed threshold of a ``NormClip`` from ``meta.json``'s config, else None.

    Example:
        >>> clip_threshold({"clip": "NormClip(max_norm=1.0, norm_type=2.0)"})
        1.0
    """
    found = re.match(r"NormClip\(max_norm=([-+0-9.eE]+|inf)", str(config.get("clip", "")))
    return float(found.group(1)) if found else None


def draw_grad_norm(run: RunData) -> Figure:
    """Global gradient norm, the norm after clipping where it differs, and the events."""
    from matplotlib.lines import Line2D

    fig = _figure(3.6)
    ax = fig.subplots()
    norm = run.column("grad_norm")
    handles = _series(ax, run, norm, "global gradient norm", "black")
    clipped = run.column("clipped_norm")
    differs = run.final & np.isfinite(clipped) & (np.abs(clipped - norm) > 1e-6 * np.abs(norm))
    if differs.any():
        ax.plot(run.steps[differs], clipped[differs], ".", color=ORANGE, ms=4)
        handles.append(
            Line2D([], [], color=ORANGE, marker=".", ls="", label="after clipping (clip threshold)")
        )
    threshold = clip_threshold(run.meta.get("config", {}))
    if threshold is not None:
        ax.axhline(threshold, color=ORANGE, ls="--", lw=1.0)
        handles.append(Line2D([], [], color=ORANGE, ls="--", label=f"max_norm = {threshold:g}"))
    handles += _mark_events(ax, run, "grad_norm")
    _log_if_wide(ax, norm, ratio=10.0)
    ax.set_xlabel("step")
    ax.set_ylabel("gradient norm (L2)")
    ax.grid(alpha=0.3, which="both")
    _legend(ax, handles)
    return fig


def draw_lr(run: RunData) -> Figure:
    """Learning rate over steps (cool-downs included: the guard logs the LR it applied)."""
    fig = _figure(2.4)
    ax = fig.subplots()
    lr = run.column("lr")
    handles = _series(ax, run, lr, "learning rate", "#2ca02c")
    handles += _mark_spans(ax, run)
    _log_if_wide(ax, lr, ratio=10.0)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.grid(alpha=0.3)
    _legend(ax, handles)
    return fig


def _short(name: str, width: int = 36) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def _layer_ticks(ax: Axes, names: list[str]) -> None:
    every = max(1, math.ceil(len(names) / MAX_LAYER_LABELS))
    ticks = list(range(0, len(names), every))
    ax.set_yticks(ticks, [_short(names[i]) for i in ticks], fontsize=7)


def binned_log_norms(norms: FloatArray, columns: int) -> tuple[FloatArray, FloatArray]:
    """Bin steps (rows) into ``columns``: log10 geometric mean per bin, non-finite flag.

    Returns ``(log10 norm [bins, layers], any non-finite [bins, layers] as 0/1)``; the
    mean is NaN where a bin has no positive finite value.

    Example:
        >>> mean, bad = binned_log_norms(np.array([[1.0, np.nan], [100.0, 1.0]]), 1)
        >>> mean.tolist(), bad.tolist()
        ([[1.0, 0.0]], [[0.0, 1.0]])
    """
    n = norms.shape[0]
    edges = np.linspace(0, n, min(n, columns) + 1).astype(int)[:-1]
    ok = np.isfinite(norms) & (norms > 0)
    logs = np.where(ok, np.log10(np.where(ok, norms, 1.0)), 0.0)
    sums = np.add.reduceat(logs, edges, axis=0)
    counts = np.add.reduceat(ok.astype(np.float64), edges, axis=0)
    mean = np.where(counts > 0, sums / np.maximum(counts, 1.0), np.nan)
    bad = np.add.reduceat((~np.isfinite(norms)).astype(np.float64), edges, axis=0) > 0
    return mean, bad.astype(np.float64)


def draw_heatmap(run: RunData) -> Figure:
    """Per-layer gradient norm over steps, log colour, layers in depth order (input on top)."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap, LogNorm

    steps, norms = run.layer_matrix
    names = run.layer_names
    mean, bad = binned_log_norms(norms, MAX_COLUMNS)
    values = np.ma.masked_invalid(10.0**mean).T
    fig = _figure(max(2.6, min(14.0, 0.2 * len(names) + 1.4)))
    ax = fig.subplots()
    extent = (float(steps[0]) - 0.5, float(steps[-1]) + 0.5, len(names) - 0.5, -0.5)
    cmap = colormaps["viridis"].with_extremes(bad="#dddddd")
    finite = values.compressed()
    norm = LogNorm(vmin=finite.min(), vmax=finite.max()) if finite.size else None
    shown: dict[str, Any] = {"aspect": "auto", "extent": extent, "interpolation": "nearest"}
    image = ax.imshow(values, cmap=cmap, norm=norm, **shown)
    if bad.any():
        overlay = np.ma.masked_equal(bad.T, 0.0)
        ax.imshow(overlay, cmap=ListedColormap([RED]), vmin=0, vmax=1, **shown)
    fig.colorbar(image, ax=ax, label="gradient norm (log scale)", pad=0.01)
    _layer_ticks(ax, names)
    ax.set_xlabel("step")
    ax.set_ylabel("layer (input at top)")
    binned = (
        f"; {len(steps)} steps binned into {mean.shape[0]} columns"
        if len(steps) > mean.shape[0]
        else ""
    )
    ax.set_title(f"red: NaN/Inf, grey: zero{binned}", fontsize=8, loc="right")
    return fig


def start_end_rows(norms: FloatArray, k: int = 10) -> tuple[slice, slice]:
    """The rows the bars summarise: the first and last ``k`` (at most a quarter of the run)."""
    k = max(1, min(k, norms.shape[0] // 4))
    return slice(0, k), slice(norms.shape[0] - k, norms.shape[0])


def draw_layer_bars(run: RunData) -> Figure:
    """Per-layer gradient norm at the start and at the end of the run (median, log scale)."""
    steps, norms = run.layer_matrix
    names = run.layer_names
    first, last = start_end_rows(norms)
    clean = np.where(np.isfinite(norms), norms, np.nan)
    with warnings.catch_warnings():
        # "All-NaN slice encountered": a layer NaN at every step summarised has no median
        warnings.filterwarnings("ignore", "All-NaN slice", RuntimeWarning)
        start = np.nanmedian(clean[first], axis=0)
        end = np.nanmedian(clean[last], axis=0)
    fig = _figure(max(2.6, min(16.0, 0.24 * len(names) + 1.2)))
    ax = fig.subplots()
    y = np.arange(len(names))
    span = f"steps {steps[first][0]}–{steps[first][-1]}"
    ax.barh(y - 0.2, start, height=0.4, color=GREY, label=f"start ({span})")
    span = f"steps {steps[last][0]}–{steps[last][-1]}"
    ax.barh(y + 0.2, end, height=0.4, color=BLUE, label=f"end ({span})")
    positive = np.concatenate([start, end])
    positive = positive[np.isfinite(positive) & (positive > 0)]
    if positive.size:
        ax.set_xscale("log")
    _layer_ticks(ax, names)
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.set_xlabel("gradient norm (median over the steps named)")
    ax.set_ylabel("layer (input at top)")
    ax.grid(alpha=0.3, axis="x", which="both")
    ax.legend(fontsize=8, loc="lower right")
    return fig


PLOTS = (
    Plot(
        "loss",
        "Loss",
        "Loss at every step. Red lines: skipped steps; triangles: loss spikes; grey bands: "
        "steps undone by a rollback; blue bands: the LR cool-down after it.",
        ("loss",),
        draw_loss,
    ),
    Plot(
        "grad_norm",
        "Global gradient norm",
        "Global L2 norm of the gradients before clipping, and after clipping where the "
        "policy shrank it. Non-finite norms are gaps at the red lines (skipped steps).",
        ("grad_norm",),
        draw_grad_norm,
    ),
    Plot("lr", "Learning rate", "The learning rate applied at each step.", ("lr",), draw_lr),
    Plot(
        "heatmap",
        "Per-layer gradient norm over steps",
        "Each row a layer, input at the top; log colour. Dark rows near the top that stay "
        "dark are vanishing gradients, bright rows exploding ones.",
        ("layer_norms",),
        draw_heatmap,
    ),
    Plot(
        "layer_bars",
        "Per-layer gradient norm, start and end",
        "Median per-layer norm over the first and the last steps logged.",
        ("layer_norms",),
        draw_layer_bars,
    ),
)
