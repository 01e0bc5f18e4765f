"""Read a run directory (``docs/run-format.md``) into arrays, without torch or the guard.

The reader is forgiving where a crash or an old run can leave gaps: a torn last line is
dropped, a missing file gives no rows, and each gap becomes a note the report shows.
Steps repeated after a rollback are kept apart: the rows a rollback undid are
"superseded" and drawn faintly, the rows the model finally went through are "final".
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


@dataclass(frozen=True)
class RunData:
    """A run directory's content, as read; arrays are computed on first use.

    Attributes:
        run_dir: the directory.
        meta: ``meta.json`` (empty when missing).
        metrics: ``metrics.jsonl`` rows, in file order.
        layers: ``layers.jsonl`` rows, in file order.
        events: ``events.jsonl`` rows, in file order.
        notes: what could not be read, for the reader of the report.
    """

    run_dir: Path
    meta: dict[str, Any]
    metrics: list[dict[str, Any]]
    layers: list[dict[str, Any]]
    events: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)

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

    def events_of(self, *kinds: str, attention: bool = False) -> list[dict[str, Any]]:
        """Events of the given kinds, in file order; with ``attention``, warnings and errors."""
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
        events=tables[EVENTS_FILE],
        notes=notes,
    )
