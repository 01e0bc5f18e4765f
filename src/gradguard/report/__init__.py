"""HTML reports from a run directory: verdict, plots, events and configuration in one file.

``write_report(run_dir)`` reads a guarded run's files (``docs/run-format.md``) and writes
``run_dir/report.html``; ``write_lab_report(lab_dir)`` does the same for a lab run
(``results.json`` and its figures). The page is self-contained (inline PNG images, no
scripts, a Content-Security-Policy that forbids any network access) and opens from disk.

This package reads files only and never imports torch (nor any gradguard module that
does), so a report can be made on a machine without it; it needs matplotlib (the
``report`` extra).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from gradguard.errors import ConfigError
from gradguard.report._data import META_FILE, METRICS_FILE, load_run
from gradguard.report._html import write_page
from gradguard.report._lab import RESULTS_FILE, build_lab_report
from gradguard.report._run_report import REPORT_FILE, write_run_report
from gradguard.report._verdict import verdict

__all__ = ["REPORT_FILE", "run_verdict", "write_lab_report", "write_report"]


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError(
            "gradguard report draws with matplotlib: pip install 'gradguard[report]'."
        ) from None


def write_report(run_dir: str | os.PathLike[str]) -> Path:
    """Write ``run_dir/report.html`` for a guarded run and return its path.

    The page opens with a one-sentence verdict and what happened and what to do (the
    warnings and errors by onset, with their cause, evidence and advice), then the loss,
    global-norm and learning-rate timelines (skipped steps, spikes, rollbacks and
    cool-downs marked; off-scale values on the edge), heatmaps of per-layer gradient
    norms and, when logged, update ratios over steps (log colour, layers in depth order,
    event onsets marked), per-layer bars at the start and the end, the event table (one
    row per streak) and the configuration. A figure whose fields the run lacks (e.g. no
    loss was given) is replaced by a note. Damage never stops the report: a missing, empty
    or torn file, a line that is not a JSON object, a field of the wrong type or steps
    out of order is listed under *Reading notes* (file, line, what was done) and the
    values that could be read are shown.

    Args:
        run_dir: a directory written by ``Guard(run_dir=...)``.

    Returns:
        The path of the report.

    Raises:
        ConfigError: ``run_dir`` is not a run directory, or matplotlib is missing.
        OSError: ``report.html`` cannot be written (permissions, a full disk).
    """
    path = Path(run_dir)
    if not path.is_dir():
        why = "it does not exist" if not path.exists() else "it is a file"
    elif not (path / META_FILE).is_file() and not (path / METRICS_FILE).is_file():
        why = f"it has neither {META_FILE} nor {METRICS_FILE}"
    else:
        _require_matplotlib()
        return write_run_report(path)
    raise ConfigError(
        f"{path} is not a run directory: {why}. Pass the run_dir given to gradguard.Guard "
        f"(or a lab run directory, which has {RESULTS_FILE}, to write_lab_report)."
    )


def run_verdict(run_dir: str | os.PathLike[str]) -> tuple[str, str]:
    """The run's verdict: ``ok``, ``warn`` or ``bad``, and the sentence the report opens with.

    ``ok`` when no event of warning or error severity was logged (info events, such as a
    loss scaler's backoffs, need no action); ``bad`` when the run diverged or a rollback
    could not be made; ``warn`` otherwise.
    """
    return verdict(load_run(Path(run_dir)))


def write_lab_report(lab_run_dir: str | os.PathLike[str]) -> Path:
    """Write ``lab_run_dir/report.html`` for a lab run and return its path.

    One section per experiment: its claims table (paper vs measured, pass or fail), its
    figures (the PNG files named after it in the directory, embedded), its result tables
    and references. Guarded run directories inside the lab directory get their own
    report, linked from this one.

    Args:
        lab_run_dir: a directory written by ``gradguard.lab.run`` (holds ``results.json``).

    Returns:
        The path of the report.

    Fields of the wrong type in ``results.json`` are left out and listed under *Reading
    notes*; guarded runs inside are read as ``write_report`` reads them.

    Raises:
        ConfigError: there is no readable ``results.json`` (a JSON object) in
            ``lab_run_dir``.
        OSError: ``report.html`` cannot be written (permissions, a full disk).
    """
    path = Path(lab_run_dir)
    results_path = path / RESULTS_FILE
    try:
        results = json.loads(results_path.read_text(encoding="utf-8"))
        why = "" if isinstance(results, dict) else "it holds no JSON object"
    except OSError as err:
        why = f"it is missing or unreadable ({err.strerror or err})"
    except (ValueError, RecursionError) as err:  # not JSON, or not UTF-8 text
        why = f"it is not valid JSON ({err})"
    if why:
        raise ConfigError(
            f"{path} is not a lab run directory: {RESULTS_FILE} cannot be used: {why}. "
            "Pass a directory written by gradguard.lab.run, or a guard's run_dir to "
            "write_report."
        )
    return write_page(path / REPORT_FILE, build_lab_report(path, results))
