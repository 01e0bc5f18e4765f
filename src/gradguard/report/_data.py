"""Read a run directory (``docs/run-format.md``) into arrays, without torch or the guard.

The reader never fails on what a run directory holds: a torn last line (what a crash
mid-write leaves) is dropped, a missing or unreadable file gives no rows, a line that is
not a JSON object is skipped, a field whose type differs from the format's is set aside,
and each of these becomes a reading note (file, line, what was done) the report shows.
The figures, the verdict and the tables then work on checked rows only.
Steps repeated after a rollback are kept apart: the rows a rollback undid are
"superseded" and drawn faintly, the rows the model finally went through are "final".
An event that lasts several steps (a streak) is rewritten by the guard while it grows;
the reader keeps one event per streak, its last row.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

META_FILE = "meta.json"
METRICS_FILE = "metrics.jsonl"
LAYERS_FILE = "layers.jsonl"
EVENTS_FILE = "events.jsonl"

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

MAX_STEP = 2**53  # steps and counts beyond this are not whole numbers in a float
_NON_FINITE = frozenset({"nan", "inf", "-inf", "+inf", "infinity", "-infinity", "+infinity"})
SEVERITIES = ("info", "warning", "error")


def number(value: Any) -> float:
    """A JSON number, ``"nan"``/``"inf"``/``"-inf"`` or null as a float (null: NaN)."""
    if value is None or isinstance(value, bool):
        return math.nan if value is None else float(value)
    try:
        return float(value)
    except OverflowError:  # an integer literal beyond the float range
        return math.inf if value > 0 else -math.inf
    except (TypeError, ValueError):
        return math.nan


def is_number(value: Any) -> bool:
    """Whether ``value`` is a number as the run format writes one.

    That is a JSON number (``NaN`` and ``Infinity`` literals included) or one of the
    strings ``"nan"``, ``"inf"``, ``"-inf"`` standing for a non-finite value; booleans,
    other strings, lists and objects are not.

    Example:
        >>> [is_number(v) for v in (1, 0.5, "nan", "-inf", "abc", "1.5", True, [1], None)]
        [True, True, True, True, False, False, False, False, False]
    """
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return True
    return isinstance(value, str) and value.strip().lower() in _NON_FINITE


def as_step(value: Any) -> int | None:
    """A step (or count) as an int: a whole JSON number from 0 to 2**53, else None.

    Example:
        >>> [as_step(v) for v in (7, 7.0, 7.5, -1, "7", None, float("nan"), True)]
        [7, 7, None, None, None, None, None, None]
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not value.is_integer():  # NaN and Inf included
        return None
    return int(value) if 0 <= value <= MAX_STEP else None


