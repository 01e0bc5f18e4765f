"""Plain records of a lab run: claims, per-experiment results and the whole run.

Experiments compute these, the runner stores them as ``results.json``, and the renderers
turn them into markdown and console tables; nothing here computes or draws.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

Progress = Callable[[int, int], None]
"""Called by an experiment as ``progress(done, total)`` after each configuration."""


@dataclass(frozen=True)
class Criterion:
    """A pass criterion: every measured value must lie strictly inside ``(low, high)``.

    A missing bound is open. Non-finite values never pass.
    """

    low: float | None = None
    high: float | None = None

    def holds(self, value: float) -> bool:
        """Return whether ``value`` meets the criterion."""
        if not math.isfinite(value):
            return False
        above = self.low is None or value > self.low
        below = self.high is None or value < self.high
        return above and below

    def describe(self) -> str:
        """Return the criterion as text.

        Example:
            >>> Criterion(high=1e-3).describe(), Criterion(low=0.1, high=10).describe()
            ('< 0.001', 'in (0.1, 10)')
        """
        if self.low is not None and self.high is not None:
            return f"in ({self.low:g}, {self.high:g})"
        if self.high is not None:
            return f"< {self.high:g}"
        if self.low is not None:
            return f"> {self.low:g}"
        return "any finite value"


@dataclass(frozen=True)
class Claim:
    """One published claim, the number measured here, and whether it reproduced.

    Attributes:
        id: short stable identifier, e.g. ``tanh-standard-vanishes``.
        source: the paper, e.g. ``Glorot & Bengio 2010``.
        statement: the claim in one sentence.
        paper: what the paper reports (its number, or its qualitative finding).
        measured_on: the configurations behind ``values``.
        values: every measurement checked (one per seed and configuration).
        criterion: what each value must satisfy.
        note: extra detail shown next to the measurement (may be empty).
    """

    id: str
    source: str
    statement: str
    paper: str
    measured_on: str
    values: tuple[float, ...]
    criterion: Criterion
    note: str = ""

    @property
    def n_passed(self) -> int:
        """Number of values that meet the criterion."""
        return sum(self.criterion.holds(v) for v in self.values)

    @property
    def passed(self) -> bool:
        """True when every value meets the criterion (init probes are deterministic)."""
        return bool(self.values) and self.n_passed == len(self.values)

    def summary(self) -> dict[str, float]:
        """Return mean, standard deviation, minimum and maximum of the values."""
        vals = list(self.values)
        spread = 0.0
        if len(vals) > 1:  # pstdev cannot take inf; a spread with inf in it is not a number
            spread = statistics.pstdev(vals) if all(map(math.isfinite, vals)) else math.nan
        return {
            "mean": statistics.fmean(vals),
            "std": spread,
            "min": min(vals),
            "max": max(vals),
        }

    def measured_text(self) -> str:
        """Return the measurement as text: the value, or the mean and the range."""
        if len(self.values) == 1:
            text = format_value(self.values[0])
        elif len(set(self.values)) == 1:
            text = f"{format_value(self.values[0])} (all {len(self.values)})"
        else:
            s = self.summary()
            text = (
                f"{format_value(s['mean'])} (range {format_value(s['min'])}"
                f"–{format_value(s['max'])}, n={len(self.values)})"
            )
        return f"{text}; {self.note}" if self.note else text

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dictionary."""
        return {
            "id": self.id,
            "source": self.source,
            "statement": self.statement,
            "paper": self.paper,
            "measured_on": self.measured_on,
            "values": list(self.values),
            **self.summary(),
            "criterion": self.criterion.describe(),
            "threshold": {"low": self.criterion.low, "high": self.criterion.high},
            "n_passed": self.n_passed,
            "n": len(self.values),
            "passed": self.passed,
            "note": self.note,
        }


@dataclass(frozen=True)
class Table:
    """A table of already formatted cells, rendered alike to markdown and the console."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dictionary."""
        return {
            "title": self.title,
            "columns": list(self.columns),
            "rows": [list(r) for r in self.rows],
            "note": self.note,
        }


@dataclass(frozen=True)
class ExperimentResult:
    """Everything one experiment measured.

    Attributes:
        name: registry name, e.g. ``depth-activation``.
        title: one-line description.
        references: the papers reproduced.
        setting: the scale of this analog next to the papers' (the scale gap).
        config: the settings used (JSON-ready).
        seeds: the seeds run.
        claims: the claims checked.
        tables: result tables for humans (also stored in ``results.json``).
        measurements: raw per-configuration measurements, JSON-ready.
        duration_s: wall-clock seconds, filled in by the runner.
    """

    name: str
    title: str
    references: tuple[str, ...]
    setting: str
    config: Mapping[str, Any]
    seeds: tuple[int, ...]
    claims: tuple[Claim, ...]
    tables: tuple[Table, ...]
    measurements: tuple[Mapping[str, Any], ...] = field(repr=False)
    duration_s: float = 0.0

    @property
    def all_passed(self) -> bool:
        """True when every claim of this experiment reproduced."""
        return all(c.passed for c in self.claims)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dictionary."""
        return {
            "name": self.name,
            "title": self.title,
            "references": list(self.references),
            "setting": self.setting,
            "config": dict(self.config),
            "seeds": list(self.seeds),
            "duration_s": self.duration_s,
            "all_passed": self.all_passed,
            "claims": [c.to_dict() for c in self.claims],
            "tables": [t.to_dict() for t in self.tables],
            "measurements": [dict(m) for m in self.measurements],
        }


@dataclass(frozen=True)
class LabResult:
    """A finished lab run: its directory, its experiments and the environment.

    Attributes:
        run_dir: directory holding ``results.json`` and ``results.md``.
        experiments: one result per experiment, in the order run.
        seed: the base seed.
        quick: whether the quick variants ran.
        duration_s: wall-clock seconds for the whole run.
        versions: versions of gradguard, torch and friends.
        started_at: local start time, ISO 8601.
    """

    run_dir: Path
    experiments: tuple[ExperimentResult, ...]
    seed: int
    quick: bool
    duration_s: float
    versions: Mapping[str, str]
    started_at: str

    @property
    def all_passed(self) -> bool:
        """True when every claim of every experiment reproduced."""
        return all(e.all_passed for e in self.experiments)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dictionary (the content of ``results.json``)."""
        return {
            "seed": self.seed,
            "quick": self.quick,
            "started_at": self.started_at,
            "duration_s": self.duration_s,
            "versions": dict(self.versions),
            "all_passed": self.all_passed,
            "experiments": [e.to_dict() for e in self.experiments],
        }


class Experiment(Protocol):
    """What the registry holds: a named experiment that measures and judges its claims."""

    @property
    def name(self) -> str:
        """Registry name (kebab-case)."""
        ...

    @property
    def title(self) -> str:
        """One-line description, shown by ``gradguard lab --list``."""
        ...

    def run(self, *, quick: bool, seed: int, progress: Progress | None = None) -> ExperimentResult:
        """Run the experiment with base seed ``seed``; report ``progress(done, total)``."""
        ...


def format_value(value: float) -> str:
    """Format a measured number compactly: 3 significant digits, scientific when far from 1.

    Example:
        >>> format_value(0.000123), format_value(1.5), format_value(0.0), format_value(250.0)
        ('1.23e-04', '1.5', '0', '250')
    """
    if value == 0:
        return "0"
    if not math.isfinite(value):
        return str(value)
    if 1e-2 <= abs(value) < 1e3:
        return f"{value:.3g}"
    return f"{value:.2e}"
