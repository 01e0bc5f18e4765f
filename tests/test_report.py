"""The HTML report: from a real guarded run with injected faults, and from a lab run."""

from __future__ import annotations

import ast
import base64
import contextlib
import html
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard import lab
from gradguard.errors import ConfigError
from gradguard.report import run_verdict, write_lab_report, write_report
from gradguard.report._data import load_run, merge_streaks
from gradguard.report._figures import draw_heatmap
from gradguard.report._verdict import verdict

SRC = Path(__file__).resolve().parents[1] / "src" / "gradguard"
DOC = Path(__file__).resolve().parents[1] / "docs" / "report.md"
PLOT_IDS = ["img-loss", "img-grad_norm", "img-lr", "img-heatmap", "img-layer_bars"]


# --- helpers --------------------------------------------------------------------------------


def verdict_of(page: str) -> tuple[str, str]:
    found = re.search(r'<p class="verdict (\w+)" id="verdict">([^<]*)</p>', page)
    assert found, "no verdict"
    return found.group(1), html.unescape(found.group(2))


def images_of(page: str) -> dict[str, np.ndarray[Any, Any]]:
    """Every inline image, decoded: a PNG that does not decode fails here."""
    out = {}
    for ident, data in re.findall(
        r'<img class="plot" id="([^"]+)"[^>]* src="data:image/png;base64,([^"]+)"', page
    ):
        out[ident] = matplotlib.image.imread(io.BytesIO(base64.b64decode(data)), format="png")
    return out


def event_rows(page: str) -> list[list[str]]:
    table = re.search(r'<table id="events-table">.*?<tbody>(.*?)</tbody>', page, re.S)
    assert table, "no event table"
    return [
        [html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row)]
        for row in re.findall(r"<tr>(.*?)</tr>", table.group(1))
    ]


def section_of(page: str, ident: str) -> str:
    found = re.search(rf'<section id="{ident}">(.*?)</section>', page, re.S)
    assert found, f"no section {ident}"
    return found.group(1)


