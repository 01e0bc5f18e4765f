"""Why an event happened and what to do: the cause, its evidence and advice with numbers.

The detectors say *what* they saw; :class:`Explainer` reads the same drained window, a
bounded history of healthy steps and a few facts about the model and its training setup
(:class:`RunFacts`), and fills ``Event.cause``, ``Event.evidence`` and ``Event.advice``
on every warning and error. Each rule needs positive evidence: where none holds, the
cause is ``unknown``. Advice names values from this run that would act on it: a clip
threshold below the norm that hurt and above the healthy ones, a learning rate below
the one in use, never a remedy the run already has.

It reads records and plain facts only (no torch), so the rules can be tested on
hand-made windows.

The parts: ``facts`` (thresholds, :class:`RunFacts`, a window's numbers), ``causes``
(the cause rules), ``advice`` (the advice rules), ``explainer`` (:class:`Explainer`: the
history and the batch) and ``streaks`` (:class:`Streaks`).
"""

from __future__ import annotations

from gradguard.explain.explainer import Explainer
from gradguard.explain.facts import (
    BATCH_LEVEL,
    HIGH_GAIN,
    HIGH_UPDATE_RATIO,
    HURT,
    INHERIT_STEPS,
    LOW_GAIN,
    LR_JUMP,
    OUTLIER_SIGMA,
    TARGET_UPDATE_RATIO,
    LayerScale,
    RunFacts,
    jsonable,
)
from gradguard.explain.streaks import PER_STEP_KINDS, Streaks

__all__ = [
    "BATCH_LEVEL",
    "HIGH_GAIN",
    "HIGH_UPDATE_RATIO",
    "HURT",
    "INHERIT_STEPS",
    "LOW_GAIN",
    "LR_JUMP",
    "OUTLIER_SIGMA",
    "PER_STEP_KINDS",
    "TARGET_UPDATE_RATIO",
    "Explainer",
    "LayerScale",
    "RunFacts",
    "Streaks",
    "jsonable",
]