def shown(value: Any, width: int = 40) -> str:
    """A value as compact JSON for a note, cut to ``width`` characters."""
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError):  # pragma: no cover - parsed JSON always dumps
        text = repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _kind_of(value: Any) -> str:
    """What a JSON value is, in words: ``a string``, ``a list``, ``null``..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object"


class ReadingNotes:
    """What the reader skipped or set aside, grouped so a damaged file gives a few lines.

    Problems of one kind in one file (the same field, the same fault, the same remedy)
    make one note naming the line, or the count and the first lines when there are
    several: a file with ten thousand bad rows still gives a short list.
    """

    _LINES_SHOWN = 3

    def __init__(self) -> None:
        self._order: list[tuple[str, str, str] | str] = []
        self._lines: dict[tuple[str, str, str], list[int]] = {}
        self._examples: dict[tuple[str, str, str], str] = {}

    def note(self, text: str) -> None:
        """A note about a whole file (missing, torn, unreadable)."""
        if text not in self._order:
            self._order.append(text)

    def add(self, file: str, line: int | None, problem: str, action: str, got: str = "") -> None:
        """One problem at ``line`` of ``file`` (None: the file as a whole, e.g. meta.json).

        Args:
            file: the file's name.
            line: its 1-based line number, or None.
            problem: what is wrong, e.g. ``"loss" is not a number``.
            action: what the reader did about it, e.g. ``read as missing``.
            got: the value found, shown for the first occurrence.
        """
        key = (file, problem, action)
        if key not in self._lines:
            self._order.append(key)
            self._lines[key] = []
            self._examples[key] = got
        if line is not None:
            self._lines[key].append(line)

    def __bool__(self) -> bool:
        return bool(self._order)

    def lines(self) -> list[str]:
        """The notes, in the order the problems were first met."""
        return [item if isinstance(item, str) else self._render(item) for item in self._order]

    def _render(self, key: tuple[str, str, str]) -> str:
        file, problem, action = key
        lines, got = self._lines[key], self._examples[key]
        if len(lines) <= 1:
            where = f"{file} line {lines[0]}" if lines else file
            value = f" (got {got})" if got else ""
        else:
            first = ", ".join(str(n) for n in lines[: self._LINES_SHOWN])
            more = ", …" if len(lines) > self._LINES_SHOWN else ""
            where = f"{file}, {len(lines)} lines ({first}{more})"
            value = f" (first: {got})" if got else ""
        return f"{where}: {problem}{value}; {action}"


def read_jsonl(path: Path, notes: ReadingNotes) -> list[tuple[int, dict[str, Any]]] | None:
    """The JSON objects of a JSON-lines file with their line numbers; the rest noted.

    A last line that does not parse is what a crash mid-write leaves: it is dropped
    with a note. A line elsewhere that does not parse, or that is not a JSON object
    (``[1, 2]``, ``42``), is a damaged file: it is dropped too, with its line number.
    A file that is missing, not a regular file or unreadable gives None and a note.
    """
    if not path.exists():
        notes.note(f"{path.name} is missing")
        return None
    if not path.is_file():
        notes.note(f"{path.name} is not a regular file; ignored")
        return None
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as error:
        notes.note(f"{path.name} could not be read ({error.strerror or error}); ignored")
        return None
    rows: list[tuple[int, dict[str, Any]]] = []
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):  # JSONDecodeError, digit limits, deep nesting
            if i == last:
                notes.note(f"{path.name}: the torn last line (line {i + 1}) was ignored")
            else:
                notes.add(path.name, i + 1, "not valid JSON", "line ignored", shown(line))
            continue
        if isinstance(row, dict):
            rows.append((i + 1, row))
        else:
            problem = f"{_kind_of(row)}, not a JSON object"
            notes.add(path.name, i + 1, problem, "line ignored", shown(row))
    return rows


def superseded(steps: npt.NDArray[np.int64]) -> BoolArray:
    """Rows whose step is logged again later: the steps a rollback undid.

    Example:
        >>> superseded(np.array([1, 2, 3, 2, 3, 4])).tolist()
        [False, True, True, False, False, False]
    """
    if steps.size == 0:
        return np.zeros(0, dtype=bool)
    later_min = np.minimum.accumulate(steps[::-1])[::-1]  # min over rows i..end
    out = np.zeros(steps.shape, dtype=bool)
    out[:-1] = steps[:-1] >= later_min[1:]
    return out


def step_of(row: dict[str, Any], key: str = "step") -> int | None:
    """A row's step field as an int, or None when it is absent or not a step (``as_step``)."""
    return as_step(row.get(key))


