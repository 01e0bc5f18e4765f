"""Plain records of a lab run: claims, per-experiment results and the whole run.

Experiments compute these, the runner stores them as ``results.json``, and the renderers
turn them into markdown and console tables; nothing here computes or draws.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, Self, TypeVar

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


REPRODUCED = "reproduced"
REFUTED = "refuted"
NOT_AT_THIS_SCALE = "not reproduced at this scale"
OUTCOMES = (REPRODUCED, REFUTED, NOT_AT_THIS_SCALE)
"""A claim's outcome: it holds here; it fails here and at every other scale on record (a
finding about the claim); or it fails here but holds at another scale (this one is too
small), or no other scale is on record."""


@dataclass(frozen=True)
class ScaleResult:
    """A claim's result at another scale of the lab (``quick`` or ``full``), from its record.

    Attributes:
        variant: ``quick`` or ``full``.
        passed: whether the claim reproduced there.
        measured: the measurement as text (:meth:`Claim.measured_text` there).
        seeds: how many seeds ran there.
    """

    variant: str
    passed: bool
    measured: str
    seeds: int

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dictionary."""
        return dataclasses.asdict(self)


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
        elsewhere: the claim's results at the lab's other scales, from its record (context:
            not part of the claim's equality).
    """

    id: str
    source: str
    statement: str
    paper: str
    measured_on: str
    values: tuple[float, ...]
    criterion: Criterion
    note: str = ""
    elsewhere: tuple[ScaleResult, ...] = field(default=(), compare=False)

    @property
    def outcome(self) -> str:
        """One of :data:`OUTCOMES`: reproduced, refuted, or not reproduced at this scale."""
        if self.passed:
            return REPRODUCED
        if self.elsewhere and not any(s.passed for s in self.elsewhere):
            return REFUTED
        return NOT_AT_THIS_SCALE

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
            "outcome": self.outcome,
            "note": self.note,
            "elsewhere": [s.to_dict() for s in self.elsewhere],
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

    @property
    def claims(self) -> list[Claim]:
        """Every claim of every experiment, in run order."""
        return [c for e in self.experiments for c in e.claims]

    def outcomes(self) -> dict[str, list[Claim]]:
        """The claims by outcome; every outcome is a key (possibly empty), in order."""
        found: dict[str, list[Claim]] = {o: [] for o in OUTCOMES}
        for claim in self.claims:
            found[claim.outcome].append(claim)
        return found

    @property
    def as_expected(self) -> bool:
        """True when no claim is left "not reproduced at this scale" (refuted ones are findings)."""
        return not self.outcomes()[NOT_AT_THIS_SCALE]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dictionary (the content of ``results.json``)."""
        return {
            "seed": self.seed,
            "quick": self.quick,
            "started_at": self.started_at,
            "duration_s": self.duration_s,
            "versions": dict(self.versions),
            "all_passed": self.all_passed,
            "outcomes": {o: len(c) for o, c in self.outcomes().items()},
            "experiments": [e.to_dict() for e in self.experiments],
        }


class Record:
    """Base of a frozen dataclass of measurements that round-trips through ``results.json``.

    :meth:`to_dict` turns tuples into lists; :meth:`from_dict` reads them back by the
    dataclass's field types, numbers stored as text (``"nan"``, ``"inf"``) included.
    """

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dictionary, fields in declaration order."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Self:
        """Rebuild a record from :meth:`to_dict` output."""
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        return cls(**{f.name: _typed(hints[f.name], record[f.name]) for f in fields})


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Record):
        return value.to_dict()
    return value


def _typed(hint: Any, value: Any) -> Any:
    """``value`` read back as type ``hint`` (tuples, optionals, floats stored as text)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        return _typed(next(a for a in args if a is not type(None)), value)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_typed(args[0], v) for v in value)
        return tuple(_typed(a, v) for a, v in zip(args, value, strict=True))
    if origin in (dict, Mapping):
        return dict(value)
    if isinstance(hint, type) and issubclass(hint, Record):
        return hint.from_dict(value)
    if hint is float:
        return float(value)
    if hint is int:
        return int(value)
    return value


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

    def run(
        self,
        *,
        quick: bool,
        seed: int,
        progress: Progress | None = None,
        seeds: int | None = None,
    ) -> ExperimentResult:
        """Run with base seed ``seed`` and ``seeds`` seeds when full; report progress."""
        ...

    def plot(self, data: Mapping[str, Any], out_dir: Path) -> Path | None:
        """Draw the figure of a stored result into ``out_dir``; None when there is none."""
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


def listed(values: Sequence[float]) -> str:
    """``values`` formatted and joined, e.g. ``0.2, 0.38, nan``."""
    return ", ".join(format_value(v) for v in values)


def cell(values: Sequence[float], mark: str = "") -> str:
    """A table cell: one value, or ``mean [min, max]`` of several (all listed if any is not finite).

    Example:
        >>> cell([0.5]), cell([1.0, 2.0, 3.0]), cell([1.0, float("nan")])
        ('0.5', '2 [1, 3]', '1, nan')
    """
    if len(values) == 1:
        return format_value(values[0]) + mark
    if not all(map(math.isfinite, values)):
        return listed(values) + mark
    low, high = format_value(min(values)), format_value(max(values))
    return f"{format_value(statistics.fmean(values))} [{low}, {high}]{mark}"


def share(values: Sequence[float], criterion: Criterion) -> float:
    """The fraction of ``values`` that meet ``criterion`` (for "at least 2 of 3 seeds")."""
    return sum(criterion.holds(v) for v in values) / len(values)


R = TypeVar("R")


class BySeed(Generic[R]):
    """Records indexed by a configuration key and their seed: ``get(*key)`` gives one per seed.

    Example:
        >>> rows = [("a", 0, 1.0), ("a", 1, 2.0)]
        >>> runs = BySeed(rows, (0, 1), key=lambda r: (r[0],), seed=lambda r: r[1])
        >>> [r[2] for r in runs.get("a")]
        [1.0, 2.0]
    """

    def __init__(
        self,
        records: Sequence[R],
        seeds: tuple[int, ...],
        key: Callable[[R], tuple[Any, ...]],
        seed: Callable[[R], int] = lambda r: r.seed,  # type: ignore[attr-defined]
    ) -> None:
        self.by_key = {(*key(r), seed(r)): r for r in records}
        self.seeds = seeds

    def get(self, *key: Any) -> list[R]:
        """The records of configuration ``key``, one per seed, in seed order."""
        return [self.by_key[(*key, s)] for s in self.seeds]


@dataclass(frozen=True)
class TracedRun(Record):
    """Base of the record of one arm of one seed: its per-step traces and the guard's events.

    Attributes:
        arm: the arm's name.
        seed: the model seed.
        loss: the batch loss of every step taken.
        grad_norm: the global gradient norm of every step taken (before clipping).
        events: every guard event, as ``Event.to_dict()`` (none unguarded).
    """

    arm: str
    seed: int
    loss: tuple[float, ...]
    grad_norm: tuple[float, ...]
    events: tuple[dict[str, Any], ...]
