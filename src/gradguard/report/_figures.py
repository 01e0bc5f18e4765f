"""The report's figures: each declares the fields it needs and draws from a RunData.

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg renderer, never
through ``pyplot``: writing a report leaves the caller's matplotlib backend and open
figures alone. A figure whose fields are missing is not drawn; the report says why (an
optional figure, such as the update-ratio heatmap, is left out silently).

The timelines take their y-range from the healthy steps (before the first warning or
error), so a blow-up to 1e30 or a NaN streak does not squash the rest of the run: the
values beyond the range are drawn as markers on the axis edge.
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
import numpy.typing as npt

from gradguard.report._data import BoolArray, FloatArray, RunData, number, severity

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

RED, ORANGE, PURPLE, GREY, BLUE = "#d62728", "#ff7f0e", "#9467bd", "#7f7f7f", "#1f77b4"
DARK_RED = "#8b0000"
MAX_COLUMNS = 600  # heatmap columns; longer runs are binned (geometric mean per bin)
MAX_LAYER_LABELS = 40

#: Why a field can be missing, shown in place of the figure that needs it.
MISSING = {
    "loss": "no loss in metrics.jsonl (guard.step() was called without a loss)",
    "grad_norm": "no grad_norm in metrics.jsonl",
    "lr": "no learning rate in metrics.jsonl",
    "layer_norms": "no per-layer norms (layers.jsonl rows matching the layer_names of meta.json)",
    "update_ratio": "no update ratios in layers.jsonl",
}


def missing_fields(run: RunData, needs: tuple[str, ...]) -> list[str]:
    """The reasons, one per field in ``needs`` that the run does not have."""
    out = []
    for name in needs:
        if name == "layer_norms":
            present = run.layer_matrix[1].size > 0
        elif name == "update_ratio":
            present = bool(run.update_ratio_matrix[2].any())
        else:
            present = run.has(name)
        if not present:
            out.append(MISSING[name])
    return out


@dataclass(frozen=True)
class Plot:
    """One figure of the report: its title, what it shows, its fields and how to draw it.

    An ``optional`` figure shows data only some runs have; without it the figure is left
    out rather than replaced by a note.
    """

    key: str
    title: str
    caption: str
    needs: tuple[str, ...]
    draw: Callable[[RunData], Figure]
    optional: bool = False


def png(fig: Figure, dpi: int = 100, colors: int = 256) -> bytes:
    """The figure as PNG bytes with a palette of ``colors`` colours.

    A plot has few colours, so the palette PNG looks the same and is about 2.5 times
    smaller than the full-colour one: the report stays small enough to mail. Pillow is
    a dependency of matplotlib.
    """
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    buffer.seek(0)
    with Image.open(buffer) as image:
        palette = image.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
    out = io.BytesIO()
    palette.save(out, format="PNG", optimize=True)
    return out.getvalue()


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
    for event in run.event_rows:  # file order: a cool-down's step can precede its rollback's
        if event.get("kind") == "rollback" and math.isfinite(number(event.get("value"))):
            restored = number(event.get("value"))
        elif event.get("kind") == "cooldown" and restored is not None:
            spans.append((restored + 1, number(event.get("step"))))
            restored = None
    return spans


def _mark_events(ax: Axes, run: RunData, metric: str, top: float = math.inf) -> list[Any]:
    """Mark skipped steps, spikes of ``metric``, rollbacks, cool-downs and divergence."""
    handles = _mark_steps(ax, run, metric, top)
    handles += _mark_spans(ax, run)
    return handles


def _mark_steps(ax: Axes, run: RunData, metric: str, top: float = math.inf) -> list[Any]:
    """Single-step marks: skipped steps, spikes, vanishing/exploding onsets, divergence.

    A spike beyond ``top`` (the y-range's upper end) is drawn at ``top``.
    """
    from matplotlib.lines import Line2D

    handles: list[Any] = []
    skipped = run.steps[run.flag("skipped")]
    if skipped.size:
        ax.vlines(skipped, 0, 1, transform=ax.get_xaxis_transform(), color=RED, lw=0.9, alpha=0.7)
        handles.append(Line2D([], [], color=RED, lw=0.9, label="skipped step"))
    spikes = [e for e in run.events_of("spike") if e.get("metric") == metric]
    if spikes:
        xs = [number(e["first_step"]) for e in spikes]
        values = [number(e.get("value")) for e in spikes]
        ys = [v if v <= top or top == math.inf else top for v in values]
        ax.scatter(xs, ys, marker="^", s=60, color=ORANGE, zorder=7, edgecolor="black", lw=0.5,
                   clip_on=False)  # fmt: skip
        handles.append(Line2D([], [], color=ORANGE, marker="^", ls="", label="spike"))
    lines: list[tuple[tuple[str, ...], str, str, str]] = [
        (("vanishing", "exploding"), PURPLE, ":", "vanishing/exploding onset"),
        (("divergence",), "black", "--", "divergence"),
    ]
    for kinds, color, style, label in lines:
        if metric != "grad_norm" and kinds[0] == "vanishing":
            continue  # per-layer conditions belong on the gradient-norm plot
        found = [number(e["first_step"]) for e in run.events_of(*kinds)]
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


# --- y-range from the healthy steps, off-scale values on the edge ------------------------

MIN_HEALTHY = 5  # fewer healthy values than this: robust quantiles of all values instead
MAX_LOG10 = 300.0  # y-ranges stop at 1e300 (a logged value of 1e308 is drawn on the edge)


@dataclass(frozen=True)
class YRange:
    """A timeline's y-limits and scale: values outside ``[lo, hi]`` are drawn on the edge."""

    lo: float
    hi: float
    log: bool


def y_range(values: FloatArray, healthy: BoolArray, log_ratio: float) -> YRange | None:
    """The y-range that keeps the healthy part readable, or None when no value is finite.

    The reference values are the finite ``healthy`` ones (the steps before the first
    warning or error); with fewer than ``MIN_HEALTHY`` of them, all finite values with
    their 1 % and 99 % quantiles as the reference range. The scale is logarithmic when
    the reference is positive and spans ``log_ratio``. The range reaches down to the
    smallest finite value (a loss that keeps falling after a recovered fault stays
    visible) and up to the largest one, but at most half a reference span above the
    reference (in log10 units on a log scale), plus a 5 % margin: a blow-up lies beyond.

    Example:
        >>> r = y_range(np.array([1.0, 2.0, 1.5, 1.2, 1.1, 1e30]), np.arange(6) < 5, 100.0)
        >>> (round(r.lo, 3), round(r.hi, 3), r.log)
        (0.925, 2.575, False)
    """
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    reference = values[healthy & np.isfinite(values)]
    if reference.size >= MIN_HEALTHY:
        ref_lo, ref_hi = float(reference.min()), float(reference.max())
    else:
        reference = finite
        ref_lo, ref_hi = (float(q) for q in np.quantile(finite, [0.01, 0.99]))
    log = bool((reference > 0).all() and reference.max() >= log_ratio * reference.min())
    shown = finite[finite > 0] if log else finite

    def t(x: float) -> float:
        return math.log10(x) if log else x

    span = t(ref_hi) - t(ref_lo)
    if span <= 0:  # a constant reference: one decade, or a fifth of its size
        span = 1.0 if log else max(abs(ref_hi) * 0.2, 1e-12)
    lo = min(t(float(shown.min())), t(ref_lo))
    hi = min(t(float(shown.max())), t(ref_hi) + 0.5 * span)
    hi = max(hi, t(ref_hi))
    margin = 0.05 * hi - 0.05 * lo if hi > lo else 0.05 * span  # no overflow near 1e308
    limit = MAX_LOG10 if log else 10.0**MAX_LOG10  # a range matplotlib can draw
    lo, hi = max(lo - margin, -limit), min(hi + margin, limit)
    return YRange(10.0**lo, 10.0**hi, True) if log else YRange(lo, hi, False)


def off_scale(values: FloatArray, shown: YRange | None) -> tuple[BoolArray, BoolArray, BoolArray]:
    """The values drawn on the axis edge: (above the range or +Inf, below or -Inf, NaN).

    On a log scale zero and negative values are below the range.

    Example:
        >>> masks = off_scale(np.array([1.0, 50.0, np.inf, -np.inf, np.nan]),
        ...                   YRange(0.0, 10.0, False))
        >>> [np.flatnonzero(m).tolist() for m in masks]
        [[1, 2], [3], [4]]
    """
    nan = np.isnan(values)
    if shown is None:
        return np.isposinf(values), np.isneginf(values), nan
    with np.errstate(invalid="ignore"):
        high = ~nan & (values > shown.hi)
        low = ~nan & ((values < shown.lo) | ((values <= 0) if shown.log else False))
    return high, low, nan


def _scaled_series(ax: Axes, run: RunData, values: FloatArray, log_ratio: float) -> YRange | None:
    """Apply the healthy y-range to ``ax`` and draw the final rows beyond it on its edge."""
    onset = run.first_attention_step
    healthy = run.final if onset is None else run.final & (run.steps < onset)
    shown = y_range(values[run.final], healthy[run.final], log_ratio)
    if shown is not None:
        if shown.log:
            ax.set_yscale("log")
        ax.set_ylim(shown.lo, shown.hi)
    high, low, nan = off_scale(values, shown)
    edge = ax.get_xaxis_transform()  # x in steps, y in axes fractions
    for mask, y, marker, color in ((high, 0.985, "^", DARK_RED), (low, 0.015, "v", DARK_RED)):
        steps = run.steps[mask & run.final]
        if steps.size:
            ax.plot(steps, np.full(steps.size, y), marker, color=color, ms=5, transform=edge,
                    clip_on=False, zorder=6)  # fmt: skip
    steps = run.steps[nan & run.final]
    if steps.size:
        ax.plot(steps, np.full(steps.size, 0.985), "x", color=RED, ms=4, transform=edge,
                clip_on=False, zorder=6)  # fmt: skip
    return shown


def _off_scale_handles(values: FloatArray, run: RunData, shown: YRange | None) -> list[Any]:
    """Legend entries for the edge markers that were drawn."""
    from matplotlib.lines import Line2D

    high, low, nan = off_scale(values, shown)
    handles: list[Any] = []
    if (high & run.final).any():
        handles.append(Line2D([], [], color=DARK_RED, marker="^", ls="", label="off scale (above)"))
    if (low & run.final).any():
        handles.append(Line2D([], [], color=DARK_RED, marker="v", ls="", label="off scale (below)"))
    if (nan & run.final).any():
        handles.append(Line2D([], [], color=RED, marker="x", ls="", label="NaN"))
    return handles


# --- the figures --------------------------------------------------------------------------


def _over_steps(
    run: RunData, height: float, column: str, label: str, color: str
) -> tuple[Figure, Axes, FloatArray, list[Any]]:
    """A figure of one column over the steps: the figure, its axes, the values, the handles."""
    fig = _figure(height)
    ax = fig.subplots()
    values = run.column(column)
    return fig, ax, values, _series(ax, run, values, label, color)


def _finish(fig: Figure, ax: Axes, handles: list[Any], ylabel: str, **grid: Any) -> Figure:
    """Label the step axis and ``ylabel``, draw the grid and the legend; return ``fig``."""
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, **grid)
    _legend(ax, handles)
    return fig


