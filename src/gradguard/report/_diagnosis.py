"""Figures for a diagnosis page, drawn from ``Diagnosis.to_dict()`` data (no torch here).

Three pictures: the gradient flow by depth (the picture of vanishing and exploding
gradients before training), the saturated and dead fractions of the activations, and the
input-output Jacobian's largest singular values against 1 (dynamical isometry). A figure
whose data the diagnosis lacks is left out.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from gradguard.report._figures import _figure, png

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _value(entry: Mapping[str, Any], key: str) -> float | None:
    raw = entry.get(key)
    if raw is None:
        return None
    number = float(raw)  # "inf"/"nan" strings from to_dict() parse too
    return number if math.isfinite(number) and number > 0 else None


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def draw_gradient_flow(data: Mapping[str, Any]) -> Figure | None:
    """Output-gradient norm of each layer relative to the last one, by depth (log scale)."""
    layers: Sequence[Mapping[str, Any]] = data.get("layers", ())
    points = [
        (layer["name"], value)
        for layer in layers
        if (value := _value(layer, "relative_grad")) is not None
    ]
    if len(points) < 2:
        return None
    fig = _figure(3.6)
    ax = fig.add_subplot()
    ax.plot(range(len(points)), [v for _, v in points], marker="o", color="#1f77b4")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    threshold = float(data.get("thresholds", {}).get("ratio", 1e3))
    for bound in (threshold, 1.0 / threshold):
        ax.axhline(bound, color="#d62728", linestyle="--", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(points)), [_short(n) for n, _ in points], rotation=60, ha="right")
    ax.set_ylabel("gradient at the layer's output\n/ at the last layer's")
    ax.set_title("Gradient flow by depth (dashed: the verdict's thresholds)")
    return fig


def draw_activations(data: Mapping[str, Any]) -> Figure | None:
    """Saturated fraction (sigmoid/tanh-like) and dead fraction (ReLU family) per layer."""
    rows = [
        (layer["name"], layer.get("saturated_fraction"), layer.get("dead_fraction"))
        for layer in data.get("layers", ())
        if layer.get("saturated_fraction") is not None or layer.get("dead_fraction") is not None
    ]
    if not rows:
        return None
    fig = _figure(3.4)
    ax = fig.add_subplot()
    xs = range(len(rows))
    saturated = [float(s) if s is not None else 0.0 for _, s, _ in rows]
    dead = [float(d) if d is not None else 0.0 for _, _, d in rows]
    ax.bar([x - 0.2 for x in xs], saturated, width=0.4, label="saturated", color="#ff7f0e")
    ax.bar([x + 0.2 for x in xs], dead, width=0.4, label="dead", color="#7f7f7f")
    ax.set_ylim(0, 1)
    ax.set_xticks(list(xs), [_short(n) for n, _, _ in rows], rotation=60, ha="right")
    ax.set_ylabel("fraction of units")
    ax.set_title("Activation saturation and dead units")
    ax.legend()
    return fig


def draw_jacobian(data: Mapping[str, Any]) -> Figure | None:
    """The Jacobian's largest singular values, with 1 (isometry) and the mean squared one."""
    jacobian = data.get("jacobian")
    if not jacobian or not jacobian.get("top_singular_values"):
        return None
    values = [float(v) for v in jacobian["top_singular_values"]]
    fig = _figure(3.2)
    ax = fig.add_subplot()
    ax.plot(range(1, len(values) + 1), values, marker="o", color="#2ca02c", label="largest")
    ax.axhline(1.0, color="grey", linewidth=0.8, label="isometry (1)")
    mean_sq = jacobian.get("mean_squared_singular_value")
    if mean_sq is not None and math.isfinite(float(mean_sq)) and float(mean_sq) > 0:
        rms = math.sqrt(float(mean_sq))
        ax.axhline(rms, color="#9467bd", linestyle="--", label=f"root mean square ({rms:.3g})")
    if all(v > 0 for v in values):
        ax.set_yscale("log")
    ax.set_xlabel("rank")
    ax.set_ylabel("singular value")
    ax.set_title("Input-output Jacobian: largest singular values")
    ax.legend()
    return fig


FIGURES: tuple[tuple[str, Callable[[Mapping[str, Any]], Figure | None]], ...] = (
    ("Gradient flow by depth", draw_gradient_flow),
    ("Activation saturation and dead units", draw_activations),
    ("Jacobian singular values", draw_jacobian),
)


def figures_html(data: Mapping[str, Any]) -> str:
    """``<img>`` elements (inline PNG) for every figure the diagnosis has data for."""
    parts = []
    for title, draw in FIGURES:
        fig = draw(data)
        if fig is None:
            continue
        encoded = base64.b64encode(png(fig)).decode("ascii")
        parts.append(
            f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{encoded}">'
            f"<figcaption>{html.escape(title)}</figcaption></figure>"
        )
    return "\n".join(parts)