def merge_streaks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One event per streak, the last row of each, ordered by onset (``first_step``).

    The guard rewrites a streak's row while it grows, so rows with the same kind, cause,
    metric and first step are one event and the last one wins (rows from before streaks
    existed use ``step`` as their first step; the metric is part of the key because a
    loss spike and a gradient-norm spike at one step are two events). A rollback that
    restored a step before an event's onset undid it: a row with the same key after the
    rollback is the replayed step's own event, not a rewrite. Every merged event carries
    ``first_step``, ``last_step`` and ``count``; rows without a step are dropped.

    Example:
        >>> rows = [{"step": 5, "kind": "nonfinite", "count": 1},
        ...         {"step": 5, "kind": "nonfinite", "count": 3, "first_step": 5},
        ...         {"step": 2, "kind": "spike"}]
        >>> [(e["first_step"], e["count"]) for e in merge_streaks(rows)]
        [(2, 1), (5, 3)]
    """
    merged: list[dict[str, Any]] = []
    open_streaks: dict[tuple[str, str, str, int], int] = {}
    for row in rows:
        step = step_of(row)
        first = step_of(row, "first_step")
        first = step if first is None else first
        if first is None:
            continue
        if row.get("kind") == "rollback":
            restored = number(row.get("value"))
            if math.isfinite(restored):
                for key in [k for k in open_streaks if k[3] > restored]:
                    del open_streaks[key]
        last = step_of(row, "last_step")
        count = step_of(row, "count")
        event = {
            **row,
            "first_step": first,
            "last_step": max(first, last if last is not None else step or first),
            "count": max(1, 1 if count is None else count),
        }
        kind, cause, metric = (str(row.get(k) or "") for k in ("kind", "cause", "metric"))
        streak = (kind, cause, metric, first)
        if streak in open_streaks:
            merged[open_streaks[streak]] = event
        else:
            open_streaks[streak] = len(merged)
            merged.append(event)
    return sorted(merged, key=lambda e: int(e["first_step"]))  # stable: file order per step


@dataclass(frozen=True)
class RunData:
    """A run directory's content, as read; arrays are computed on first use.

    Attributes:
        run_dir: the directory.
        meta: ``meta.json`` (empty when missing).
        metrics: ``metrics.jsonl`` rows, in file order.
        layers: ``layers.jsonl`` rows, in file order.
        events: one event per streak (``merge_streaks``), ordered by onset.
        notes: what could not be read, for the reader of the report.
        event_rows: ``events.jsonl`` rows as written, in file order (a rollback and its
            cool-down are paired in this order).
    """

    run_dir: Path
    meta: dict[str, Any]
    metrics: list[dict[str, Any]]
    layers: list[dict[str, Any]]
    events: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    event_rows: list[dict[str, Any]] = field(default_factory=list)

    @cached_property
    def steps(self) -> npt.NDArray[np.int64]:
        """The step of each metrics row."""
        return np.array([int(r["step"]) for r in self.metrics], dtype=np.int64)

    @cached_property
    def final(self) -> BoolArray:
        """Metrics rows the model finally went through (not undone by a rollback)."""
        return ~superseded(self.steps)

    def column(self, name: str) -> FloatArray:
        """A metrics field for every row, as floats (NaN where null or absent)."""
        return np.array([number(r.get(name)) for r in self.metrics], dtype=np.float64)

    def flag(self, name: str) -> BoolArray:
        """A boolean metrics field for every row (False where absent)."""
        return np.array([bool(r.get(name, False)) for r in self.metrics], dtype=bool)

    def has(self, name: str) -> bool:
        """Whether at least one metrics row carries a value for ``name``."""
        return any(r.get(name) is not None for r in self.metrics)

    @property
    def layer_names(self) -> list[str]:
        """Layer names in depth order (``meta.json``)."""
        return [str(n) for n in self.meta.get("layer_names", [])]

    @cached_property
    def layer_matrix(self) -> tuple[npt.NDArray[np.int64], FloatArray]:
        """Final (not rolled-back) ``layers.jsonl`` rows: their steps, and norms [step, layer].

        Rows whose length differs from ``layer_names`` are left out.
        """
        width = len(self.layer_names)
        rows = [r for r in self.layers if len(r.get("norms", ())) == width and width]
        steps = np.array([int(r["step"]) for r in rows], dtype=np.int64)
        norms = np.array([[number(v) for v in r["norms"]] for r in rows], dtype=np.float64)
        keep = ~superseded(steps)
        return steps[keep], norms.reshape(len(rows), width)[keep]

    @cached_property
    def update_ratio_matrix(self) -> tuple[npt.NDArray[np.int64], FloatArray, BoolArray]:
        """Final ``layers.jsonl`` rows with update ratios: steps, ratios, measured [step, layer].

        Only some rows carry ``update_ratio`` and each measures a subset of the layers
        (null for the others), so ``measured`` tells a missing value from a NaN one.
        Rows whose length differs from ``layer_names`` are left out.
        """
        width = len(self.layer_names)
        rows = [
            r
            for r in self.layers
            if width and isinstance(r.get("update_ratio"), list) and len(r["update_ratio"]) == width
        ]
        steps = np.array([int(r["step"]) for r in rows], dtype=np.int64)
        ratios = [r["update_ratio"] for r in rows]
        values = np.array([[number(v) for v in r] for r in ratios], dtype=np.float64)
        measured = np.array([[v is not None for v in r] for r in ratios], dtype=bool)
        keep = ~superseded(steps)
        shape = (len(rows), width)
        return steps[keep], values.reshape(shape)[keep], measured.reshape(shape)[keep]

    @cached_property
    def first_attention_step(self) -> int | None:
        """The onset of the first warning or error, or None when the run had none."""
        onsets = [int(e["first_step"]) for e in self.events if severity(e) != "info"]
        return min(onsets) if onsets else None

    def events_of(self, *kinds: str, attention: bool = False) -> list[dict[str, Any]]:
        """Events of the given kinds by onset; with ``attention``, warnings and errors only."""
        return [
            e
            for e in self.events
            if e.get("kind") in kinds and not (attention and severity(e) == "info")
        ]


def severity(event: dict[str, Any]) -> str:
    """An event row's severity; rows from before severity existed read as warnings."""
    value = event.get("severity")
    if value in SEVERITIES:
        return str(value)
    return "info" if event.get("kind") == "cooldown" else "warning"


