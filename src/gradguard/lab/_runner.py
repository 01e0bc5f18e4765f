"""Run experiments, time them, and store the run directory (``results.json``, ``results.md``)."""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import platform
import queue
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress

from gradguard.errors import ConfigError
from gradguard.lab._records import Experiment, ExperimentResult, LabResult, Progress
from gradguard.lab._reference import with_reference
from gradguard.lab._registry import select
from gradguard.lab._render import to_markdown
from gradguard.lab.plots import write_plots

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


def run(
    names: Sequence[str] | None = None,
    quick: bool = False,
    seed: int = 0,
    out: str | Path | None = None,
    progress: bool = True,
    seeds: int | None = None,
    jobs: int = 1,
) -> LabResult:
    """Run lab experiments and write their results to a run directory.

    Names are checked before anything runs or is written.

    Args:
        names: experiments to run, in order; ``None`` runs them all.
        quick: run the quick variants (1 seed, seconds).
        seed: base seed; full variants use ``seed, seed + 1, ...``.
        out: run directory; default ``runs/lab-YYYYmmdd-HHMMSS`` under the working directory.
        progress: show a progress bar on stderr.
        seeds: how many seeds each full variant runs (``seed`` to ``seed + seeds - 1``);
            None keeps each experiment's own number (3 or more). Quick variants run one.
        jobs: how many experiments run at once, each in its own process on one thread;
            0 picks one per CPU core (at most :data:`MAX_AUTO_JOBS`). Every experiment
            seeds itself, so the numbers do not depend on ``jobs``.

    Returns:
        The results, with ``run_dir`` where ``results.json`` and ``results.md`` were written.

    Raises:
        ConfigError: an unknown experiment name, ``seeds`` below 1 or with ``quick``, or
            ``jobs`` below 0.
    """
    experiments = select(names)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 0:
        raise ConfigError(f"jobs must be an int >= 0 (0: one per CPU core), got {jobs!r}.")
    workers = min(jobs or MAX_AUTO_JOBS, jobs or os.cpu_count() or 1, len(experiments))
    if seeds is not None and (isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1):
        raise ConfigError(f"seeds must be an int >= 1, got {seeds!r}.")
    if seeds is not None and quick:
        raise ConfigError(
            "seeds sets how many seeds the full variants run; the quick variants run one "
            "seed each. Drop --quick to run several seeds, or --seeds to run the quick lab."
        )
    run_dir = _make_run_dir(out)
    started_at = datetime.now().isoformat(timespec="seconds")
    start = time.perf_counter()
    results: list[ExperimentResult] = []
    with _progress_bar(progress) as bar:
        if workers > 1:
            results = _run_in_processes(experiments, quick, seed, seeds, workers, bar, run_dir)
        else:
            for experiment in experiments:
                progress_of = _bar_progress(bar, experiment.name)
                results.append(_measure(experiment, quick, seed, seeds, progress_of, run_dir))
    result = LabResult(
        run_dir=run_dir,
        experiments=tuple(results),
        seed=seed,
        quick=quick,
        duration_s=time.perf_counter() - start,
        versions=_versions(),
        started_at=started_at,
    )
    data = _finite_or_text(result.to_dict())
    text = json.dumps(data, indent=1, ensure_ascii=False)
    (run_dir / RESULTS_JSON).write_text(text + "\n", encoding="utf-8")
    (run_dir / RESULTS_MD).write_text(to_markdown(result), encoding="utf-8")
    _write_report(run_dir)
    return result


def _write_report(run_dir: Path) -> None:
    """``report.html`` with every experiment's claims and figures, when matplotlib is here."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    from gradguard.report import write_lab_report

    write_lab_report(run_dir)


MAX_AUTO_JOBS = 4
"""``jobs=0`` runs at most this many experiments at once (each process holds torch)."""

_updates: Any = None  # a worker's queue of (name, done, total) progress updates


def _start_worker(updates: Any) -> None:
    global _updates
    _updates = updates


def _draw(result: ExperimentResult, run_dir: Path) -> None:
    """Draw the experiment's figure into the run directory (when matplotlib is installed)."""
    write_plots({"experiments": [_finite_or_text(result.to_dict())]}, run_dir)


