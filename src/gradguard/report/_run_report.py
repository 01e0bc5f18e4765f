"""``RUN_DIR/report.html`` for one guarded run (the files of ``docs/run-format.md``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gradguard.report._data import RunData, load_run, number, severity
from gradguard.report._figures import PLOTS, missing_fields, png
from gradguard.report._html import definitions, esc, image, page, table, write_page
from gradguard.report._verdict import verdict

REPORT_FILE = "report.html"
_EVENT_COLUMNS = (
    "step",
    "severity",
    "kind",
    "metric",
    "value",
    "threshold",
    "layers",
    "message",
)


def render_plots(run: RunData) -> str:
    """Every figure as an inline PNG, or a note saying which fields it lacks."""
    out = []
    for plot in PLOTS:
        head = f'<h3 id="fig-{plot.key}">{esc(plot.title)}</h3>'
        missing = missing_fields(run, plot.needs)
        if missing:
            reasons = "; ".join(missing)
            out.append(
                f'<div class="skipped" data-skipped="{plot.key}">{head}'
                f'<p class="note">Skipped: {esc(reasons)}.</p></div>'
            )
            continue
        fig = plot.draw(run)
        out.append(
            f"<figure>{head}{image(png(fig), plot.title, plot.key)}"
            f"<figcaption>{esc(plot.caption)}</figcaption></figure>"
        )
    return "\n".join(out)


def _layers_cell(layers: Any) -> str:
    names = [str(n) for n in layers or ()]
    more = f" (+{len(names) - 6} more)" if len(names) > 6 else ""
    return ", ".join(names[:6]) + more


def render_events(run: RunData) -> str:
    """The event table, in step order (escaped: messages and layer names are text)."""
    if not run.events:
        return '<p class="note">No events.</p>'
    events = sorted(run.events, key=lambda e: number(e.get("step")))
    rows = [
        (
            int(number(e.get("step"))),
            severity(e),
            e.get("kind", ""),
            e.get("metric", ""),
            number(e.get("value")),
            number(e.get("threshold")),
            _layers_cell(e.get("layers")),
            e.get("message", ""),
        )
        for e in events
    ]
    return table(_EVENT_COLUMNS, rows, numeric=(0, 4, 5), table_id="events-table")


def render_config(run: RunData) -> str:
    """The guard's configuration, the versions and the layers, from ``meta.json``."""
    meta = run.meta
    if not meta:
        return '<p class="note">No meta.json: the configuration is unknown.</p>'
    parts = [definitions(dict(meta.get("config", {})))]
    about = {
        "format_version": meta.get("format_version", "?"),
        "layers": len(meta.get("layer_names", [])),
        "trainable tensors": len(meta.get("tensor_names", [])),
        **{f"{k} version": v for k, v in dict(meta.get("versions", {})).items()},
    }
    parts.append(definitions(about))
    names = run.layer_names
    if names:
        rows = [(i, name) for i, name in enumerate(names)]
        parts.append(
            f"<details><summary>Layers in depth order ({len(names)})</summary>"
            f"{table(('depth', 'layer'), rows, numeric=(0,))}</details>"
        )
    return "\n".join(parts)


def build_report(run: RunData) -> str:
    """The whole page for one run."""
    level, sentence = verdict(run)
    notes = "".join(f"<li>{esc(n)}</li>" for n in run.notes)
    body = [
        "<header><h1>gradguard report</h1>",
        f'<p class="path">{esc(run.run_dir.resolve())}</p>',
        f'<p class="verdict {level}" id="verdict">{esc(sentence)}</p></header>',
        '<nav><a href="#plots">Plots</a><a href="#events">Events</a>'
        '<a href="#config">Configuration</a></nav>',
        f'<section id="plots"><h2>Plots</h2>{render_plots(run)}</section>',
        f'<section id="events"><h2>Events ({len(run.events)})</h2>{render_events(run)}</section>',
        f'<section id="config"><h2>Configuration</h2>{render_config(run)}</section>',
    ]
    if notes:
        body.append(f'<section id="notes"><h2>Reading notes</h2><ul>{notes}</ul></section>')
    body.append(
        '<footer class="note">Made by <code>gradguard report</code> from meta.json, '
        "metrics.jsonl, layers.jsonl and events.jsonl.</footer>"
    )
    return page(f"gradguard report: {run.run_dir.name}", "\n".join(body))


def write_run_report(run_dir: Path) -> Path:
    """Read ``run_dir`` and write ``run_dir/report.html``; return its path."""
    return write_page(run_dir / REPORT_FILE, build_report(load_run(run_dir)))