# --- checking each row against docs/run-format.md ---------------------------------------
#
# Every field the report reads is checked for its type here, once, so the figures, the
# verdict and the tables can trust what they get. A value of the wrong type is set
# aside (a number read as missing, anything else removed) and a row without a usable
# step or kind is dropped; each with a reading note naming the file, the line and why.

_METRIC_NUMBERS = ("loss", "grad_norm", "clipped_norm", "scale", "lr")
_METRIC_FLAGS = ("skipped", "finite", "overflow", "zeroed")
_EVENT_NUMBERS = ("value", "threshold")
_EVENT_STEPS = ("first_step", "last_step", "count")
_EVENT_TEXTS = ("metric", "message", "cause")
_EVENT_OBJECTS = ("evidence", "extra")
_META_LISTS = ("layer_names", "tensor_names", "sessions")
_META_OBJECTS = ("layer_depth", "config", "versions")
_STEP_WORDS = "a whole number from 0 to 2^53"


class _RowChecker:
    """Checks the fields of one row of one file, noting each problem with its line."""

    def __init__(self, notes: ReadingNotes, file: str, line: int | None, row: dict[str, Any]):
        self.notes, self.file, self.line = notes, file, line
        self.row = dict(row)

    def problem(self, key: str, what: str, action: str) -> None:
        """Note that ``key`` is not ``what`` (e.g. ``a number``) and what was done."""
        value = self.row.get(key)
        problem = f'"{key}" is missing' if key not in self.row else f'"{key}" is not {what}'
        got = "" if key not in self.row else shown(value)
        self.notes.add(self.file, self.line, problem, action, got)

    def step(self, key: str = "step") -> int | None:
        """The required step field as an int, or None (the caller drops the row)."""
        step = as_step(self.row.get(key))
        if step is None:
            self.problem(key, _STEP_WORDS, "row ignored")
        return step

    def numbers(self, keys: tuple[str, ...]) -> None:
        """Nullable numbers: a value of another type is read as missing (null)."""
        for key in keys:
            value = self.row.get(key)
            if value is not None and not is_number(value):
                self.problem(key, "a number", "read as missing")
                self.row[key] = None

    def whole_numbers(self, keys: tuple[str, ...]) -> None:
        """Optional steps and counts: a value that is not one is removed."""
        for key in keys:
            value = self.row.get(key)
            if value is not None and as_step(value) is None:
                self.problem(key, _STEP_WORDS, "ignored")
                del self.row[key]

    def typed(self, keys: tuple[str, ...], kind: type | tuple[type, ...], what: str) -> None:
        """Optional fields of one JSON type: null is dropped, another type removed, noted."""
        for key in keys:
            if key not in self.row:
                continue
            value = self.row[key]
            if value is not None and not isinstance(value, kind):
                self.problem(key, what, "ignored")
            if value is None or not isinstance(value, kind):
                del self.row[key]

    def number_list(self, key: str, action: str, nullable: bool) -> None:
        """A list of numbers (and nulls, when ``nullable``); anything else is removed."""
        if key not in self.row:
            return
        value = self.row[key]
        ok = isinstance(value, list) and all(
            is_number(v) or (nullable and v is None) for v in value
        )
        if not ok:
            self.problem(key, "a list of numbers", action)
            del self.row[key]


