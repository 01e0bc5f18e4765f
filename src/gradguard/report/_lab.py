"""``LAB_DIR/report.html`` for a lab run: ``results.json`` and the figures beside it."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gradguard.report._data import META_FILE, METRICS_FILE, ReadingNotes, number, shown
from gradguard.report._html import definitions, esc, fmt, image, page, table

RESULTS_FILE = "results.json"
_CLAIM_COLUMNS = ("claim", "source", "statement", "paper", "measured", "criterion", "outcome")
_OUTCOME_CLASS = {"reproduced": "pass", "refuted": "warn", "not reproduced at this scale": "fail"}


def _outcome(claim: Mapping[str, Any]) -> str:
    """The claim's outcome; a results file older than outcomes has only ``passed``."""
    outcome = claim.get("outcome")
    if outcome in _OUTCOME_CLASS:
        return str(outcome)
    return "reproduced" if claim.get("passed") else "not reproduced at this scale"


def _elsewhere(claim: Mapping[str, Any], where: str, notes: ReadingNotes) -> str:
    """The claim's results at the other scales on record, as text."""
    parts = []
    for other in _objects(claim.get("elsewhere"), f"{where}.elsewhere", notes):
        mark = "reproduced" if other.get("passed") else "not reproduced"
        parts.append(f"{other.get('variant', '?')}: {other.get('measured', '?')}, {mark}")
    return "; ".join(parts)


def _list(value: Any, where: str, notes: ReadingNotes) -> list[Any]:
    """A list field of ``results.json``; absent or null is empty, another type is noted."""
    if value is None:
        return []
    if isinstance(value, list):
        return value
    notes.add(RESULTS_FILE, None, f'"{where}" is not a list', "left out", shown(value))
    return []


def _objects(value: Any, where: str, notes: ReadingNotes) -> list[Mapping[str, Any]]:
    """A list of objects of ``results.json``; items of another type are left out, noted."""
    items = _list(value, where, notes)
    kept: list[Mapping[str, Any]] = [item for item in items if isinstance(item, dict)]
    if len(kept) < len(items):
        bad = next(item for item in items if not isinstance(item, dict))
        problem = f'"{where}" holds items that are not objects'
        notes.add(RESULTS_FILE, None, problem, "those items left out", shown(bad))
    return kept


def _object(value: Any, where: str, notes: ReadingNotes) -> Mapping[str, Any]:
    """An object field of ``results.json``; absent or null is empty, another type noted."""
    if value is None or isinstance(value, dict):
        return value or {}
    notes.add(RESULTS_FILE, None, f'"{where}" is not an object', "left out", shown(value))
    return {}


def _measured(claim: Mapping[str, Any], where: str, notes: ReadingNotes) -> str:
    """The measurement: the value, or the mean and range over seeds and configurations."""
    values = [number(v) for v in _list(claim.get("values"), f"{where}.values", notes)]
    note = str(claim.get("note", "") or "")
    if len(values) == 1:
        text = fmt(values[0])
    elif values and len(set(values)) == 1:
        text = f"{fmt(values[0])} (all {len(values)})"
    elif values:
        low, high = fmt(number(claim.get("min"))), fmt(number(claim.get("max")))
        text = f"{fmt(number(claim.get('mean')))} (range {low}–{high}, n={len(values)})"
    else:
        text = "no value"
    return f"{text}; {note}" if note else text


def _claims(claims: Sequence[Mapping[str, Any]], where: str, notes: ReadingNotes) -> str:
    """The claims table: paper against measurement, pass or fail."""
    if not claims:
        return '<p class="note">No claims.</p>'
    rows, classes = [], {}
    for i, claim in enumerate(claims):
        outcome = _outcome(claim)
        classes[(i, 6)] = _OUTCOME_CLASS[outcome]
        counted = f"{claim.get('n_passed', '?')}/{claim.get('n', '?')} pass"
        beside = _elsewhere(claim, f"{where}[{i}]", notes)
        rows.append(
            (
                claim.get("id", ""),
                claim.get("source", ""),
                claim.get("statement", ""),
                claim.get("paper", ""),
                _measured(claim, f"{where}[{i}]", notes),
                claim.get("criterion", ""),
                f"{outcome} ({counted})"
                + (f"; {beside}" if beside and outcome != "reproduced" else ""),
            )
        )
    return table(_CLAIM_COLUMNS, rows, cell_class=classes)


def _tables(tables: Sequence[Mapping[str, Any]], where: str, notes: ReadingNotes) -> str:
    """The experiment's result tables, folded: the claims and figures come first."""
    if not tables:
        return ""
    out = []
    for i, t in enumerate(tables):
        note = f'<p class="note">{esc(t["note"])}</p>' if t.get("note") else ""
        columns = [str(c) for c in _list(t.get("columns"), f"{where}[{i}].columns", notes)]
        rows = _list(t.get("rows"), f"{where}[{i}].rows", notes)
        kept = [row for row in rows if isinstance(row, list)]
        if len(kept) < len(rows):
            problem = f'"{where}[{i}].rows" holds rows that are not lists'
            notes.add(RESULTS_FILE, None, problem, "those rows left out")
        out.append(f"<h4>{esc(t.get('title', ''))}</h4>{table(columns, kept)}{note}")
    return f"<details><summary>Result tables ({len(tables)})</summary>{''.join(out)}</details>"


