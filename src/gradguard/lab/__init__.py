"""The gradguard lab: small CPU experiments that reproduce classic results on gradients.

Each experiment states the published claims, measures its CPU-scale analog, and says
whether each claim reproduced under a pass criterion fixed in advance. ``run`` writes a
run directory with ``results.json`` (every number, per-layer traces included) and
``results.md`` (the tables); ``print_summary`` shows the same tables on the console.

Example:
    >>> from gradguard import lab
    >>> names = [name for name, _ in lab.list_experiments()]
    >>> names[0], "recovery" in names
    ('depth-activation', True)
"""

from __future__ import annotations

from gradguard.lab._records import Claim, Criterion, Experiment, ExperimentResult, LabResult
from gradguard.lab._registry import EXPERIMENTS, list_experiments
from gradguard.lab._render import print_summary
from gradguard.lab._runner import run

__all__ = [
    "EXPERIMENTS",
    "Claim",
    "Criterion",
    "Experiment",
    "ExperimentResult",
    "LabResult",
    "list_experiments",
    "print_summary",
    "run",
]