def draw_loss(run: RunData) -> Figure:
    """Loss over steps with skipped steps, loss spikes, rollbacks and cool-downs marked."""
    fig, ax, loss, handles = _over_steps(run, 3.4, "loss", "loss", BLUE)
    shown = _scaled_series(ax, run, loss, log_ratio=100.0)
    handles += _mark_events(ax, run, "loss", top=math.inf if shown is None else shown.hi)
    handles += _off_scale_handles(loss, run, shown)
    return _finish(fig, ax, handles, "loss")


def clip_threshold(config: dict[str, Any]) -> float | None:
    """The fixed threshold of a ``NormClip`` from ``meta.json``'s config, else None.

    Example:
        >>> clip_threshold({"clip": "NormClip(max_norm=1.0, norm_type=2.0)"})
        1.0
    """
    found = re.match(r"NormClip\(max_norm=([-+0-9.eE]+|inf)", str(config.get("clip", "")))
    try:
        return float(found.group(1)) if found else None
    except ValueError:  # e.g. "max_norm=e" in a hand-edited meta.json
        return None


def draw_grad_norm(run: RunData) -> Figure:
    """Global gradient norm, the norm after clipping where it differs, and the events."""
    from matplotlib.lines import Line2D

    fig, ax, norm, handles = _over_steps(run, 3.6, "grad_norm", "global gradient norm", "black")
    clipped = run.column("clipped_norm")
    with np.errstate(invalid="ignore"):  # Inf - Inf where both norms overflowed
        differs = run.final & np.isfinite(clipped) & (np.abs(clipped - norm) > 1e-6 * np.abs(norm))
    if differs.any():
        ax.plot(run.steps[differs], clipped[differs], ".", color=ORANGE, ms=4)
        handles.append(
            Line2D([], [], color=ORANGE, marker=".", ls="", label="after clipping (clip threshold)")
        )
    shown = _scaled_series(ax, run, norm, log_ratio=10.0)
    threshold = clip_threshold(run.meta.get("config", {}))
    if threshold is not None:
        ax.axhline(threshold, color=ORANGE, ls="--", lw=1.0)
        where = " (above the plot)" if shown is not None and threshold > shown.hi else ""
        label = f"max_norm = {threshold:g}{where}"
        handles.append(Line2D([], [], color=ORANGE, ls="--", label=label))
    handles += _mark_events(ax, run, "grad_norm", top=math.inf if shown is None else shown.hi)
    handles += _off_scale_handles(norm, run, shown)
    return _finish(fig, ax, handles, "gradient norm (L2)", which="both")


