"""Figure helpers for the lab: figures drawn without pyplot, so the caller's backend is kept.

``matplotlib.figure.Figure`` renders to PNG with the Agg canvas by itself; nothing here
calls ``matplotlib.use`` or registers the figure with pyplot's global state.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def new_figure(nrows: int = 1, ncols: int = 1, **options: Any) -> tuple[Figure, Any]:
    """Return a figure and its axes, as ``plt.subplots`` would, without pyplot.

    ``figsize`` goes to the figure; every other option (``sharey``, ``squeeze``, ...) to
    :meth:`Figure.subplots`.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=options.pop("figsize", None))
    return fig, fig.subplots(nrows, ncols, **options)


def positive_or_nan(values: Sequence[Any]) -> list[float]:
    """``values`` as floats for a log axis: zero, negative and non-finite ones become NaN."""
    out = []
    for v in values:
        x = float(v)
        out.append(x if x > 0 and math.isfinite(x) else math.nan)
    return out


def block_means(values: Sequence[float], width: int = 10) -> list[float]:
    """Mean over consecutive blocks of ``width`` steps (NaN where a block has no finite value)."""
    out = []
    for i in range(0, len(values), width):
        block = [v for v in values[i : i + width] if math.isfinite(v)]
        out.append(statistics.fmean(block) if block else math.nan)
    return out


def finish(
    fig: Figure, title: str, axes: Iterable[Any] = (), legend: float | None = None
) -> Figure:
    """Grid ``axes`` (with legends of font size ``legend`` if given), title and lay out ``fig``."""
    for ax in axes:
        ax.grid(True, which="major", alpha=0.3)
        if legend is not None:
            ax.legend(fontsize=legend)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
