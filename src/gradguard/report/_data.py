"""Read a run directory (``docs/run-format.md``) into arrays, without torch or the guard.

The reader is forgiving where a crash or an old run can leave gaps: a torn last line is
dropped, a missing file gives no rows, and each gap becomes a note the report shows.
Steps repeated after a rollback are kept apart: the rows a rollback undid are
"superseded" and drawn faintly, the rows the model finally went through are "final".
An event that lasts several steps (a streak) is rewritten by the guard while it grows;
the reader keeps one event per streak, its last row.
"""

from __future__ import annotations

import json
import math
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


def number(value: Any) -> float:
    """A JSON number, ``"nan"``/``"inf"``/``"-inf"`` or null as a float (null: NaN)."""
    if value is None or isinstance(value, bool):
        return math.nan if value is None else float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def read_jsonl(path: Path) -> tuple[list[dict[str, Any]], str | None]:
    """The rows of a JSON-lines file and a note on what was dropped (None if nothing).

    A last line that does not parse is what a crash mid-write leaves: it is dropped
    with a note. A bad line elsewhere is a damaged file and is dropped too, noted.
    """
    if not path.is_file():
        return [], f"{path.name} is missing"
    rows: list[dict[str, Any]] = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    bad: list[int] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad.append(i + 1)
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad.append(i + 1)
    if not bad:
        return rows, None
    if bad == [len(lines)]:
        return rows, f"{path.name}: the torn last line (line {bad[0]}) was ignored"
    return rows, f"{path.name}: {len(bad)} unreadable lines ignored (first: line {bad[0]})"


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
    """A row's integer step field, or None when it is absent or not a finite number."""
    value = number(row.get(key))
    return int(value) if math.isfinite(value) else None


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
        return np.array([int(number(r.get("step"))) for r in self.metrics], dtype=np.int64)

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
        steps = np.array([int(number(r.get("step"))) for r in rows], dtype=np.int64)
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
        steps = np.array([int(number(r.get("step"))) for r in rows], dtype=np.int64)
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
    if value in ("info", "warning", "error"):
        return str(value)
    return "info" if event.get("kind") == "cooldown" else "warning"


def load_run(run_dir: Path) -> RunData:
    """Read a run directory; missing or torn files become notes, never errors."""
    notes: list[str] = []
    meta: dict[str, Any] = {}
    meta_path = run_dir / META_FILE
    if meta_path.is_file():
        try:
            loaded = json.loads(meta_path.read_text(encoding="utf-8"))
            meta = loaded if isinstance(loaded, dict) else {}
        except json.JSONDecodeError:
            notes.append(f"{META_FILE} could not be parsed")
    else:
        notes.append(f"{META_FILE} is missing")
    tables = {}
    for name in (METRICS_FILE, LAYERS_FILE, EVENTS_FILE):
        rows, note = read_jsonl(run_dir / name)
        tables[name] = rows
        if note and not (name == EVENTS_FILE and note.endswith("missing")):
            notes.append(note)  # no events.jsonl is normal before the first event
    return RunData(
        run_dir=run_dir,
        meta=meta,
        metrics=tables[METRICS_FILE],
        layers=tables[LAYERS_FILE],
        events=merge_streaks(tables[EVENTS_FILE]),
        notes=notes,
        event_rows=tables[EVENTS_FILE],
    )