def draw_lr(run: RunData) -> Figure:
    """Learning rate over steps (cool-downs included: the guard logs the LR it applied)."""
    fig, ax, lr, handles = _over_steps(run, 2.4, "lr", "learning rate", "#2ca02c")
    handles += _mark_spans(ax, run)
    _log_if_wide(ax, lr, ratio=10.0)
    return _finish(fig, ax, handles, "learning rate")


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


def _mark_onsets(ax: Axes, run: RunData, rows: int, span: tuple[float, float]) -> bool:
    """Thin lines and a triangle above the axes at each warning or error's first step.

    Only onsets within ``span`` (the heatmap's steps) are marked. Returns whether
    anything was marked (the title then says what the triangles are).
    """
    colors = {"warning": ORANGE, "error": RED}
    marked = False
    for level, color in colors.items():
        onsets = sorted(
            {
                int(e["first_step"])
                for e in run.events
                if severity(e) == level and span[0] <= int(e["first_step"]) <= span[1]
            }
        )
        if not onsets:
            continue
        marked = True
        ax.vlines(onsets, -0.5, rows - 0.5, color="white", lw=0.6, alpha=0.7, zorder=3)
        ax.plot(onsets, np.full(len(onsets), 1.0), "v", color=color, ms=6, mec="black", mew=0.4,
                transform=ax.get_xaxis_transform(), clip_on=False, zorder=4)  # fmt: skip
    return marked