_Cleaner = Callable[[_RowChecker], dict[str, Any] | None]


def _clean_metrics_row(checker: _RowChecker) -> dict[str, Any] | None:
    """A ``metrics.jsonl`` row: a step, nullable numbers and boolean flags."""
    step = checker.step()
    if step is None:
        return None
    checker.row["step"] = step
    checker.numbers(_METRIC_NUMBERS)
    checker.typed(_METRIC_FLAGS, bool, "true or false")
    return checker.row


def _clean_layers_row(checker: _RowChecker, width: int) -> dict[str, Any] | None:
    """A ``layers.jsonl`` row: a step, ``norms`` and ``update_ratio`` of ``width`` values."""
    step = checker.step()
    if step is None:
        return None
    checker.row["step"] = step
    checker.number_list("norms", "left out of the heatmap", nullable=True)
    checker.number_list("update_ratio", "left out of the update-ratio heatmap", nullable=True)
    for key in ("norms", "update_ratio"):
        values = checker.row.get(key)
        if width and values is not None and len(values) != width:
            checker.notes.add(
                checker.file,
                checker.line,
                f'"{key}" has a value count other than the {width} layers of {META_FILE}',
                "left out of the heatmap",
                f"{len(values)} values",
            )
            del checker.row[key]
    return checker.row


def _clean_advice(checker: _RowChecker) -> None:
    """``advice``: a list of ``{"text": ...}`` objects or strings; other items removed."""
    advice = checker.row.get("advice")
    if advice is None or not isinstance(advice, list):
        checker.typed(("advice",), list, "a list")
        return

    def readable(item: Any) -> bool:
        return isinstance(item, str) or (
            isinstance(item, dict) and isinstance(item.get("text"), str)
        )

    kept = [item for item in advice if readable(item)]
    if len(kept) < len(advice):
        checker.problem("advice", 'a list of {"text": ...} objects', "unreadable items ignored")
        checker.row["advice"] = kept


def _clean_event_row(checker: _RowChecker) -> dict[str, Any] | None:
    """An ``events.jsonl`` row: a step and a kind, then each optional field by its type."""
    step = checker.step()
    if step is None:
        return None
    checker.row["step"] = step
    kind = checker.row.get("kind")
    if not isinstance(kind, str) or not kind:
        checker.problem("kind", "a non-empty string", "row ignored")
        return None
    if "severity" in checker.row and checker.row["severity"] not in SEVERITIES:
        checker.problem("severity", "info, warning or error", "read as a warning")
        del checker.row["severity"]
    checker.numbers(_EVENT_NUMBERS)
    checker.whole_numbers(_EVENT_STEPS)
    checker.typed(_EVENT_TEXTS, str, "a string")
    checker.typed(_EVENT_OBJECTS, dict, "an object")
    layers = checker.row.get("layers")
    if isinstance(layers, list) and not all(isinstance(n, str) for n in layers):
        checker.problem("layers", "a list of strings", "items that are not strings ignored")
        checker.row["layers"] = [n for n in layers if isinstance(n, str)]
    checker.typed(("layers",), list, "a list of strings")
    _clean_advice(checker)
    return checker.row


def _clean_meta(value: Any, notes: ReadingNotes) -> dict[str, Any]:
    """``meta.json``: an object whose lists and objects have their documented types."""
    if not isinstance(value, dict):
        notes.add(META_FILE, None, f"{_kind_of(value)}, not a JSON object", "ignored")
        return {}
    checker = _RowChecker(notes, META_FILE, None, value)
    names = checker.row.get("layer_names")
    if names is not None and not (
        isinstance(names, list) and all(isinstance(n, str) for n in names)
    ):
        checker.problem("layer_names", "a list of strings", "the per-layer figures are skipped")
        del checker.row["layer_names"]
    checker.typed(_META_LISTS, list, "a list")
    checker.typed(_META_OBJECTS, dict, "an object")
    sessions = checker.row.get("sessions", [])
    if not all(isinstance(s, dict) for s in sessions):
        checker.problem("sessions", "a list of objects", "items that are not objects ignored")
        checker.row["sessions"] = [s for s in sessions if isinstance(s, dict)]
    return checker.row


