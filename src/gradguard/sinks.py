"""Where drained statistics and events go: the run directory (JSONL) and friends.

A sink reads records only (``Window``, ``Event``) and never the guard. The guard calls
``open`` once with the run's metadata, then ``write`` at every drain, then ``close``.
The run-directory format is documented in ``docs/run-format.md``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

from gradguard.errors import ConfigError
from gradguard.records import Event, Window, _json_float

META_FILE = "meta.json"
METRICS_FILE = "metrics.jsonl"
LAYERS_FILE = "layers.jsonl"
EVENTS_FILE = "events.jsonl"
RUN_FORMAT_VERSION = 1


@runtime_checkable
class Sink(Protocol):
    """What the guard needs from a destination for its logs."""

    def open(self, meta: Mapping[str, Any]) -> None:
        """Start (or resume) a run described by ``meta``."""
        ...

    def write(self, window: Window, events: Sequence[Event]) -> None:
        """Record the steps of one drain and the events it raised."""
        ...

    def close(self) -> None:
        """Flush and release resources; safe to call twice."""
        ...


def _atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and a rename, so a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class JsonlSink:
    """The run directory: ``meta.json`` and three append-only JSON-lines files.

    Each drain appends its lines with one ``write`` per file and flushes, so a crash can
    tear at most the last line. Opening an existing run directory resumes it: the files
    are appended to, and ``meta.json`` must describe the same layers.
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self._files: dict[str, IO[str]] = {}

    def open(self, meta: Mapping[str, Any]) -> None:
        """Create the directory and files, or resume a compatible run."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        meta_path = self.run_dir / META_FILE
        if meta_path.exists():
            existing = json.loads(meta_path.read_text(encoding="utf-8"))
            if existing.get("layer_names") != list(meta["layer_names"]):
                raise ConfigError(
                    f"run_dir {self.run_dir} holds a run of another model (its layers differ); "
                    "pass a new run_dir, or remove the old one."
                )
        else:
            body = {"format_version": RUN_FORMAT_VERSION, **meta}
            _atomic_write_text(meta_path, json.dumps(body, indent=1) + "\n")
        for name in (METRICS_FILE, LAYERS_FILE, EVENTS_FILE):
            if name not in self._files:
                self._files[name] = (self.run_dir / name).open("a", encoding="utf-8")

    def write(self, window: Window, events: Sequence[Event]) -> None:
        """Append one drain: a metrics row and a layers row per step, one row per event."""
        if not self._files:
            raise ConfigError("JsonlSink.write called before open(); the guard opens sinks.")
        metrics = "".join(json.dumps(row) + "\n" for row in window.rows())
        layers = "".join(
            json.dumps(
                {
                    "step": int(step),
                    "norms": [_json_float(v) for v in window.per_layer[i]],
                }
            )
            + "\n"
            for i, step in enumerate(window.steps)
        )
        self._append(METRICS_FILE, metrics)
        self._append(LAYERS_FILE, layers)
        if events:
            self._append(EVENTS_FILE, "".join(json.dumps(e.to_dict()) + "\n" for e in events))

    def _append(self, name: str, text: str) -> None:
        handle = self._files[name]
        handle.write(text)
        handle.flush()

    def close(self) -> None:
        """Close the files."""
        for handle in self._files.values():
            handle.close()
        self._files.clear()


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a JSON-lines file, ignoring a torn last line (what a crash can leave)."""
    rows: list[dict[str, Any]] = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise
    return rows