def _layer_heatmap(
    run: RunData, steps: npt.NDArray[np.int64], values: FloatArray, label: str, what: str
) -> Figure:
    """A layers x steps heatmap of ``values`` [step, layer], log colour, events on top.

    Non-finite cells are red, zero (or not measured) cells grey; more steps than
    ``MAX_COLUMNS`` are binned by geometric mean.
    """
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap, LogNorm

    names = run.layer_names
    mean, bad = binned_log_norms(values, MAX_COLUMNS)
    shown_values = np.ma.masked_invalid(10.0**mean).T
    fig = _figure(max(2.6, min(14.0, 0.2 * len(names) + 1.4)))
    ax = fig.subplots()
    extent = (float(steps[0]) - 0.5, float(steps[-1]) + 0.5, len(names) - 0.5, -0.5)
    cmap = colormaps["viridis"].with_extremes(bad="#dddddd")
    finite = shown_values.compressed()
    norm = LogNorm(vmin=finite.min(), vmax=finite.max()) if finite.size else None
    shown: dict[str, Any] = {"aspect": "auto", "extent": extent, "interpolation": "nearest"}
    image = ax.imshow(shown_values, cmap=cmap, norm=norm, **shown)
    if bad.any():
        overlay = np.ma.masked_equal(bad.T, 0.0)
        ax.imshow(overlay, cmap=ListedColormap([RED]), vmin=0, vmax=1, **shown)
    fig.colorbar(image, ax=ax, label=label, pad=0.01)
    marked = _mark_onsets(ax, run, len(names), (extent[0], extent[1]))
    ax.set_xlim(extent[0], extent[1])
    _layer_ticks(ax, names)
    ax.set_xlabel("step")
    ax.set_ylabel("layer (input at top)")
    binned = (
        f"; {len(steps)} steps binned into {mean.shape[0]} columns"
        if len(steps) > mean.shape[0]
        else ""
    )
    onsets = "; triangles: warning/error onsets" if marked else ""
    ax.set_title(f"red: NaN/Inf, grey: {what}{binned}{onsets}", fontsize=8, loc="right")
    return fig


