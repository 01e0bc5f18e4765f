"""``RUN_DIR/report.html`` for one guarded run (the files of ``docs/run-format.md``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gradguard.report._data import RunData, load_run, severity
from gradguard.report._figures import PLOTS, missing_fields, png
from gradguard.report._html import definitions, esc, fmt, image, page, table, write_page
from gradguard.report._triage import (
    Episode,
    batch_text,
    cause_label,
    episodes,
    kind_text,
    stop_request,
)
from gradguard.report._verdict import verdict

REPORT_FILE = "report.html"
_EVENT_COLUMNS = ("steps", "count", "kind", "severity", "cause", "layers", "batch", "message")
MAX_EPISODES = 8  # the what-happened section; the event table below has them all
MAX_INFO_ROWS = 200  # info events in the table (a scaler's backoffs can number thousands)
MAX_ATTENTION_ROWS = 500  # warnings and errors in the table (old runs: one per NaN step)
MAX_OUTLIERS = 5


def render_plots(run: RunData) -> str:
    """Every figure as an inline PNG, or a note saying which fields it lacks."""
    out = []
    for plot in PLOTS:
        head = f'<h3 id="fig-{plot.key}">{esc(plot.title)}</h3>'
        missing = missing_fields(run, plot.needs)
        if missing and plot.optional:
            continue
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


def _steps_text(first: int, last: int) -> str:
    return f"{first}–{last}" if last > first else str(first)


def _event_row(event: dict[str, Any]) -> tuple[object, ...]:
    return (
        _steps_text(int(event["first_step"]), int(event["last_step"])),
        int(event["count"]),
        kind_text(event),
        severity(event),
        cause_label(event.get("cause")),
        _layers_cell(event.get("layers")),
        batch_text(event.get("batch")),
        event.get("message", ""),
    )


def render_events(run: RunData) -> str:
    """The event table, one row per streak by onset (escaped: messages and names are text).

    Warnings and errors come first in number (up to ``MAX_ATTENTION_ROWS``), then the
    first ``MAX_INFO_ROWS`` info events: a run with thousands of info events keeps a
    page of a readable size, and a note says what was left out.
    """
    if not run.events:
        return '<p class="note">No events.</p>'
    attention = [e for e in run.events if severity(e) != "info"]
    info = [e for e in run.events if severity(e) == "info"]
    shown_ids = {id(e) for e in attention[:MAX_ATTENTION_ROWS] + info[:MAX_INFO_ROWS]}
    shown = [e for e in run.events if id(e) in shown_ids]
    left: list[str] = []
    if len(attention) > MAX_ATTENTION_ROWS:
        left.append(f"the first {MAX_ATTENTION_ROWS} of {len(attention)} warnings and errors")
    if len(info) > MAX_INFO_ROWS:
        left.append(f"the first {MAX_INFO_ROWS} of {len(info)} info events")
    note = (
        f'<p class="note" id="events-cap">Showing {" and ".join(left)}; '
        "every event is in events.jsonl.</p>"
        if left
        else ""
    )
    rows = [_event_row(e) for e in shown]
    return note + table(_EVENT_COLUMNS, rows, numeric=(1,), table_id="events-table")


def _episode_head(episode: Episode) -> str:
    """When (first step, and last and count for a streak), what, why, where, which batch."""
    steps = f"Step {episode.first}"
    if episode.last > episode.first:
        steps = f"Steps {episode.first}–{episode.last}"
    if episode.count > 1:  # a streak counts steps or drains: say how often, not how long
        steps += f" (seen {episode.count} times)"
    head = [f"<b>{esc(steps)}</b>: {esc(', '.join(episode.kinds))}"]
    if episode.cause:
        head.append(f'cause: <span class="cause">{esc(cause_label(episode.cause))}</span>')
    if episode.layers:
        head.append(f"layers: {esc(_layers_cell(episode.layers))}")
    if episode.batches:
        head.append(f"batch: <code>{esc(', '.join(episode.batches[:3]))}</code>")
    return f'<p class="episode-head">{" · ".join(head)}</p>'


def _outliers_html(outliers: list[dict[str, Any]]) -> str:
    """The examples of the batch whose loss stands out, at most ``MAX_OUTLIERS``."""
    items = []
    for outlier in outliers[:MAX_OUTLIERS]:
        ident = batch_text(outlier.get("id"))
        what = f"example {outlier.get('position', '?')}" + (f" (id {ident})" if ident else "")
        loss = outlier.get("loss")
        what += "" if loss is None else f": loss {loss}"
        items.append(f"<li>{esc(what)}</li>")
    if len(outliers) > MAX_OUTLIERS:
        items.append(f"<li>and {len(outliers) - MAX_OUTLIERS} more</li>")
    return f'<p>Examples whose loss stands out:</p><ul class="outliers">{"".join(items)}</ul>'


def _rollback_html(episode: Episode) -> str:
    """What a rollback undid: its steps and the batches it skipped (empty if not given)."""
    undid = []
    if episode.skipped_steps is not None:
        undid.append(f"undid steps {_steps_text(*episode.skipped_steps)}")
    if episode.skipped_batches:
        names = ", ".join(episode.skipped_batches[:10])
        more = len(episode.skipped_batches) - 10
        undid.append(f"skipped batches {names}" + (f" (+{more} more)" if more > 0 else ""))
    if not undid:
        return ""
    return f'<p class="skipped-batches">The rollback {esc("; ".join(undid))}.</p>'


def _episode_html(episode: Episode) -> str:
    """One episode: when, what and why, the evidence, and the advice as an ordered list."""
    parts = [_episode_head(episode)]
    parts += [f'<p class="evidence">{esc(s)}</p>' for s in episode.summaries]
    if episode.outliers:
        parts.append(_outliers_html(episode.outliers))
    parts.append(_rollback_html(episode))
    if episode.advice:
        items = "".join(f"<li>{esc(a)}</li>" for a in episode.advice)
        parts.append(f'<p>What to do:</p><ol class="advice">{items}</ol>')
    return f'<li class="episode {esc(episode.severity)}">{"".join(parts)}</li>'


def render_what_happened(run: RunData) -> str:
    """The warnings and errors as episodes, by onset, with cause, evidence and advice.

    At most ``MAX_EPISODES`` are shown (the event table below lists every event); a stop
    request and whether the loop honoured it comes first.
    """
    parts = []
    stop = stop_request(run)
    if stop is not None:
        cls = "stop ignored" if stop.ignored else "stop"
        text = stop.sentence()
        parts.append(f'<p class="{cls}" id="stop">{esc(text[0].upper() + text[1:])}.</p>')
    found = episodes(run)
    if not found:
        steps = len(set(run.steps.tolist()))
        infos = len(run.events)
        what = f" ({infos} info events, none needing action)" if infos else ""
        parts.append(
            f'<p class="no-action">The run needed no action: no warnings or errors in '
            f"{steps} steps{esc(what)}.</p>"
        )
        return "".join(parts)
    items = "".join(_episode_html(e) for e in found[:MAX_EPISODES])
    parts.append(f'<ol class="episodes">{items}</ol>')
    more = len(found) - MAX_EPISODES
    if more > 0:
        parts.append(
            f'<p class="note" id="episodes-more">And {more} more: see the '
            '<a href="#events">event table</a>.</p>'
        )
    return "".join(parts)


def render_param_groups(groups: list[dict[str, Any]]) -> str:
    """The optimizer's parameter groups as a table: one row per group, one column per setting."""
    first = ("params", "lr", "weight_decay", "betas", "momentum", "eps")
    keys = [k for k in first if any(k in g for g in groups)]
    keys += sorted({k for g in groups for k in g} - set(keys))

    def cell(value: Any) -> str:
        return json.dumps(value) if isinstance(value, list | dict) else fmt(value)

    rows = [(i, *(cell(g[k]) if k in g else "" for k in keys)) for i, g in enumerate(groups)]
    return f"<h3>Optimizer parameter groups ({len(groups)})</h3>" + table(
        ("group", *keys), rows, numeric=(0,)
    )


def render_config(run: RunData) -> str:
    """The guard's configuration, the versions and the layers, from ``meta.json``."""
    meta = run.meta
    if not meta:
        return '<p class="note">No meta.json: the configuration is unknown.</p>'
    config = dict(meta.get("config", {}))
    groups = config.pop("param_groups", None)
    parts = [definitions(config)]
    if isinstance(groups, list) and groups and all(isinstance(g, dict) for g in groups):
        parts.append(render_param_groups(groups))
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
        '<nav><a href="#what-happened">What happened</a><a href="#plots">Plots</a>'
        '<a href="#events">Events</a><a href="#config">Configuration</a></nav>',
        '<section id="what-happened"><h2>What happened and what to do</h2>'
        f"{render_what_happened(run)}</section>",
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
