"""Small HTML building blocks: one self-contained page, escaped text, inline PNG images.

The page carries a Content-Security-Policy that allows nothing but inline styles and
``data:`` images: it opens from disk and can never reach the network.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gradguard._files import write_text_atomic

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222;
       max-width: 1180px; margin: 0 auto; padding: 0 20px 40px; }
h1 { font-size: 22px; margin: 18px 0 4px; }
h2 { font-size: 17px; margin: 26px 0 6px; border-bottom: 1px solid #ddd; }
h3 { font-size: 15px; margin: 18px 0 4px; }
.path { color: #666; font-family: ui-monospace, monospace; font-size: 12px; }
.verdict { font-size: 16px; padding: 10px 14px; border-radius: 6px; border-left: 6px solid; }
.verdict.ok { background: #eaf7ea; border-color: #2ca02c; }
.verdict.warn { background: #fff5e0; border-color: #ff9f0e; }
.verdict.bad { background: #fdecec; border-color: #d62728; }
nav a { margin-right: 14px; }
figure { margin: 10px 0 22px; }
img.plot { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption, .note { color: #555; font-size: 13px; }
.skipped { background: #f6f6f6; padding: 8px 12px; border-radius: 4px; }
table { border-collapse: collapse; margin: 6px 0 14px; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.pass { color: #1a7f1a; font-weight: 600; } td.fail { color: #c01818; font-weight: 600; }
td.warn { color: #9a6700; font-weight: 600; }
ol.episodes { padding-left: 22px; }
li.episode { margin: 8px 0 12px; padding: 6px 10px; border-left: 4px solid #ff9f0e;
             background: #fffaf0; }
li.episode.error { border-color: #d62728; background: #fdf3f3; }
li.episode p { margin: 3px 0; }
.cause { font-weight: 600; }
.evidence { color: #333; }
.stop { padding: 6px 10px; background: #fdecec; border-left: 4px solid #d62728; }
.no-action { padding: 6px 10px; background: #eaf7ea; border-left: 4px solid #2ca02c; }
code, pre { font-family: ui-monospace, monospace; font-size: 12px; }
pre { background: #f6f6f6; padding: 8px; overflow-x: auto; }
"""


def esc(value: object) -> str:
    """Text escaped for HTML content and attributes."""
    return html.escape(str(value), quote=True)


def fmt(value: object) -> str:
    """A number for a table cell: 4 significant digits; text and None as they are."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int) or value == 0 or not math.isfinite(value):
        return str(value)
    return f"{value:.4g}"


def page(title: str, body: str) -> str:
    """A complete, self-contained HTML document."""
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f"{body}\n</body>\n</html>\n"
    )


def write_page(path: Path, text: str) -> Path:
    """Write via a temporary file and a rename: a reader never sees half a page.

    When the write fails (a full disk, no permission) the temporary file is removed and
    the error raised: the previous page, if any, stays as it was.
    """
    return write_text_atomic(path, text)


def image(data: bytes, alt: str, key: str) -> str:
    """An inline PNG (base64 ``data:`` URL)."""
    encoded = base64.b64encode(data).decode("ascii")
    return (
        f'<img class="plot" id="img-{esc(key)}" alt="{esc(alt)}" '
        f'src="data:image/png;base64,{encoded}">'
    )


def table(
    columns: Sequence[str],
    rows: Iterable[Sequence[object]],
    numeric: Iterable[int] = (),
    cell_class: Mapping[tuple[int, int], str] | None = None,
    table_id: str = "",
) -> str:
    """An HTML table; every cell is escaped. ``numeric`` columns are right-aligned."""
    right = set(numeric)
    classes = dict(cell_class or {})
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = []
    for i, row in enumerate(rows):
        cells = []
        for j, cell in enumerate(row):
            names = " ".join(n for n in ("num" if j in right else "", classes.get((i, j), "")) if n)
            attr = f' class="{names}"' if names else ""
            cells.append(f"<td{attr}>{esc(fmt(cell))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    ident = f' id="{esc(table_id)}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def definitions(items: Mapping[str, Any]) -> str:
    """A two-column table of settings; non-text values as compact JSON."""
    rows = []
    for key, value in items.items():
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            text = fmt(value)
        else:
            text = json.dumps(value, ensure_ascii=False)
        rows.append((key, text))
    return table(("setting", "value"), rows)