def draw_heatmap(run: RunData) -> Figure:
    """Per-layer gradient norm over steps, log colour, layers in depth order (input on top)."""
    steps, norms = run.layer_matrix
    return _layer_heatmap(run, steps, norms, "gradient norm (log scale)", "zero")


def forward_fill(values: FloatArray, measured: BoolArray) -> tuple[FloatArray, BoolArray]:
    """Each cell's latest measured value at or before its row, and whether there is one.

    Example:
        >>> filled, known = forward_fill(np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]]),
        ...                              np.array([[True, False], [False, True], [False, False]]))
        >>> filled.tolist(), known.tolist()
        ([[1.0, 0.0], [1.0, 2.0], [1.0, 2.0]], [[True, False], [True, True], [True, True]])
    """
    rows = np.arange(values.shape[0])[:, None]
    latest = np.maximum.accumulate(np.where(measured, rows, -1), axis=0)
    known = latest >= 0
    filled = np.take_along_axis(values, np.maximum(latest, 0), axis=0)
    return np.where(known, filled, 0.0), known


def draw_update_ratio(run: RunData) -> Figure:
    """Per-layer update ratio ||weight change|| / ||weights|| over steps, log colour."""
    steps, ratios, measured = run.update_ratio_matrix
    filled, _ = forward_fill(ratios, measured)  # not yet measured: 0, drawn grey
    return _layer_heatmap(
        run, steps, filled, "update ratio |Δw| / |w| (log scale)", "zero or not yet measured"
    )


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
        "Loss at every step. Red lines: skipped steps; orange triangles: loss spikes; grey "
        "bands: steps undone by a rollback; blue bands: the LR cool-down after it. The "
        "y-range is that of the steps before the first warning or error: values far above "
        "it are dark-red triangles on the top edge, NaN values red crosses there.",
        ("loss",),
        draw_loss,
    ),
    Plot(
        "grad_norm",
        "Global gradient norm",
        "Global L2 norm of the gradients before clipping, and after clipping where the "
        "policy shrank it. Non-finite norms are gaps at the red lines (skipped steps), "
        "marked by red crosses (NaN) or triangles (Inf) on the top edge; as on the loss "
        "plot, the y-range comes from the steps before the first warning or error and "
        "values far beyond it are triangles on the edge.",
        ("grad_norm",),
        draw_grad_norm,
    ),
    Plot("lr", "Learning rate", "The learning rate applied at each step.", ("lr",), draw_lr),
    Plot(
        "heatmap",
        "Per-layer gradient norm over steps",
        "Each row a layer, input at the top; log colour. Dark rows near the top that stay "
        "dark are vanishing gradients, bright rows exploding ones. Triangles above and "
        "thin white lines: onsets of warnings (orange) and errors (red).",
        ("layer_norms",),
        draw_heatmap,
    ),
    Plot(
        "update_ratio",
        "Per-layer update ratio over steps",
        "Each row a layer, input at the top; log colour of |Δw| / |w|, the size of a step's "
        "weight change relative to the weights (about 1e-3 is a common rule of thumb; much "
        "larger points to a learning rate too high for that layer, much smaller to a layer "
        "that barely learns). "
        "The guard measures a rotating subset of layers at some steps only, so each cell "
        "shows the layer's latest measurement at or before that column (forward-filled); "
        "grey: zero or not yet measured. Triangles above: onsets of warnings (orange) and "
        "errors (red).",
        ("update_ratio",),
        draw_update_ratio,
        optional=True,
    ),
    Plot(
        "layer_bars",
        "Per-layer gradient norm, start and end",
        "Median per-layer norm over the first and the last steps logged.",
        ("layer_norms",),
        draw_layer_bars,
    ),
)