def _run_in_worker(
    name: str, quick: bool, seed: int, seeds: int | None, run_dir: Path
) -> ExperimentResult:
    """:func:`_measure` a registered experiment in a worker process.

    Progress goes to the parent through the queue the worker was started with.
    """
    from gradguard.lab._registry import EXPERIMENTS

    def forward(done: int, total: int) -> None:
        _updates.put((name, done, total))

    return _measure(EXPERIMENTS[name], quick, seed, seeds, forward, run_dir)


def _run_in_processes(
    experiments: Sequence[Experiment],
    quick: bool,
    seed: int,
    seeds: int | None,
    workers: int,
    bar: RichProgress | None,
    run_dir: Path,
) -> list[ExperimentResult]:
    """Run the experiments in ``workers`` fresh processes; results in the order given."""
    context = multiprocessing.get_context("spawn")  # no forked torch state in the workers
    updates = context.Queue()
    tasks = {e.name: None if bar is None else bar.add_task(e.name, total=None) for e in experiments}
    with ProcessPoolExecutor(workers, context, _start_worker, (updates,)) as pool:
        futures = [
            pool.submit(_run_in_worker, e.name, quick, seed, seeds, run_dir) for e in experiments
        ]
        try:
            while not all(f.done() for f in futures):
                _show_updates(updates, tasks, bar, wait=0.2)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        results = [f.result() for f in futures]
    _show_updates(updates, tasks, bar, wait=0.0)
    return results


def _show_updates(
    updates: Any, tasks: dict[str, Any], bar: RichProgress | None, wait: float
) -> None:
    """Move the bars by every progress update the workers sent; wait up to ``wait`` s for one."""
    try:
        while True:
            name, done, total = updates.get(timeout=wait) if wait else updates.get_nowait()
            wait = 0.0
            if bar is not None:
                bar.update(tasks[name], completed=done, total=total)
    except queue.Empty:
        return


def _measure(
    experiment: Experiment,
    quick: bool,
    seed: int,
    seeds: int | None,
    progress: Progress | None,
    run_dir: Path,
) -> ExperimentResult:
    """Run one experiment, time it, attach the other scale's record and draw its figure."""
    start = time.perf_counter()
    result = experiment.run(quick=quick, seed=seed, progress=progress, seeds=seeds)
    result = with_reference(replace(result, duration_s=time.perf_counter() - start), quick)
    _draw(result, run_dir)
    return result


def _bar_progress(bar: RichProgress | None, name: str) -> Progress | None:
    """A progress callback that moves a new bar named ``name``; None without a bar."""
    if bar is None:
        return None
    task = bar.add_task(name, total=None)

    def callback(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    return callback


@contextlib.contextmanager
def _progress_bar(enabled: bool) -> Iterator[RichProgress | None]:
    if not enabled:
        yield None
        return
    bar = RichProgress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )
    with bar:
        yield bar


def _make_run_dir(out: str | Path | None) -> Path:
    """Create and return the run directory; a default name never reuses an existing one."""
    if out is not None:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        return path
    base = Path("runs") / datetime.now().strftime("lab-%Y%m%d-%H%M%S")
    path, n = base, 1
    while True:
        try:
            path.mkdir(parents=True)
        except FileExistsError:
            n += 1
            path = base.with_name(f"{base.name}-{n}")
        else:
            return path


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("gradguard", "torch", "numpy", "scikit-learn"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def _finite_or_text(value: Any) -> Any:
    """Replace non-finite floats by ``"nan"``/``"inf"``/``"-inf"``: strict JSON has none."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite_or_text(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_text(v) for v in value]
    return value
