"""What every lab experiment shares: seeds and threads, the run template and its result.

An experiment subclasses :class:`LabExperiment` and supplies only what is its own: its
setting (``config``), the units of work of its grid (``grid``), its claims, its tables and
its figure. The base class picks the seeds, runs the units on one thread with progress,
times them and assembles the :class:`ExperimentResult`; ``plot`` rebuilds the records from
``results.json`` and saves the figure without touching matplotlib's global backend.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from gradguard.lab._records import Claim, ExperimentResult, Progress, Record, Table

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DATA_SEED_OFFSET = 1000
"""Data-stream seed of model seed ``s`` is ``1000 + s``: batches never share the init's stream."""


def seeds_for(seed: int, *, quick: bool, n_full: int) -> tuple[int, ...]:
    """Return the model seeds of a run: ``(seed,)`` when quick, else ``n_full`` consecutive ones.

    Example:
        >>> seeds_for(7, quick=True, n_full=3), seeds_for(7, quick=False, n_full=3)
        ((7,), (7, 8, 9))
    """
    return (seed,) if quick else tuple(range(seed, seed + n_full))


def data_generator(seed: int) -> torch.Generator:
    """Return the generator of the data stream that goes with model seed ``seed``."""
    return torch.Generator().manual_seed(DATA_SEED_OFFSET + seed)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run the body with one intra-op thread, then restore the previous count.

    One thread makes CPU results bit-identical from run to run on one machine and lets two
    experiments share a 2-core machine.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def flush_denormals() -> Iterator[None]:
    """Flush subnormal floats to zero in the body, then turn flushing off again.

    A vanishing network computes with subnormal numbers (below 1.2e-38 in fp32), which x86
    CPUs process tens of times slower than normal ones. Flushing changes only values that
    small. PyTorch has no getter for the flag; its default, off, is what is restored.
    """
    supported = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if supported:
            torch.set_flush_denormal(False)


class Ticker:
    """Counts finished units of work and reports ``progress(done, total)`` after each."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress = progress
        self.total = total
        self.done = 0

    def __call__(self) -> None:
        """One more unit is done."""
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)


class LabExperiment(ABC):
    """The template of an experiment: seeds, threads, timing and the result are done here.

    Subclasses set the class attributes and implement :meth:`config`, :meth:`grid` (or
    :meth:`measure`), :meth:`claims` and :meth:`tables`; a figure comes from :meth:`figure`.
    """

    name: ClassVar[str]
    """Registry name (kebab-case)."""
    title: ClassVar[str]
    """One-line description, shown by ``gradguard lab --list``."""
    references: ClassVar[tuple[str, ...]]
    """The papers reproduced."""
    setting: ClassVar[str]
    """The scale of this analog next to the papers' (the scale gap)."""
    full_seeds: ClassVar[int] = 3
    """Seeds of the full variant unless the caller asks for another number."""
    record_type: ClassVar[type[Record] | None] = None
    """The record stored per measurement, rebuilt by :meth:`plot` from ``results.json``."""
    denormals: ClassVar[bool] = False
    """Flush subnormal floats while measuring (vanishing networks compute with them)."""

    @abstractmethod
    def config(self, quick: bool) -> Mapping[str, Any]:
        """The settings of the quick or the full variant, JSON-ready."""

    def measure(self, quick: bool, seeds: tuple[int, ...], tick: Ticker) -> Sequence[Record]:
        """Run every unit of work for ``seeds``, calling ``tick()`` after each.

        By default the units are :meth:`grid`'s calls, in order; an experiment whose units
        share work (models trained side by side) overrides this and :meth:`units`.
        """
        records = []
        for unit in self.grid(quick, seeds):
            records.append(unit())
            tick()
        return records

    def units(self, quick: bool, seeds: tuple[int, ...]) -> int:
        """How many times :meth:`measure` ticks (default: once per call of :meth:`grid`)."""
        return len(self.grid(quick, seeds))

    def grid(self, quick: bool, seeds: tuple[int, ...]) -> Sequence[Callable[[], Record]]:
        """The units of work as zero-argument calls, one record each."""
        raise NotImplementedError(f"{type(self).__name__} defines neither grid() nor measure().")

    @abstractmethod
    def claims(self, records: Sequence[Any], seeds: tuple[int, ...]) -> tuple[Claim, ...]:
        """Judge every claim against the records."""

    @abstractmethod
    def tables(self, records: Sequence[Any], seeds: tuple[int, ...]) -> tuple[Table, ...]:
        """The result tables for humans."""

    def run(
        self,
        *,
        quick: bool,
        seed: int,
        progress: Progress | None = None,
        seeds: int | None = None,
    ) -> ExperimentResult:
        """Measure, judge and tabulate: one seed when quick, else ``seeds`` or :attr:`full_seeds`.

        The runner times the whole call (``duration_s``).

        Everything is measured on one intra-op thread, so a run is bit-identical on one
        machine.
        """
        chosen = seeds_for(seed, quick=quick, n_full=self.full_seeds if seeds is None else seeds)
        with single_thread(), flush_denormals() if self.denormals else contextlib.nullcontext():
            records = self.measure(quick, chosen, Ticker(progress, self.units(quick, chosen)))
        return ExperimentResult(
            name=self.name,
            title=self.title,
            references=self.references,
            setting=self.setting,
            config=self.config(quick),
            seeds=chosen,
            claims=self.claims(records, chosen),
            tables=self.tables(records, chosen),
            measurements=tuple(r.to_dict() for r in records),
        )

    def records_from(self, data: Mapping[str, Any]) -> list[Any]:
        """Rebuild the records of a stored result (``results.json``'s experiment entry)."""
        if self.record_type is None:
            raise NotImplementedError(f"{type(self).__name__} has no record_type.")
        return [self.record_type.from_dict(m) for m in data["measurements"]]

    def figure(self, records: Sequence[Any], data: Mapping[str, Any]) -> Figure | None:
        """The experiment's figure drawn from its records; None when it has none."""
        return None

    @property
    def figure_name(self) -> str:
        """The figure's file name in the run directory."""
        return f"{self.name}.png"

    def plot(self, data: Mapping[str, Any], out_dir: Path) -> Path | None:
        """Draw the figure of a stored result into ``out_dir``; return its path, or None."""
        fig = self.figure(self.records_from(data), data)
        if fig is None:
            return None
        path = out_dir / self.figure_name
        fig.savefig(path, dpi=110)
        return path
