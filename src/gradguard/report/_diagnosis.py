"""A diagnosis as text and as an HTML page with its figures (no torch, no rich here).

Everything is drawn from ``Diagnosis.to_dict()`` data, where non-finite numbers are the
strings ``"inf"``, ``"-inf"`` and ``"nan"``: :class:`gradguard.diagnose.Diagnosis`
imports this module when it is printed or saved, and the report never imports torch
nor the diagnosis.

* :func:`render_text`: the plain-text tables of ``str(diagnosis)``;
* :func:`layer_rows`, :func:`recurrent_rows`, :func:`jacobian_line`: the cells, shared with
  the rich tables of :mod:`gradguard.diagnose.console` (this package never imports rich);
* :func:`render_page`, :func:`save_page`: a self-contained HTML page (the shared
  :mod:`gradguard.report._html` layout) with three pictures when matplotlib is installed:
  the gradient flow by depth (the picture of vanishing and exploding gradients before
  training), the saturated and dead fractions of the activations, and the input-output
  Jacobian's largest singular values against 1 (dynamical isometry). A figure whose data
  the diagnosis lacks is left out.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradguard.report._data import number
from gradguard.report._figures import _figure, png
from gradguard.report._html import esc, page, table, write_page

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
            f'<figure><img alt="{esc(title)}" src="data:image/png;base64,{encoded}">'
            f"<figcaption>{esc(title)}</figcaption></figure>"
        )
    return "\n".join(parts)


# --------------------------------------------------------------------------- tables


def _fmt(value: Any) -> str:
    """A measurement for a table cell: 3 significant digits (e-notation outside [0.01, 10⁴)).

    Integers are shown as they are, a missing value as ``-``. Shorter than
    :func:`gradguard.report._html.fmt` (4 digits, empty for none): a layer table has
    twelve columns and must fit a console.
    """
    if value is None:
        return "-"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    value = number(value)  # "inf"/"-inf"/"nan" from to_dict() too
    if not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-2):
        return f"{value:.2e}"
    return f"{value:.3g}"


LAYER_COLUMNS = (
    "#", "layer", "type", "mean", "std", "sat/dead", "grad (params)", "grad (output)",
    "relative", "σmax(W)", "gain", "flags",
)  # fmt: skip
"""Columns of the layer table, in full (plain text, HTML, wide consoles)."""

_LAYER_TEXT = {"layer", "type", "sat/dead", "flags"}  # left-aligned; the others are numbers

NARROW_COLUMNS = ("layer", "type", "std", "sat/dead", "relative", "flags")
"""Columns a console narrower than :data:`WIDE_CONSOLE` characters shows."""

WIDE_CONSOLE = 150

RECURRENT_COLUMNS = (
    "module", "type", "steps", "decay (first/last)", "spectral radius", "forget gate", "flags",
)  # fmt: skip

_RECURRENT_TEXT = {"module", "type", "forget gate", "flags"}

_SHOWN_LAYERS = 6  # layers a recommendation names in text (the page names them all)


def _units(layer: Mapping[str, Any]) -> str:
    if layer.get("saturated_fraction") is not None:
        return f"{number(layer['saturated_fraction']):.0%} sat"
    if layer.get("dead_fraction") is not None:
        return f"{number(layer['dead_fraction']):.0%} dead"
    return "-"


def layer_rows(data: Mapping[str, Any], columns: Sequence[str] = LAYER_COLUMNS) -> list[list[str]]:
    """One row of cells per layer, in run order, for ``columns`` (the flags last)."""
    rows = []
    for layer in data.get("layers", ()):
        follower = layer.get("followed_by")
        cells = {
            "#": str(layer["index"]),
            "layer": layer["name"],
            "type": layer["kind"] + (f" → {follower}" if follower else ""),
            "mean": _fmt(layer.get("activation_mean")),
            "std": _fmt(layer.get("activation_std")),
            "sat/dead": _units(layer),
            "grad (params)": _fmt(layer.get("grad_norm")),
            "grad (output)": _fmt(layer.get("output_grad_norm")),
            "relative": _fmt(layer.get("relative_grad")),
            "σmax(W)": _fmt(layer.get("weight_sv_max")),
            "gain": _fmt(layer.get("gain")),
            "flags": " ".join(layer.get("flags", ())),
        }
        rows.append([cells[column] for column in columns])
    return rows


def recurrent_rows(data: Mapping[str, Any]) -> list[list[str]]:
    """One row of :data:`RECURRENT_COLUMNS` cells per recurrent module."""
    rows = []
    for rnn in data.get("recurrent", ()):
        radius = max((number(v) for v in rnn.get("spectral_radius", {}).values()), default=None)
        gate = rnn.get("forget_gate")
        forget = "-"
        if gate is not None:
            forget = f"mean {number(gate['mean']):.2f}, bias {number(gate['bias']):.2g}"
        rows.append(
            [
                rnn["name"],
                rnn["kind"],
                _fmt(rnn.get("steps")),
                _fmt(rnn.get("decay")),
                _fmt(radius),
                forget,
                " ".join(rnn.get("flags", ())) or (rnn.get("note") or ""),
            ]
        )
    return rows


def jacobian_line(jac: Mapping[str, Any] | None) -> str:
    """The Jacobian's measurements in one sentence."""
    if jac is None:
        return "Jacobian: not measured"
    top = ", ".join(_fmt(v) for v in jac["top_singular_values"])
    how = "exact" if jac["exact"] else f"{jac['products']} products"
    rms = math.sqrt(number(jac["mean_squared_singular_value"]))
    return (
        f"Jacobian (per example, {jac['out_features']} x {jac['in_features']}, mean of "
        f"{jac['samples']}; {how}): largest singular values {top}; rms singular value "
        f"{_fmt(rms)} (isometry: 1)"
    )