def write_run(
    run_dir: Path,
    norms: Sequence[Sequence[float | str]],
    *,
    layer_names: Sequence[str] | None = None,
    events: Sequence[dict[str, Any]] = (),
    loss: bool = True,
    scale: float = 1.0,
) -> Path:
    """A run directory in the documented format (docs/run-format.md), written directly."""
    run_dir.mkdir(parents=True, exist_ok=True)
    names = list(layer_names or [str(2 * i) for i in range(len(norms[0]))])
    meta = {
        "format_version": 1,
        "layer_names": names,
        "layer_depth": {n: i for i, n in enumerate(names)},
        "tensor_names": [f"{n}.weight" for n in names],
        "config": {"clip": "NormClip(max_norm=1.0, norm_type=2.0)", "log_every": 10},
        "versions": {"gradguard": "0.1.0"},
    }
    (run_dir / "meta.json").write_text(json.dumps(meta))
    metrics, layers = [], []
    for step, row in enumerate(norms, start=1):
        total = float(np.sqrt(sum(float(v) ** 2 for v in row)))
        skipped = not np.isfinite(total)
        metrics.append(
            {"step": step, "loss": 1.0 / step if loss else None,
             "grad_norm": "nan" if skipped else total,
             "clipped_norm": "nan" if skipped else total * scale, "scale": scale,
             "skipped": skipped, "finite": not skipped, "overflow": False, "lr": 0.01}
        )  # fmt: skip
        layers.append({"step": step, "norms": list(row)})
    for name, rows in (("metrics", metrics), ("layers", layers), ("events", events)):
        (run_dir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def event(step: int, kind: str, **fields: Any) -> dict[str, Any]:
    base = {"step": step, "kind": kind, "metric": "", "value": "nan", "threshold": "nan"}
    return {**base, "layers": [], "message": f"{kind} at {step}", **fields}


# --- a real run with faults --------------------------------------------------------------


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run of docs/report.md, executed as written there (in a temporary directory).

    160 steps: NaN gradients at 30 and 31, Inf at 75 (skipped); a 1000-fold loss at 101,
    a spike the rollback undoes. The block writes ``runs/faulty/report.html``.
    """
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 1
    workdir = tmp_path_factory.mktemp("report")
    cwd = Path.cwd()
    os.chdir(workdir)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(blocks[0], str(DOC), "exec"), {})
    finally:
        os.chdir(cwd)
    return workdir / "runs" / "faulty"


def test_report_of_a_faulty_run(faulty_run: Path) -> None:
    page = (faulty_run / "report.html").read_text(encoding="utf-8")
    level, sentence = verdict_of(page)
    assert level == "warn"
    assert sentence.startswith("3 steps skipped for non-finite gradients;")
    assert "1 rollback after a loss spike at step 101" in sentence
    assert "30 more undone by rollbacks" in sentence
    images = images_of(page)
    # the update-ratio heatmap (after the gradient-norm one) only when the guard logs ratios
    assert list(images) in (PLOT_IDS, [*PLOT_IDS[:4], "img-update_ratio", *PLOT_IDS[4:]])
    for ident, pixels in images.items():
        assert pixels.shape[0] > 200, ident
        assert pixels.shape[1] > 800, ident
        assert pixels[..., :3].std() > 0.05, f"{ident} is blank"
    assert "data-skipped" not in page
    written = [json.loads(line) for line in (faulty_run / "events.jsonl").read_text().splitlines()]
    events = merge_streaks(written)  # one per streak, by onset
    rows = event_rows(page)
    assert len(rows) == len(events) <= len(written)  # a guard logging streaks rewrites rows
    first_steps = [int(r[0].split("–")[0]) for r in rows]
    assert first_steps == sorted(first_steps) == [e["first_step"] for e in events]
    assert first_steps[0] == 30
    assert 101 in first_steps
    kinds = {r[2] for r in rows}
    assert {"nonfinite", "spike (loss)", "rollback", "cooldown"} <= kinds
    assert kinds <= {"nonfinite", "spike (loss)", "spike (grad_norm)", "rollback", "cooldown"}
    assert [r[3] for r in rows] == [e["severity"] for e in events]
    assert [r[7] for r in rows] == [e["message"] for e in events]
    # the warnings, first to last, at the top of the page
    assert page.index('id="what-happened"') < page.index('id="plots"')
    onsets = re.findall(r'<p class="episode-head"><b>Steps? (\d+)', page)
    attention = [str(e["first_step"]) for e in events if e["severity"] != "info"]
    assert onsets == list(dict.fromkeys(attention))
    assert onsets[0] == "30"
    assert "101" in onsets
    assert "NormClip(max_norm=1.0, norm_type=2.0)" in html.unescape(page)
    # self-contained: no reference leaves the file (only data: URLs and in-page anchors)
    assert not re.search(r'(?:src|href)="(?!data:|#)', page)
    assert "<script" not in page


def test_heatmap_rows_are_layers_in_depth_order(tmp_path: Path) -> None:
    norms = [[10.0**-i for i in range(4)] for _ in range(30)]
    norms[11] = [1.0, "nan", 0.01, 0.001]  # step 12: column 11
    run = load_run(write_run(tmp_path, norms, layer_names=["in", "h1", "h2", "out"]))
    fig = draw_heatmap(run)
    ax = fig.axes[0]
    shown = ax.images[0].get_array()
    assert shown.shape == (4, 30)  # a row per layer, a column per step
    np.testing.assert_allclose(shown[:, 0], [1.0, 0.1, 0.01, 0.001])  # input layer on top
    assert bool(np.ma.getmaskarray(shown)[1, 11])  # the NaN cell is not coloured as a norm
    overlay = ax.images[1].get_array()  # and the red NaN overlay marks exactly it
    assert np.argwhere(~np.ma.getmaskarray(overlay)).tolist() == [[1, 11]]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["in", "h1", "h2", "out"]
    assert ax.images[0].norm.vmin == pytest.approx(1e-3)  # log colour over the real range


def test_long_runs_are_binned_by_geometric_mean(tmp_path: Path) -> None:
    norms = [[10.0 if i % 2 else 0.1, 1.0] for i in range(1500)]
    run = load_run(write_run(tmp_path, norms))
    shown = draw_heatmap(run).axes[0].images[0].get_array()
    assert shown.shape == (2, 600)  # 1500 steps in 600 columns of 2 or 3 steps
    np.testing.assert_allclose(shown[1], 1.0)
    # geometric means of 10 and 0.1: 1 over two steps, 10^(+-1/3) over three
    assert set(np.round(np.log10(shown[0]) * 3).astype(int).tolist()) == {-1, 0, 1}


def test_missing_loss_skips_its_plot_with_a_note(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with gg.Guard(model, optimizer, log_every=5, run_dir=tmp_path, tensorboard=False) as guard:
        for _ in range(20):
            optimizer.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            guard.step()  # no loss given
    page = write_report(tmp_path).read_text(encoding="utf-8")
    assert verdict_of(page) == ("ok", "healthy: no events in 20 steps.")
    assert re.search(
        r'data-skipped="loss">.*Skipped: no loss in metrics.jsonl \(guard.step\(\) was called '
        r"without a loss\)",
        page,
    )
    shown = [i for i in images_of(page) if i != "img-update_ratio"]  # when the guard logs it
    assert shown == [i for i in PLOT_IDS if i != "img-loss"]
    assert "No events." in page


def test_torn_last_line_and_missing_layers(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path, [[1.0, 2.0]] * 12)
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 13, "loss": 0.')  # what a crash mid-write leaves
    (run_dir / "layers.jsonl").unlink()
    page = write_report(run_dir).read_text(encoding="utf-8")
    assert verdict_of(page) == ("ok", "healthy: no events in 12 steps.")
    assert "metrics.jsonl: the torn last line (line 13) was ignored" in page
    assert "layers.jsonl is missing" in page
    for key in ("heatmap", "layer_bars"):
        assert f'data-skipped="{key}"' in page
    assert list(images_of(page)) == ["img-loss", "img-grad_norm", "img-lr"]


def test_event_text_is_escaped(tmp_path: Path) -> None:
    evil = event(
        3, "spike", metric="loss", value=9.0, layers=["<b>x</b>"], message="<script>x()</script>&"
    )
    page = write_report(write_run(tmp_path, [[1.0]] * 5, events=[evil])).read_text()
    assert "<script>" not in page
    assert "<b>x</b>" not in page
    assert "&lt;script&gt;x()&lt;/script&gt;&amp;" in page
    row = event_rows(page)[0]
    assert (row[5], row[7]) == ("<b>x</b>", "<script>x()</script>&")
    assert row[3] == "warning"  # a row without severity reads as a warning
    assert "<b>x</b>" not in section_of(page, "what-happened")


@pytest.mark.parametrize(
    ("events", "scale", "level", "expected"),
    [
        ([], 0.5, "ok", "healthy: no events in 20 steps; the clip policy shrank 20 steps."),
        (
            [
                event(4, "nonfinite", metric="grad_norm", severity="info"),
                event(9, "spike", metric="loss", severity="info"),
            ],
            1.0,
            "ok",
            "healthy: no warnings (2 info events) in 20 steps.",
        ),
        (
            [
                event(4, "spike", metric="loss", severity="info"),
                event(9, "spike", metric="loss", severity="warning"),
            ],
            1.0,
            "warn",
            "1 loss spike (first at step 9) (20 steps logged).",
        ),
        (
            [event(4, "vanishing", layers=["0", "2", "4"]), event(9, "vanishing", layers=["6"])],
            1.0,
            "warn",
            "Vanishing gradients from step 4 in 0, 2 (+2 more) (20 steps logged).",
        ),
        (
            [event(7, "divergence", metric="loss")],
            1.0,
            "bad",
            "Diverged at step 7; stop requested at about step 10 (by divergence at step 7); "
            "training ended at step 20 (20 steps logged).",
        ),
        (
            [event(9, "rollback", value=5.0, threshold=7.0, extra={"trigger": "exploding"})],
            1.0,
            "warn",
            "1 rollback after a gradient explosion at step 7 (20 steps logged).",
        ),
        (
            [event(5, "spike", metric="grad_norm"), event(8, "rollback", threshold=5.0)],
            1.0,
            "bad",
            "1 gradient-norm spike (first at step 5); no rollback possible after the fault at "
            "step 5 (20 steps logged).",
        ),
    ],
)
def test_verdicts(
    tmp_path: Path, events: list[dict[str, Any]], scale: float, level: str, expected: str
) -> None:
    run_dir = write_run(tmp_path, [[1.0, 1.0]] * 20, events=events, scale=scale)
    assert verdict(load_run(run_dir)) == (level, expected)


def test_bad_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="not a run directory"):
        write_report(tmp_path)
    with pytest.raises(ConfigError, match="not a lab run directory"):
        write_lab_report(tmp_path)
    run_dir = write_run(tmp_path / "run", [[1.0]])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"gradguard\[report\]"):
        write_report(run_dir)


# --- damaged run directories: a report with reading notes, never an error ---------------------


def reading_notes(page: str) -> list[str]:
    """The page's reading notes as plain text (empty when it has none)."""
    found = re.search(r'<section id="notes"><h2>Reading notes</h2><ul>(.*?)</ul>', page, re.S)
    return (
        [html.unescape(n) for n in re.findall(r"<li>(.*?)</li>", found.group(1))] if found else []
    )


def set_line(path: Path, line: int, content: dict[str, Any] | str) -> None:
    """Replace line ``line`` (1-based): a dict is merged into the row, text replaces it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if isinstance(content, dict):
        lines[line - 1] = json.dumps({**json.loads(lines[line - 1]), **content})
    else:
        lines[line - 1] = content
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def set_meta(run_dir: Path, content: dict[str, Any] | str) -> None:
    """Merge ``content`` into meta.json, or replace the file with the text given."""
    path = run_dir / "meta.json"
    if isinstance(content, dict):
        content = json.dumps({**json.loads(path.read_text()), **content})
    path.write_text(content, encoding="utf-8")


NO_STEP = '"step" is not a whole number from 0 to 2^53'


def damaged_run(tmp_path: Path) -> Path:
    """A 12-step, 2-layer run with a warning (line 1) and an info event (line 2)."""
    events = [
        event(4, "spike", metric="loss", value=9.0, severity="warning", cause="bad_batch",
              advice=[{"text": "Lower the learning rate."}], extra={"onset": 4}),
        event(6, "spike", metric="grad_norm", value=5.0, severity="info"),
    ]  # fmt: skip
    return write_run(tmp_path / "run", [[1.0, 2.0]] * 12, events=events)


@pytest.mark.parametrize(
    ("file", "line", "content", "note"),
    [
        ("metrics", 3, {"loss": "abc"},
         'metrics.jsonl line 3: "loss" is not a number (got "abc"); read as missing'),
        ("metrics", 3, {"grad_norm": [1, 2]},
         'metrics.jsonl line 3: "grad_norm" is not a number (got [1,2]); read as missing'),
        ("metrics", 3, {"lr": {"value": 0.1}}, 'metrics.jsonl line 3: "lr" is not a number'),
        ("metrics", 3, {"step": None}, f"metrics.jsonl line 3: {NO_STEP} (got null); row ignored"),
        ("metrics", 3, {"step": "3"}, f'metrics.jsonl line 3: {NO_STEP} (got "3"); row ignored'),
        ("metrics", 3, {"step": 2.5}, f"metrics.jsonl line 3: {NO_STEP} (got 2.5); row ignored"),
        ("metrics", 3, {"step": -1}, f"metrics.jsonl line 3: {NO_STEP} (got -1); row ignored"),
        ("metrics", 3, {"skipped": "yes"},
         'metrics.jsonl line 3: "skipped" is not true or false (got "yes"); ignored'),
        ("metrics", 3, "[1, 2]", "metrics.jsonl line 3: a list, not a JSON object"),
        ("metrics", 3, "42", "metrics.jsonl line 3: a number, not a JSON object (got 42)"),
        ("metrics", 3, '{"step": 3, "loss": 0.', "metrics.jsonl line 3: not valid JSON"),
        ("metrics", 3, '{"step": NaN, "loss": Infinity}',
         f"metrics.jsonl line 3: {NO_STEP} (got NaN); row ignored"),
        ("layers", 3, {"norms": "x"},
         'layers.jsonl line 3: "norms" is not a list of numbers (got "x"); left out of the '
         "heatmap"),
        ("layers", 3, {"norms": [1.0, [2.0]]}, 'layers.jsonl line 3: "norms" is not a list of'),
        ("layers", 3, {"norms": [1.0]},
         'layers.jsonl line 3: "norms" has a value count other than the 2 layers of meta.json '
         "(got 1 values)"),
        ("layers", 3, {"update_ratio": "x"}, 'layers.jsonl line 3: "update_ratio" is not a list'),
        ("events", 1, {"layers": 5},
         'events.jsonl line 1: "layers" is not a list of strings (got 5); ignored'),
        ("events", 1, {"advice": "text"}, 'events.jsonl line 1: "advice" is not a list'),
        ("events", 1, {"severity": 3},
         'events.jsonl line 1: "severity" is not info, warning or error (got 3); read as a '
         "warning"),
        ("events", 1, {"kind": None},
         'events.jsonl line 1: "kind" is not a non-empty string (got null); row ignored'),
        ("events", 1, {"step": None}, f"events.jsonl line 1: {NO_STEP} (got null); row ignored"),
        ("events", 1, {"extra": [1]}, 'events.jsonl line 1: "extra" is not an object'),
        ("events", 1, {"value": "abc"}, 'events.jsonl line 1: "value" is not a number'),
        ("events", 2, {"metric": [1]}, 'events.jsonl line 2: "metric" is not a string'),
        ("events", 2, "[]", "events.jsonl line 2: a list, not a JSON object"),
        ("meta", None, {"layer_names": 5},
         'meta.json: "layer_names" is not a list of strings (got 5); the per-layer figures are '
         "skipped"),
        ("meta", None, {"layer_names": ["0", 2]}, 'meta.json: "layer_names" is not a list of'),
        ("meta", None, {"config": "x"}, 'meta.json: "config" is not an object (got "x")'),
        ("meta", None, {"tensor_names": 3}, 'meta.json: "tensor_names" is not a list'),
        ("meta", None, "[1, 2]", "meta.json: a list, not a JSON object; ignored"),
        ("meta", None, "{not json", "meta.json could not be parsed"),
    ],
)  # fmt: skip
def test_a_malformed_value_is_left_out_with_a_reading_note(
    tmp_path: Path, file: str, line: int | None, content: dict[str, Any] | str, note: str
) -> None:
    run_dir = damaged_run(tmp_path)
    if line is None:
        set_meta(run_dir, content)
    else:
        set_line(run_dir / f"{file}.jsonl", line, content)
    page = write_report(run_dir).read_text(encoding="utf-8")
    notes = reading_notes(page)
    assert any(n.startswith(note) for n in notes), notes
    assert len(notes) == 1, notes  # one problem, one note
    level, sentence = verdict_of(page)
    assert (level, sentence) == run_verdict(run_dir)
    assert "steps logged" in sentence or "healthy" in sentence


@pytest.mark.parametrize(
    ("damage", "name", "note"),
    [
        ("remove", "events.jsonl", None),  # normal: a run without events
        ("remove", "layers.jsonl", "layers.jsonl is missing"),
        ("remove", "meta.json", "meta.json is missing"),
        ("empty", "metrics.jsonl", "metrics.jsonl has no readable rows"),
        ("empty", "layers.jsonl", "layers.jsonl has no readable rows"),
        ("directory", "metrics.jsonl", "metrics.jsonl is not a regular file; ignored"),
    ],
)
def test_missing_or_empty_files_give_a_report(
    tmp_path: Path, damage: str, name: str, note: str | None
) -> None:
    run_dir = damaged_run(tmp_path)
    path = run_dir / name
    if damage == "empty":
        path.write_text("")
    else:
        path.unlink()
        if damage == "directory":
            path.mkdir()
    page = write_report(run_dir).read_text(encoding="utf-8")
    assert reading_notes(page) == ([note] if note else [])
    if name == "metrics.jsonl":
        assert verdict_of(page) == ("warn", "no steps logged: metrics.jsonl is empty or missing.")


def test_many_bad_values_make_one_note_with_a_count(tmp_path: Path) -> None:
    run_dir = damaged_run(tmp_path)
    metrics = run_dir / "metrics.jsonl"
    for line in range(2, 12):
        set_line(metrics, line, {"loss": "abc" if line % 2 else [line]})
    notes = reading_notes(write_report(run_dir).read_text(encoding="utf-8"))
    assert notes == [
        'metrics.jsonl, 10 lines (2, 3, 4, …): "loss" is not a number (first: [2]); read as missing'
    ]


def test_steps_going_back_are_noted_unless_a_rollback_or_resume_explains_them(
    tmp_path: Path,
) -> None:
    run_dir = damaged_run(tmp_path)
    for path in (run_dir / "metrics.jsonl", run_dir / "layers.jsonl"):
        set_line(path, 8, {"step": 5})  # ..., 6, 7, 5, 9, ...: out of order
    notes = reading_notes(write_report(run_dir).read_text(encoding="utf-8"))
    assert notes == [
        f"{name}.jsonl line 8: the step goes back with no rollback or resumed session (got "
        "step 5 after step 7); the rows before it are drawn as undone"
        for name in ("metrics", "layers")
    ]
    set_meta(run_dir, {"sessions": [{"start_step": 0}, {"start_step": 4}]})  # resumed at 4
    assert reading_notes(write_report(run_dir).read_text(encoding="utf-8")) == []
    set_meta(run_dir, {"sessions": [{"start_step": 0}]})
    with (run_dir / "events.jsonl").open("a") as f:  # a rollback that restored step 4
        f.write(json.dumps(event(7, "rollback", value=4.0, threshold=6.0)) + "\n")
    assert reading_notes(write_report(run_dir).read_text(encoding="utf-8")) == []


def test_non_finite_literals_read_as_values(tmp_path: Path) -> None:
    run_dir = damaged_run(tmp_path)
    set_line(run_dir / "metrics.jsonl", 3, '{"step": 3, "loss": NaN, "grad_norm": Infinity}')
    set_line(run_dir / "layers.jsonl", 3, '{"step": 3, "norms": [-Infinity, NaN]}')
    set_line(run_dir / "metrics.jsonl", 4, {"lr": 10**400, "loss": -1e308})  # beyond float
    page = write_report(run_dir).read_text(encoding="utf-8")
    assert reading_notes(page) == []
    run = load_run(run_dir)
    assert np.isnan(run.column("loss")[2])
    assert np.isposinf(run.column("grad_norm")[2])
    assert np.isposinf(run.column("lr")[3])
    assert "img-heatmap" in images_of(page)


def test_a_rollback_without_its_onset_still_gets_a_verdict(tmp_path: Path) -> None:
    rollback = event(9, "rollback", value=5.0, threshold="nan", extra={"trigger": "exploding"})
    run_dir = write_run(tmp_path, [[1.0, 1.0]] * 20, events=[rollback])
    assert verdict(load_run(run_dir)) == (
        "warn",
        "1 rollback after a gradient explosion (20 steps logged).",
    )


def test_write_report_names_a_path_that_is_no_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a run directory: it does not exist"):
        write_report(tmp_path / "typo")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is not a run directory: it is a file"):
        write_report(tmp_path / "file")


def test_a_failed_write_keeps_the_previous_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = damaged_run(tmp_path)
    previous = write_report(run_dir).read_text(encoding="utf-8")

    def full_disk(self: Path, *args: Any, **kwargs: Any) -> int:
        raise OSError(28, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_report(run_dir)
    monkeypatch.undo()
    assert (run_dir / "report.html").read_text(encoding="utf-8") == previous
    assert not (run_dir / "report.html.tmp").exists()


@pytest.mark.parametrize(
    ("results", "note"),
    [
        ({"experiments": 5}, 'results.json: "experiments" is not a list (got 5); left out'),
        ({"experiments": [7]}, 'results.json: "experiments" holds items that are not objects'),
        ({"experiments": [{"name": "x", "claims": 5}]},
         'results.json: "experiments[0].claims" is not a list (got 5); left out'),
        ({"experiments": [{"name": "x", "claims": [{"id": "c", "values": 3}]}]},
         'results.json: "experiments[0].claims[0].values" is not a list'),
        ({"experiments": [{"name": "x", "tables": [{"rows": [1, [2]]}]}]},
         'results.json: "experiments[0].tables[0].rows" holds rows that are not lists'),
        ({"experiments": [], "versions": ["1.0"]}, 'results.json: "versions" is not an object'),
    ],
)  # fmt: skip
def test_lab_report_leaves_out_malformed_fields_with_a_note(
    tmp_path: Path, results: dict[str, Any], note: str
) -> None:
    (tmp_path / "results.json").write_text(json.dumps(results))
    page = write_lab_report(tmp_path).read_text(encoding="utf-8")
    notes = reading_notes(page)
    assert any(n.startswith(note) for n in notes), notes


def test_lab_results_that_are_no_object_are_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="results.json cannot be used: it holds no JSON object"):
        write_lab_report(tmp_path)
    (tmp_path / "results.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="results.json cannot be used: it is not valid JSON"):
        write_lab_report(tmp_path)


# --- never imports torch ---------------------------------------------------------------------


def test_report_modules_import_no_torch() -> None:
    """``report/`` imports only the stdlib, numpy, matplotlib (and its Pillow), torch-free modules.

    This test reads the imports of every module in ``report/``; the next one writes both
    reports in a fresh process and checks ``sys.modules`` (``gradguard/__init__.py`` loads
    its torch-backed names on first use only).
    """
    allowed_gradguard = {"gradguard.errors", "gradguard.causes", "gradguard._files"}
    for path in sorted((SRC / "report").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if module.startswith("gradguard."):
                    ok = module.startswith("gradguard.report") or module in allowed_gradguard
                else:
                    ok = top in sys.stdlib_module_names or top in ("numpy", "matplotlib", "PIL")
                    ok = ok or top == "__future__"
                assert ok, f"{path.name} imports {module}"
    for name in ("errors.py", "causes.py"):  # the gradguard modules report/ may import
        tree = ast.parse((SRC / name).read_text())
        imports = [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
        assert all(isinstance(n, ast.ImportFrom) and n.module == "__future__" for n in imports)
    tree = ast.parse((SRC / "_files.py").read_text())  # the standard library only
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert all(m == "__future__" or m in sys.stdlib_module_names for m in imported)


def test_report_runs_without_torch_loaded(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run", [[1.0, 0.5]] * 15, events=[event(3, "spike")])
    lab_dir = tmp_path / "lab"
    lab_dir.mkdir()
    (lab_dir / "results.json").write_text(json.dumps({"experiments": []}))
    script = textwrap.dedent(
        f"""
        import sys
        from gradguard.report import run_verdict, write_lab_report, write_report
        written = write_report({str(run_dir)!r}), write_lab_report({str(lab_dir)!r})
        print(all(path.is_file() for path in written))
        print(sorted(m for m in sys.modules if m.split(".")[0] == "torch"))
        """
    )
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["True", "[]"]


# --- lab run ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lab") / "lab-run"
    lab.run(["depth-activation"], quick=True, out=out, progress=False)
    return out


def test_lab_report(lab_dir: Path) -> None:
    results = json.loads((lab_dir / "results.json").read_text(encoding="utf-8"))
    claims = [c for e in results["experiments"] for c in e["claims"]]
    page = write_lab_report(lab_dir).read_text(encoding="utf-8")
    assert verdict_of(page) == ("ok", f"All {len(claims)} claims reproduced.")
    assert 'id="exp-depth-activation"' in page
    for claim in claims:
        assert f"<td>{html.escape(claim['id'])}</td>" in page
    embedded = re.findall(
        r'id="img-depth-activation"[^>]* src="data:image/png;base64,([^"]+)"', page
    )
    assert [base64.b64decode(d) for d in embedded] == [
        (lab_dir / "depth-activation.png").read_bytes()
    ]
    assert not re.search(r'(?:src|href)="(?!data:|#)', page)


def test_lab_report_links_guarded_runs_and_lists_other_figures(
    lab_dir: Path, tmp_path: Path
) -> None:
    copy = Path(shutil.copytree(lab_dir, tmp_path / "lab"))
    write_run(copy / "recovery-run", [[1.0, 2.0]] * 10)
    shutil.copy(copy / "depth-activation.png", copy / "unrelated.png")
    page = write_lab_report(copy).read_text(encoding="utf-8")
    assert '<a href="recovery-run/report.html">recovery-run</a>' in page
    assert (copy / "recovery-run" / "report.html").is_file()
    assert re.search(r'id="other-figures">.*id="img-unrelated"', page, re.S)


def test_configuration_shows_each_param_group_real_settings(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(
        [
            {"params": model[0].parameters(), "lr": 3e-4, "weight_decay": 0.0},
            {"params": model[2].parameters(), "betas": (0.8, 0.95)},
        ],
        lr=1e-3,
        weight_decay=0.05,
    )
    run_dir = tmp_path / "run"
    guard = gg.Guard(model, optimizer, log_every=2, run_dir=run_dir, tensorboard=False)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
        guard.step()
    guard.close()
    groups = json.loads((run_dir / "meta.json").read_text())["config"]["param_groups"]
    assert [(g["params"], g["lr"], g["weight_decay"], g["betas"]) for g in groups] == [
        (2, 3e-4, 0.0, [0.9, 0.999]),
        (2, 1e-3, 0.05, [0.8, 0.95]),
    ]
    page = write_report(run_dir).read_text()
    config = section_of(page, "config")
    assert "Optimizer parameter groups (2)" in config
    table = config[config.index("Optimizer parameter groups") :]
    cells = [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>.*?</td>", table)]
    assert cells[:5] == ["0", "2", "0.0003", "0.0", "[0.9, 0.999]"]
    row = cells.index("1")
    assert cells[row : row + 5] == ["1", "2", "0.001", "0.05", "[0.8, 0.95]"]
