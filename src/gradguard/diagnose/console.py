"""A diagnosis as rich tables: the console rendering behind ``console.print(diagnosis)``.

The cells are those of the plain-text and HTML tables (:mod:`gradguard.report._diagnosis`,
which stays free of rich); rich itself is imported when a console renders, so a diagnosis
needs no rich until then.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from gradguard.report._diagnosis import (
    LAYER_COLUMNS,
    NARROW_COLUMNS,
    RECURRENT_COLUMNS,
    WIDE_CONSOLE,
    jacobian_line,
    layer_list,
    layer_rows,
    recurrent_rows,
)

_STYLE = {"healthy": "bold green", "vanishing": "bold yellow", "exploding": "bold red"}
_RICH_LEFT = ("layer", "type", "flags")


def render_rich(data: Mapping[str, Any], width: int) -> Iterator[Any]:
    """Rich renderables: all columns from :data:`WIDE_CONSOLE` characters, fewer below."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    verdict = data["verdict"]
    yield Text.assemble(("gradguard diagnosis: ", "bold"), (verdict, _STYLE[verdict]))
    for reason in data["reasons"]:
        yield Text(f"  • {reason}")
    columns = LAYER_COLUMNS if width >= WIDE_CONSOLE else NARROW_COLUMNS
    layers = Table(title="Layers, in run order", title_justify="left", box=box.SIMPLE_HEAD)
    for column in columns:
        layers.add_column(column, justify="left" if column in _RICH_LEFT else "right")
    for row in layer_rows(data, columns):
        bad = "exploding" in row[-1] or "nonfinite" in row[-1]
        layers.add_row(*row, style="red" if bad else "yellow" if row[-1] else "")
    yield layers
    yield Text(jacobian_line(data.get("jacobian")))
    if data.get("recurrent"):
        rnn = Table(title="Recurrent modules", title_justify="left", box=box.SIMPLE_HEAD)
        for column in RECURRENT_COLUMNS:
            rnn.add_column(column)
        for row in recurrent_rows(data):
            rnn.add_row(*row)
        yield rnn
    if data.get("recommendations"):
        yield Text("Recommendations", style="bold")
    for rec in data.get("recommendations", ()):
        where = f"[{layer_list(rec['layers'])}] " if rec["layers"] else ""
        yield Text.assemble(
            "  • ",
            (rec["code"], "bold"),
            f": {rec['message']} ",
            (where, "dim"),
            (f"({rec['source']})", "italic"),
        )
    for note in data.get("notes", ()):
        yield Text(f"note: {note}", style="dim")