def _read_meta(run_dir: Path, notes: ReadingNotes) -> dict[str, Any]:
    """``meta.json`` checked (empty, with a note, when missing or unreadable)."""
    path = run_dir / META_FILE
    if not path.is_file():
        missing = not path.exists()
        notes.note(f"{META_FILE} is {'missing' if missing else 'not a regular file; ignored'}")
        return {}
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        notes.note(f"{META_FILE} could not be read ({error.strerror or error}); ignored")
        return {}
    except (ValueError, RecursionError):  # not JSON, or not UTF-8
        notes.note(f"{META_FILE} could not be parsed (not valid JSON); ignored")
        return {}
    return _clean_meta(loaded, notes)


def _restart_steps(meta: dict[str, Any], events: list[dict[str, Any]]) -> set[int]:
    """Steps at which the step counter may go back: after a rollback, or a resumed session."""
    steps = set()
    for event in events:
        if (
            event.get("kind") == "rollback"
            and (restored := as_step(event.get("value"))) is not None
        ):
            steps.add(restored + 1)
    for session in meta.get("sessions", ()):
        if (start := as_step(session.get("start_step"))) is not None:
            steps.add(start + 1)
    return steps


def _note_steps_going_back(
    file: str, rows: list[tuple[int, dict[str, Any]]], restarts: set[int], notes: ReadingNotes
) -> None:
    """Note where the step goes back with no rollback or resumed session to explain it.

    The rows before such a place are drawn as undone (the reader cannot tell which pass
    the model kept); a note says so, so out-of-order rows are not taken for a rollback.
    """
    for (_, before), (line, row) in zip(rows, rows[1:], strict=False):
        if row["step"] <= before["step"] and row["step"] not in restarts:
            notes.add(
                file,
                line,
                "the step goes back with no rollback or resumed session",
                "the rows before it are drawn as undone",
                f"step {row['step']} after step {before['step']}",
            )


def load_run(run_dir: Path) -> RunData:
    """Read a run directory; whatever it holds, the result is a report, never an error.

    Missing, empty, torn or unreadable files, lines that are not JSON objects, fields
    of the wrong type and steps out of order become reading notes (file, line and what
    was done); the values that could be read are kept.
    """
    notes = ReadingNotes()
    meta = _read_meta(run_dir, notes)
    width = len(meta.get("layer_names", ()))

    def rows_of(name: str, clean: _Cleaner) -> list[tuple[int, dict[str, Any]]]:
        """The checked rows of one file, with their line numbers."""
        read = read_jsonl(run_dir / name, notes)
        out = []
        for line, raw in read or ():
            row = clean(_RowChecker(notes, name, line, raw))
            if row is not None:
                out.append((line, row))
        if read is not None and not out and name != EVENTS_FILE:
            notes.note(f"{name} has no readable rows")  # no events is a healthy run
        return out

    metrics = rows_of(METRICS_FILE, _clean_metrics_row)
    layers = rows_of(LAYERS_FILE, lambda checker: _clean_layers_row(checker, width))
    event_rows = rows_of(EVENTS_FILE, _clean_event_row)
    restarts = _restart_steps(meta, [row for _, row in event_rows])
    for name, rows in ((METRICS_FILE, metrics), (LAYERS_FILE, layers)):
        _note_steps_going_back(name, rows, restarts, notes)
    lines = [n for n in notes.lines() if n != f"{EVENTS_FILE} is missing"]
    events = [row for _, row in event_rows]
    return RunData(
        run_dir=run_dir,
        meta=meta,
        metrics=[row for _, row in metrics],
        layers=[row for _, row in layers],
        events=merge_streaks(events),
        notes=lines,  # no events.jsonl is normal before the first event
        event_rows=events,
    )