def _figures_by_experiment(lab_dir: Path, names: Sequence[str]) -> dict[str, list[Path]]:
    """PNG files named after an experiment (``<name>.png``, ``<name>-*.png``); the rest to ""."""
    found: dict[str, list[Path]] = {name: [] for name in [*names, ""]}
    for path in sorted(lab_dir.glob("*.png")):
        owners = [n for n in names if path.stem == n or path.stem.startswith(n + "-")]
        found[max(owners, key=len) if owners else ""].append(path)
    return found


def _figure_html(path: Path) -> str:
    return (
        f"<figure>{image(path.read_bytes(), path.stem, path.stem)}"
        f"<figcaption>{esc(path.name)}</figcaption></figure>"
    )


def _experiment(
    experiment: Mapping[str, Any], where: str, figures: Sequence[Path], notes: ReadingNotes
) -> str:
    """One experiment's section: status, setting, claims, figures, tables, references."""
    name = str(experiment.get("name", ""))
    references = _list(experiment.get("references"), f"{where}.references", notes)
    refs = "".join(f"<li>{esc(r)}</li>" for r in references)
    claims = _objects(experiment.get("claims"), f"{where}.claims", notes)
    tables = _objects(experiment.get("tables"), f"{where}.tables", notes)
    outcomes = [_outcome(c) for c in claims]
    status = ", ".join(f"{outcomes.count(o)} {o}" for o in _OUTCOME_CLASS if o in outcomes)
    duration = number(experiment.get("duration_s"))
    config = json.dumps(experiment.get("config", {}), indent=1, ensure_ascii=False)
    return (
        f'<section class="experiment" id="exp-{esc(name)}">'
        f"<h2>{esc(experiment.get('title', name))}</h2>"
        f'<p class="note"><code>{esc(name)}</code> · {esc(status)} · seeds '
        f"{esc(experiment.get('seeds', []))} · {fmt(duration)} s</p>"
        f"<p>{esc(experiment.get('setting', ''))}</p>"
        f"<h3>Claims</h3>{_claims(claims, f'{where}.claims', notes)}"
        f"{''.join(_figure_html(p) for p in figures)}"
        f"{_tables(tables, f'{where}.tables', notes)}"
        f"<details><summary>References</summary><ul>{refs}</ul></details>"
        f"<details><summary>Configuration</summary><pre>{esc(config)}</pre></details>"
        "</section>"
    )


def _guard_runs(lab_dir: Path) -> str:
    """Guarded run directories inside the lab run: each gets its own report, linked here."""
    from gradguard.report._run_report import write_run_report

    runs = [d for d in sorted(lab_dir.iterdir()) if (d / META_FILE).is_file()]
    runs = [d for d in runs if (d / METRICS_FILE).is_file()]
    if not runs:
        return ""
    links = []
    for run_dir in runs:
        report = write_run_report(run_dir)
        href = esc(report.relative_to(lab_dir).as_posix())
        links.append(f'<li><a href="{href}">{esc(run_dir.name)}</a></li>')
    return f'<section id="runs"><h2>Guarded runs</h2><ul>{"".join(links)}</ul></section>'


def build_lab_report(lab_dir: Path, results: Mapping[str, Any]) -> str:
    """The whole page for a lab run."""
    notes = ReadingNotes()
    experiments = _objects(results.get("experiments"), "experiments", notes)
    quiet = ReadingNotes()  # for the verdict; each experiment's section notes its problems
    claims = [c for e in experiments for c in _objects(e.get("claims"), "claims", quiet)]
    by_outcome: dict[str, list[str]] = {o: [] for o in _OUTCOME_CLASS}
    for claim in claims:
        by_outcome[_outcome(claim)].append(str(claim.get("id")))
    small, refuted = by_outcome["not reproduced at this scale"], by_outcome["refuted"]
    if not claims:
        level, sentence = "warn", "No claims checked in this run."
    elif small or refuted:
        level = "bad" if small else "warn"
        sentence = f"{len(by_outcome['reproduced'])} of {len(claims)} claims reproduced"
        if refuted:
            sentence += f"; refuted at every scale tried (a finding): {', '.join(refuted)}"
        if small:
            sentence += f"; not reproduced at this scale: {', '.join(small)}"
        sentence += "."
    else:
        level, sentence = "ok", f"All {len(claims)} claims reproduced."
    names = [str(e.get("name", "")) for e in experiments]
    figures = _figures_by_experiment(lab_dir, names)
    about = {k: results.get(k) for k in ("seed", "quick", "started_at", "duration_s")}
    versions = _object(results.get("versions"), "versions", notes)
    about.update({f"{k} version": v for k, v in versions.items()})
    nav = "".join(f'<a href="#exp-{esc(n)}">{esc(n)}</a>' for n in names)
    body = [
        "<header><h1>gradguard lab report</h1>",
        f'<p class="path">{esc(lab_dir.resolve())}</p>',
        f'<p class="verdict {level}" id="verdict">{esc(sentence)}</p></header>',
        f"<nav>{nav}</nav>",
        *(
            _experiment(e, f"experiments[{i}]", figures[n], notes)
            for i, (e, n) in enumerate(zip(experiments, names, strict=True))
        ),
    ]
    if figures[""]:
        others = "".join(_figure_html(p) for p in figures[""])
        body.append(f'<section id="other-figures"><h2>Other figures</h2>{others}</section>')
    body.append(_guard_runs(lab_dir))
    body.append(f'<section id="config"><h2>Run</h2>{definitions(about)}</section>')
    if notes:
        items = "".join(f"<li>{esc(n)}</li>" for n in notes.lines())
        body.append(f'<section id="notes"><h2>Reading notes</h2><ul>{items}</ul></section>')
    return page(f"gradguard lab report: {lab_dir.name}", "\n".join(body))
