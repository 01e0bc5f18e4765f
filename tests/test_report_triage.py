"""The report's triage: streaks, the what-happened section, bounded pages, readable plots.

Run directories are written by hand in the format of docs/run-format.md, with the
optional fields (cause, evidence, advice, streaks, batch ids, update ratios, stop
requests) that newer guards write; runs without them are covered in test_report.py.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gradguard.report import write_report
from gradguard.report._data import load_run, merge_streaks
from gradguard.report._figures import (
    YRange,
    draw_grad_norm,
    draw_heatmap,
    draw_loss,
    draw_update_ratio,
    forward_fill,
    off_scale,
    y_range,
)
from gradguard.report._run_report import MAX_EPISODES, MAX_INFO_ROWS
from gradguard.report._triage import CAUSE_LABELS, episodes, stop_request
from gradguard.report._verdict import verdict

Value = float | str | None


def make_run(
    run_dir: Path,
    loss: Sequence[Value],
    *,
    grad_norm: Sequence[Value] | None = None,
    layer_names: Sequence[str] = ("0", "2"),
    events: Sequence[dict[str, Any]] = (),
    update_ratio: dict[int, list[Value]] | None = None,
    log_every: int = 10,
) -> Path:
    """A run directory, one metrics and one layers row per step from 1 (docs/run-format.md).

    ``grad_norm`` defaults to the loss; each layer's norm is the global norm shared
    evenly; a non-finite norm makes a skipped step. ``update_ratio`` maps steps to the
    ratios their layers row carries.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    names = list(layer_names)
    meta = {
        "format_version": 1,
        "layer_names": names,
        "layer_depth": {n: i for i, n in enumerate(names)},
        "tensor_names": [f"{n}.weight" for n in names],
        "config": {"clip": "NormClip(max_norm=100.0, norm_type=2.0)", "log_every": log_every},
    }
    (run_dir / "meta.json").write_text(json.dumps(meta))
    norms = list(loss if grad_norm is None else grad_norm)
    metrics, layers = [], []
    for step, (value, norm) in enumerate(zip(loss, norms, strict=True), start=1):
        finite = norm is not None and math.isfinite(float(norm))
        metrics.append(
            {"step": step, "loss": value, "grad_norm": norm, "clipped_norm": norm, "scale": 1.0,
             "skipped": not finite, "finite": finite, "overflow": False, "lr": 0.01}
        )  # fmt: skip
        share = float(norm) / math.sqrt(len(names)) if finite else "nan"  # type: ignore[arg-type]
        row: dict[str, Any] = {"step": step, "norms": [share] * len(names)}
        if update_ratio and step in update_ratio:
            row["update_ratio"] = update_ratio[step]
        layers.append(row)
    for name, rows in (("metrics", metrics), ("layers", layers), ("events", events)):
        (run_dir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def ev(step: int, kind: str, severity: str = "warning", **fields: Any) -> dict[str, Any]:
    """An events.jsonl row; streak fields and the rest are passed as they are written."""
    base = {"step": step, "kind": kind, "severity": severity, "metric": "", "value": "nan"}
    return {**base, "threshold": "nan", "layers": [], "message": f"{kind} at {step}", **fields}


def streak(first: int, last: int, kind: str = "nonfinite", **fields: Any) -> dict[str, Any]:
    """One row of a streak as the guard rewrites it: first_step fixed, count and last grow."""
    return ev(first, kind, first_step=first, last_step=last, count=last - first + 1, **fields)


def section(page: str, ident: str) -> str:
    found = re.search(rf'<section id="{ident}">(.*?)</section>', page, re.S)
    assert found, f"no section {ident}"
    return found.group(1)


def text_of(fragment: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", fragment)).split())


def table_rows(page: str) -> list[list[str]]:
    table = re.search(r'<table id="events-table">.*?<tbody>(.*?)</tbody>', page, re.S)
    assert table, "no event table"
    return [
        [html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row)]
        for row in re.findall(r"<tr>(.*?)</tr>", table.group(1))
    ]


def flat(steps: int, value: float = 1.0) -> list[Value]:
    return [value + 0.01 * (i % 7) for i in range(steps)]


# --- streaks ---------------------------------------------------------------------------------


def test_streak_rows_are_merged_and_the_last_wins() -> None:
    rows = [
        streak(10, 10, message="first write"),
        ev(5, "spike", metric="loss"),
        streak(10, 14, message="second write"),
        ev(5, "spike", metric="grad_norm"),  # same step, other metric: another event
        streak(10, 21, message="last write"),
        ev(3, "vanishing"),  # written later, but its onset is first
        streak(10, 12, kind="overflow"),  # same first step, other kind: another event
    ]
    events = merge_streaks(rows)
    assert [(e["kind"], e["first_step"]) for e in events] == [
        ("vanishing", 3),
        ("spike", 5),
        ("spike", 5),
        ("nonfinite", 10),
        ("overflow", 10),
    ]
    nonfinite = events[3]
    assert (nonfinite["message"], nonfinite["count"], nonfinite["last_step"]) == (
        "last write",
        12,
        21,
    )
    assert [e["metric"] for e in events[1:3]] == ["loss", "grad_norm"]
    # an old row (no streak fields) is a one-step event
    assert (events[0]["count"], events[0]["last_step"]) == (1, 3)


def test_a_replayed_step_after_a_rollback_is_a_new_event() -> None:
    rows = [
        ev(25, "spike", metric="loss", first_step=25, message="before"),
        ev(28, "rollback", value=20.0, threshold=25.0),
        ev(25, "spike", metric="loss", first_step=25, message="replayed"),
    ]
    events = merge_streaks(rows)
    assert [e["message"] for e in events if e["kind"] == "spike"] == ["before", "replayed"]
    # a rollback to a step after the onset does not undo it: still a rewrite
    rows[1] = ev(28, "rollback", value=26.0, threshold=25.0)
    assert [e["message"] for e in merge_streaks(rows) if e["kind"] == "spike"] == ["replayed"]


def test_events_are_read_merged_by_onset(tmp_path: Path) -> None:
    rows = [streak(8, 8), ev(2, "spike", "info", metric="loss"), streak(8, 15)]
    run = load_run(make_run(tmp_path, flat(20), events=rows))
    assert run.event_rows == rows
    assert [(e["kind"], e["first_step"], e["count"]) for e in run.events] == [
        ("spike", 2, 1),
        ("nonfinite", 8, 8),
    ]
    assert run.events_of("nonfinite", attention=True)[0]["last_step"] == 15
    assert run.events_of("spike", attention=True) == []
    assert run.first_attention_step == 8


# --- what happened ---------------------------------------------------------------------------

ADVICE = [
    {"action": "clip", "text": "Clip the global gradient norm at 3.2: gg.NormClip(3.2).",
     "setting": {"max_norm": 3.2}},
    {"action": "inspect_batch", "text": "Look at batch 'b-77' for corrupt examples.",
     "setting": {}},
]  # fmt: skip
SUMMARY = "The loss of batch b-77 is 13 times its median; 2 of its 32 examples carry 90 %."


def triage_events() -> list[dict[str, Any]]:
    """Three episodes, written out of onset order, plus info events and a rollback."""
    evidence = {
        "summary": SUMMARY,
        "outliers": [{"position": 3, "id": "img-1203", "loss": 41.2}, {"position": 9, "id": 7}],
    }
    bad_batch = {"cause": "bad_batch", "evidence": evidence, "advice": ADVICE, "batch": "b-77"}
    return [
        ev(30, "spike", metric="loss", value=41.2, layers=["4"], **bad_batch),
        ev(30, "spike", metric="grad_norm", value=900.0, **bad_batch),
        ev(12, "exploding", cause="unknown", layers=["2"],
           evidence={"summary": "Layer 2 grew 40-fold in 10 steps."}),
        ev(3, "spike", "info", metric="loss"),
        ev(35, "rollback", value=20.0, threshold=30.0, cause="bad_batch",
           evidence={"summary": "Rolled back to step 20.", "skipped_batches": ["b-77", "b-78"],
                     "skipped_steps": [21, 35]}),
        streak(40, 40, cause="nonfinite_loss"),
        streak(40, 44, cause="nonfinite_loss", advice=[{"action": "epsilon", "text": "Add eps."}]),
    ]  # fmt: skip


def test_episodes_group_by_onset_and_cause_in_onset_order(tmp_path: Path) -> None:
    run = load_run(make_run(tmp_path, flat(50), events=triage_events()))
    found = episodes(run)
    assert [(e.first, e.cause) for e in found] == [
        (12, "unknown"),
        (30, "bad_batch"),
        (35, "bad_batch"),
        (40, "nonfinite_loss"),
    ]
    spike = found[1]
    assert spike.kinds == ["spike (loss)", "spike (grad_norm)"]  # one episode, both spikes
    assert spike.advice == [a["text"] for a in ADVICE]  # not repeated by the second spike
    assert spike.summaries == [SUMMARY]
    assert spike.batches == ["b-77"]
    assert found[2].skipped_batches == ["b-77", "b-78"]
    assert found[2].skipped_steps == (21, 35)
    assert (found[3].first, found[3].last, found[3].count) == (40, 44, 5)


def test_what_happened_section_tells_cause_evidence_and_advice(tmp_path: Path) -> None:
    page = write_report(make_run(tmp_path, flat(50), events=triage_events())).read_text()
    assert page.index('id="what-happened"') < page.index('id="plots"')
    assert '<a href="#what-happened">' in page
    part = section(page, "what-happened")
    pieces = re.split(r'<li class="episode (\w+)">', part)[1:]
    severities, items = pieces[0::2], pieces[1::2]  # each episode's html, to the next one
    assert severities == ["warning"] * 4
    texts = [text_of(body) for body in items]
    assert [t.split()[1] for t in texts] == ["12", "30", "35", "40–44"]
    assert "cause: unknown" in texts[0]  # an unknown cause is said, not hidden
    assert "Layer 2 grew 40-fold in 10 steps." in texts[0]
    spike = texts[1]
    assert f"cause: {CAUSE_LABELS['bad_batch']}" in spike
    assert "batch: b-77" in spike
    assert SUMMARY in spike
    assert "example 3 (id img-1203): loss 41.2" in spike
    assert "example 9 (id 7) " in spike  # no loss given: none shown
    advice = re.findall(r'<ol class="advice">(.*?)</ol>', items[1])
    assert [text_of(a).strip() for a in re.findall(r"<li>(.*?)</li>", advice[0])] == [
        a["text"] for a in ADVICE
    ]
    assert "undid steps 21–35; skipped batches b-77, b-78" in texts[2]
    assert "Steps 40–44 (seen 5 times)" in texts[3]
    assert CAUSE_LABELS["nonfinite_loss"] in texts[3]
    assert "spike at 3" not in part  # info events are not episodes
    rows = table_rows(page)
    assert [r[0] for r in rows] == ["3", "12", "30", "30", "35", "40–44"]
    assert rows[-1][1:5] == ["5", "nonfinite", "warning", CAUSE_LABELS["nonfinite_loss"]]
    assert rows[2][6] == "b-77"


def test_a_run_without_warnings_needs_no_action(tmp_path: Path) -> None:
    events = [ev(4, "spike", "info", metric="loss")]
    page = write_report(make_run(tmp_path, flat(30), events=events)).read_text()
    part = text_of(section(page, "what-happened"))
    assert "The run needed no action: no warnings or errors in 30 steps" in part
    assert "episode" not in section(page, "what-happened")


def test_many_episodes_are_cut_with_a_count(tmp_path: Path) -> None:
    events = [ev(5 * i + 1, "spike", metric="loss", cause="bad_batch") for i in range(12)]
    page = write_report(make_run(tmp_path, flat(60), events=events)).read_text()
    part = section(page, "what-happened")
    assert part.count('<li class="episode') == MAX_EPISODES
    assert f"And {12 - MAX_EPISODES} more" in text_of(part)
    assert len(table_rows(page)) == 12  # the table has them all


# --- bounded size ----------------------------------------------------------------------------


def test_event_table_keeps_warnings_and_caps_info_rows(tmp_path: Path) -> None:
    infos = [ev(s, "overflow", "info", message=f"backoff {s}") for s in range(1, 1001)]
    warnings = [ev(s, "spike", metric="loss") for s in (100, 500, 900)]
    page = write_report(make_run(tmp_path, flat(1000), events=infos + warnings)).read_text()
    rows = table_rows(page)
    assert len(rows) == 3 + MAX_INFO_ROWS
    assert [r[0] for r in rows if r[3] == "warning"] == ["100", "500", "900"]
    assert {r[2] for r in rows} == {"overflow", "spike (loss)"}
    assert [r[0] for r in rows if r[3] == "info"] == [str(s) for s in range(1, 201)]
    assert f"the first {MAX_INFO_ROWS} of 1000 info events" in text_of(section(page, "events"))


def test_a_3000_step_nan_streak_gives_a_small_page(tmp_path: Path) -> None:
    steps = 3000
    advice = [{"action": "lr", "text": "Lower the learning rate 10-fold.", "setting": {}}]
    rows = [
        streak(1, last, cause="lr_too_high", metric="grad_norm", layers=["0", "2"],
               evidence={"summary": "The norm grew 1e6-fold before the first NaN."},
               advice=advice, extra={"skipped": True})
        for last in range(1, steps + 1, 10)
    ] + [streak(1, steps, cause="lr_too_high", metric="grad_norm", advice=advice)]  # fmt: skip
    names = [f"block.{i}" for i in range(12)]
    run_dir = make_run(tmp_path, ["nan"] * steps, layer_names=names, events=rows)
    path = write_report(run_dir)
    size = path.stat().st_size
    assert size < 300_000, size
    page = path.read_text()
    assert table_rows(page) == [
        ["1–3000", "3000", "nonfinite", "warning", CAUSE_LABELS["lr_too_high"], "", "",
         "nonfinite at 1"]
    ]  # fmt: skip
    assert page.count("Lower the learning rate 10-fold.") == 1
    assert "Steps 1–3000 (seen 3000 times)" in text_of(section(page, "what-happened"))


# --- plots -----------------------------------------------------------------------------------


def test_y_range_comes_from_the_healthy_part() -> None:
    values = np.array([2.0, 1.5, 1.2, 1.1, 1.0, 1.05, 1e30, np.inf, np.nan, 0.9])
    healthy = np.arange(values.size) < 6
    shown = y_range(values, healthy, log_ratio=100.0)
    assert shown is not None
    assert not shown.log
    # the healthy 1.0..2.0, half a span above it, and 0.9 (a later, lower value)
    assert shown.lo == pytest.approx(0.9 - 0.05 * 1.6)
    assert shown.hi == pytest.approx(2.5 + 0.05 * 1.6)
    high, low, nan = off_scale(values, shown)
    assert np.flatnonzero(high).tolist() == [6, 7]
    assert np.flatnonzero(nan).tolist() == [8]
    assert not low.any()
    # a moderate overshoot after the onset stays on the plot
    bump = y_range(np.array([1.0, 2.0, 1.5, 1.2, 1.1, 2.4]), np.arange(6) < 5, 100.0)
    assert bump is not None
    assert bump.hi > 2.4


def test_y_range_log_scale_and_fallbacks() -> None:
    decay = np.geomspace(10.0, 0.01, 50)
    values = np.concatenate([decay, [1e12, 0.0]])
    shown = y_range(values, np.arange(values.size) < 50, log_ratio=100.0)
    assert shown is not None
    assert shown.log
    assert shown.hi < 1e5  # a decade margin at most, not the blow-up
    high, low, _ = off_scale(values, shown)
    assert np.flatnonzero(high).tolist() == [50]
    assert np.flatnonzero(low).tolist() == [51]  # zero has no place on a log axis
    # no healthy part: the 1 % and 99 % quantiles of everything are the reference
    spiky = np.ones(400)
    spiky[::150] = 1e9  # 3 in 400: beyond the 99 % quantile
    robust = y_range(spiky, np.zeros(400, dtype=bool), log_ratio=100.0)
    assert robust is not None
    assert robust.hi < 10.0
    assert y_range(np.full(5, np.nan), np.ones(5, dtype=bool), 100.0) is None
    assert [m.tolist() for m in off_scale(np.array([np.inf, np.nan]), None)] == [
        [True, False],
        [False, False],
        [False, True],
    ]
    assert off_scale(np.array([0.5]), YRange(1.0, 2.0, False))[1].tolist() == [True]


def test_loss_plot_keeps_the_healthy_range_after_a_blow_up(tmp_path: Path) -> None:
    loss: list[Value] = [*flat(40), 1e6, 1e12, "inf", "nan", "nan"]
    events = [ev(41, "spike", metric="loss", value=1e6, cause="lr_too_high")]
    run = load_run(make_run(tmp_path, loss, events=events))
    ax = draw_loss(run).axes[0]
    lo, hi = ax.get_ylim()
    assert ax.get_yscale() == "linear"
    assert 0.9 < lo < 1.0
    assert 1.06 < hi < 1.2
    edge = {line.get_marker(): line.get_xdata().tolist() for line in ax.lines}
    assert edge["^"] == [41, 42, 43]  # 1e6, 1e12 and Inf on the top edge
    assert edge["x"] == [44, 45]  # NaN
    norm_ax = draw_grad_norm(run).axes[0]
    assert norm_ax.get_ylim()[1] < 2.0


# --- heatmaps --------------------------------------------------------------------------------


def test_forward_fill_and_the_update_ratio_heatmap(tmp_path: Path) -> None:
    ratios: dict[int, list[Value]] = {
        10: [1e-3, None, None],
        20: [None, 1e-2, None],
        30: [2e-3, None, "nan"],
    }
    events = [ev(15, "exploding", layers=["1"]), ev(25, "spike", "error", metric="loss")]
    run_dir = make_run(
        tmp_path, flat(30), layer_names=["0", "1", "2"], events=events, update_ratio=ratios
    )
    run = load_run(run_dir)
    steps, values, measured = run.update_ratio_matrix
    assert steps.tolist() == [10, 20, 30]
    assert measured.tolist() == [[True, False, False], [False, True, False], [True, False, True]]
    filled, known = forward_fill(values, measured)
    assert known.tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    ax = draw_update_ratio(run).axes[0]
    shown = ax.images[0].get_array()
    np.testing.assert_allclose(shown[0], [1e-3, 1e-3, 2e-3])  # layer 0, forward-filled
    np.testing.assert_allclose(shown[1, 1:], [1e-2, 1e-2])
    assert np.ma.getmaskarray(shown).tolist() == [
        [False, False, False],
        [True, False, False],  # not measured before step 20
        [True, True, True],  # never a finite value
    ]
    assert np.argwhere(~np.ma.getmaskarray(ax.images[1].get_array())).tolist() == [[2, 2]]
    onsets = [line for line in ax.lines if line.get_marker() == "v"]
    assert [line.get_xdata().tolist() for line in onsets] == [[15], [25]]  # warning, error
    heat = draw_heatmap(run).axes[0]
    assert [ln.get_xdata().tolist() for ln in heat.lines if ln.get_marker() == "v"] == [[15], [25]]
    page = write_report(run_dir).read_text()
    assert 'id="img-update_ratio"' in page
    assert page.index('id="img-heatmap"') < page.index('id="img-update_ratio"')


def test_no_update_ratio_heatmap_without_the_data(tmp_path: Path) -> None:
    page = write_report(make_run(tmp_path, flat(30))).read_text()
    assert 'id="img-heatmap"' in page
    assert 'id="img-update_ratio"' not in page
    assert 'data-skipped="update_ratio"' not in page  # no note either: old runs lack it
    run_dir = make_run(tmp_path, flat(30), update_ratio={10: [None, None]})
    assert 'id="img-update_ratio"' not in write_report(run_dir).read_text()  # none measured


# --- should_stop -----------------------------------------------------------------------------


def stop_events(request: int) -> list[dict[str, Any]]:
    return [ev(25, "divergence", "error", metric="loss", extra={"stop_requested_at": request})]


def test_stop_request_honoured(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, flat(30), events=stop_events(30))
    level, sentence = verdict(load_run(run_dir))
    assert level == "bad"
    assert sentence == (
        "Diverged at step 25; stop requested at step 30 (by divergence at step 25); "
        "training ended at step 30 (30 steps logged)."
    )
    page = write_report(run_dir).read_text()
    stop = re.search(r'<p class="stop" id="stop">(.*?)</p>', page)
    assert stop
    assert "training ended at step 30" in html.unescape(stop.group(1))


def test_stop_request_ignored_by_the_loop(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, flat(100), events=stop_events(30))
    _, sentence = verdict(load_run(run_dir))
    assert "stop requested at step 30 (by divergence at step 25), but the loop went on to " in (
        sentence
    )
    assert "step 100: it did not stop (it did not check guard.should_stop)" in sentence
    assert "training stopped" not in sentence
    page = write_report(run_dir).read_text()
    assert '<p class="stop ignored" id="stop">' in page
    # one log interval past the request still counts as stopping (the loop sees it at a drain)
    request = stop_request(load_run(make_run(tmp_path / "b", flat(40), events=stop_events(30))))
    assert request is not None
    assert not request.ignored


def test_stop_request_inferred_for_old_divergence_rows(tmp_path: Path) -> None:
    old = [ev(25, "divergence", "error", metric="loss")]  # no extra.stop_requested_at
    request = stop_request(load_run(make_run(tmp_path, flat(30), events=old)))
    assert request is not None
    assert (request.at, request.inferred, request.ignored) == (30, True, False)
    assert request.sentence().startswith("stop requested at about step 30")
    assert stop_request(load_run(make_run(tmp_path / "b", flat(30)))) is None
