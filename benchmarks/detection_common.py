"""The detection corpus's shared vocabulary: scenarios, their labels and what a run returns.

A scenario is a real model trained for real on CPU with a :class:`gradguard.Guard` built
with its default detectors (no arguments): the corpus measures the defaults. Each one is
labelled with what a careful engineer would say happened, and why (``label_reason``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gradguard.records import Event

#: Steps between drains in every corpus run (the guard's default).
LOG_EVERY = 10


@dataclass(frozen=True)
class Expect:
    """What a pathological run must raise.

    Attributes:
        kinds: event kinds that count as the right detection (any of them).
        onset: the first guard step (1-based) of the pathology.
        within: the event must be known (its ``extra["detected_at"]``, else its ``step``)
            at most this many steps after ``onset``, and its ``step`` must not precede it.
        layer: for layer-local pathologies, the layer (a name of ``guard.layer_names``, or a
            prefix of one) that must be named first in the event's ``layers``.
        before_nonfinite: the event must be known before the first non-finite step.
        causes: the causes (``Event.cause``) that are right for the detecting event.
        batch: the batch id the detecting event must carry (the corpus passes the step).
        examples: the detecting event must name the examples that stand out.
    """

    kinds: tuple[str, ...]
    onset: int
    within: int
    layer: str | None = None
    before_nonfinite: bool = False
    causes: tuple[str, ...] = ()
    batch: int | None = None
    examples: bool = False


@dataclass
class RunResult:
    """One scenario run: the guard's events and the loss curve."""

    events: list[Event]
    losses: list[float]  # the loss passed to guard.step, one per step (NaN allowed)
    layer_names: tuple[str, ...]
    first_nonfinite_step: int | None = None  # first step with a non-finite loss or gradient
    notes: dict[str, float] = field(default_factory=dict)  # e.g. final accuracy

    @property
    def steps(self) -> int:
        """How many guard steps the run took."""
        return len(self.losses)


@dataclass(frozen=True)
class Scenario:
    """A labelled run of the corpus.

    ``run(seed, quick)`` trains from scratch and returns the run; ``quick`` is the
    reduced variant the test suite runs (fewer steps, same pathology and onset when the
    onset is early; it may move a late onset earlier, reporting it through ``expect_for``).
    """

    name: str
    healthy: bool
    description: str
    label_reason: str
    run: Callable[[int, bool], RunResult]
    expect: Expect | None = None
    quick_expect: Expect | None = None  # the quick variant's label when it differs

    def expect_for(self, quick: bool) -> Expect | None:
        """The label of the full or the quick variant."""
        return self.quick_expect if quick and self.quick_expect is not None else self.expect


def as_float(loss: torch.Tensor | float) -> float:
    """A loss as a host float (the corpus reads it after the guard step, outside timing)."""
    return float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
