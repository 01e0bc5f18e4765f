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

from gradguard.explain.explainer import Explainer as Explainer
from gradguard.explain.facts import BATCH_LEVEL as BATCH_LEVEL
from gradguard.explain.facts import HIGH_GAIN as HIGH_GAIN
from gradguard.explain.facts import HIGH_UPDATE_RATIO as HIGH_UPDATE_RATIO
from gradguard.explain.facts import HURT as HURT
from gradguard.explain.facts import INHERIT_STEPS as INHERIT_STEPS
from gradguard.explain.facts import LOW_GAIN as LOW_GAIN
from gradguard.explain.facts import LR_JUMP as LR_JUMP
from gradguard.explain.facts import OUTLIER_SIGMA as OUTLIER_SIGMA
from gradguard.explain.facts import TARGET_UPDATE_RATIO as TARGET_UPDATE_RATIO
from gradguard.explain.facts import LayerScale as LayerScale
from gradguard.explain.facts import RunFacts as RunFacts
from gradguard.explain.facts import jsonable as jsonable
from gradguard.explain.streaks import PER_STEP_KINDS as PER_STEP_KINDS
from gradguard.explain.streaks import Streaks as Streaks

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