def layer_list(layers: Sequence[str]) -> str:
    """The first layers a recommendation names, comma separated, ``...`` for the rest."""
    more = ", ..." if len(layers) > _SHOWN_LAYERS else ""
    return ", ".join(layers[:_SHOWN_LAYERS]) + more


# --------------------------------------------------------------------------- text


def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return lines


def _recommendation_text(rec: Mapping[str, Any]) -> str:
    """As ``str(Recommendation)``: code, message, the first layers, the source."""
    where = f" [{layer_list(rec['layers'])}]" if rec["layers"] else ""
    return f"{rec['code']}: {rec['message']}{where} ({rec['source']})"


def render_text(data: Mapping[str, Any]) -> str:
    """The diagnosis as plain text: verdict, reasons, tables, recommendations, notes."""
    lines = [f"gradguard diagnosis: {data['verdict'].upper()}"]
    lines += [f"  - {reason}" for reason in data["reasons"]]
    lines += ["", *_text_table(LAYER_COLUMNS, layer_rows(data))]
    lines += ["", jacobian_line(data.get("jacobian"))]
    if data.get("recurrent"):
        lines += ["", *_text_table(RECURRENT_COLUMNS, recurrent_rows(data))]
    if data.get("recommendations"):
        lines += ["", "Recommendations:"]
        lines += [f"  - {_recommendation_text(rec)}" for rec in data["recommendations"]]
    if data.get("notes"):
        lines += ["", "Notes:", *(f"  - {note}" for note in data["notes"])]
    return "\n".join(lines)


# --------------------------------------------------------------------------- HTML

_VERDICT_CLASS = {"healthy": "ok", "vanishing": "warn", "exploding": "bad"}


def _flag_classes(rows: Sequence[Sequence[str]]) -> dict[tuple[int, int], str]:
    """The flags cell of a flagged row: ``fail`` when exploding or non-finite, else ``warn``."""
    classes = {}
    for i, row in enumerate(rows):
        flags = row[-1]
        if flags:
            bad = "exploding" in flags or "nonfinite" in flags
            classes[(i, len(row) - 1)] = "fail" if bad else "warn"
    return classes


def _html_table(columns: Sequence[str], rows: Sequence[Sequence[str]], text: set[str]) -> str:
    numeric = [j for j, column in enumerate(columns) if column not in text]
    return table(columns, rows, numeric=numeric, cell_class=_flag_classes(rows))


def _figures(data: Mapping[str, Any]) -> str:
    """The page's plots (gradient flow, saturation, Jacobian), when matplotlib is here."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return '<p class="note">Install matplotlib (the report extra) for the plots.</p>'
    return "<h2>Plots</h2>\n" + figures_html(data)


def _items(texts: Sequence[str]) -> str:
    return "<ul>" + "".join(f"<li>{esc(text)}</li>" for text in texts) + "</ul>"


def render_page(data: Mapping[str, Any]) -> str:
    """A complete, self-contained HTML page: no script, no network, every name escaped."""
    verdict = data["verdict"]
    parts = [
        f"<header><h1>gradguard diagnosis: {esc(verdict)}</h1>",
        f'<div class="verdict {_VERDICT_CLASS.get(verdict, "warn")}" id="verdict">'
        f"{_items(data['reasons'])}</div></header>",
        "<h2>Layers, in the order they run</h2>",
        _html_table(LAYER_COLUMNS, layer_rows(data), _LAYER_TEXT),
        f"<p>{esc(jacobian_line(data.get('jacobian')))}</p>",
        _figures(data),
    ]
    if data.get("recurrent"):
        parts += ["<h2>Recurrent modules</h2>"]
        parts += [_html_table(RECURRENT_COLUMNS, recurrent_rows(data), _RECURRENT_TEXT)]
    if data.get("recommendations"):
        items = "".join(
            f"<li><b>{esc(r['code'])}</b>: {esc(r['message'])}"
            + (f" <i>[{esc(', '.join(r['layers']))}]</i>" if r["layers"] else "")
            + f" <small>({esc(r['source'])})</small></li>"
            for r in data["recommendations"]
        )
        parts += ["<h2>Recommendations</h2>", f"<ul>{items}</ul>"]
    if data.get("notes"):
        parts += ["<h2>Notes</h2>", _items(data["notes"])]
    return page(f"gradguard diagnosis: {verdict}", "\n".join(parts))


def save_page(data: Mapping[str, Any], path: Path) -> Path:
    """Write :func:`render_page` to ``path`` (a temporary file, then a rename)."""
    return write_page(path, render_page(data))
