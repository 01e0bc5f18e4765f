"""Detectors: read each drained :class:`~gradguard.records.Window` and emit Events.

Every ``log_every`` steps the guard copies its ring buffer to the host once and hands the
resulting :class:`~gradguard.records.Window` to each detector's ``observe``. Detectors
run on the host, never touch a tensor, keep O(1) state in the number of steps (fixed-size
deques, counters, one value per layer) and are deterministic: the same windows give the
same events, and ``state_dict()`` / ``load_state_dict()`` (plain JSON-able values, deques
included) let a resumed run emit exactly the events of an uninterrupted one.

A step whose gradients are not finite, or that was skipped, never enters a detector's
statistics: one NaN cannot poison a rolling mean or a best loss. A window with nothing
usable in it leaves a detector's state untouched.

Sustained conditions (vanishing, exploding, divergence) are counted in drains ("log
intervals"), fire once per episode (when the condition has held for ``patience``
drains) and re-arm when it clears. Their event's ``step`` is the onset: the first step
of the first drain in the streak; ``extra["detected_at"]`` is the last step of the
drain that confirmed it.

The six detectors, in the order :func:`default_detectors` runs them: :class:`NonFinite`
(NaN or Inf gradients) and :class:`Overflow` (norms past the fp32 range), per step;
:class:`Spike` (sudden jumps in the loss or the gradient norm); and the sustained
:class:`Vanishing`, :class:`Exploding` and :class:`Divergence` (early stopping). Each
lives in a private module of this package (``_step``, ``_spike``, ``_vanishing``,
``_exploding``, ``_divergence``; shared checks and helpers in ``_common``); import them
from here.
"""

from __future__ import annotations

from collections.abc import Iterable

from gradguard.detect._divergence import RUNAWAY_DRAINS as RUNAWAY_DRAINS
from gradguard.detect._divergence import RUNAWAY_STEPS as RUNAWAY_STEPS
from gradguard.detect._divergence import Divergence as Divergence
from gradguard.detect._exploding import WEIGHT_SPAN as WEIGHT_SPAN
from gradguard.detect._exploding import Exploding as Exploding
from gradguard.detect._spike import SPIKE_METRICS as SPIKE_METRICS
from gradguard.detect._spike import SPIKE_ROUNDING as SPIKE_ROUNDING
from gradguard.detect._spike import Spike as Spike
from gradguard.detect._step import FP32_MAX as FP32_MAX
from gradguard.detect._step import NonFinite as NonFinite
from gradguard.detect._step import Overflow as Overflow
from gradguard.detect._vanishing import Vanishing as Vanishing
from gradguard.protocols import Detector as Detector
from gradguard.records import Event


def default_detectors() -> list[Detector]:
    """Every detector with its defaults, in the order the guard runs them.

    >>> [d.name for d in default_detectors()]
    ['nonfinite', 'overflow', 'spike', 'vanishing', 'exploding', 'divergence']
    """
    return [NonFinite(), Overflow(), Spike(), Vanishing(), Exploding(), Divergence()]


def detector_events_to_stop(events: Iterable[Event]) -> bool:
    """Whether training should stop: True if any event is a ``divergence``.

    >>> detector_events_to_stop([Event(step=3, kind="spike", value=9.0, threshold=4.0)])
    False
    """
    return any(event.kind == "divergence" for event in events)
