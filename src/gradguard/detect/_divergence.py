"""Divergence: early stopping when the loss has run away from its best for good."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from gradguard._repr import arguments_repr
from gradguard.detect._common import _check_keys, _float_in, _int_at_least
from gradguard.records import Event, Window

#: Bad drains in a row, each worse than the last, after which Divergence stops a run
#: without waiting for its full patience: a loss that climbs at every drain is running away.
RUNAWAY_DRAINS = 3
#: ... and at least this many steps: with a short ``log_every`` three drains are batch noise.
RUNAWAY_STEPS = 30


class Divergence:
    """Early stopping when the loss has run away from its best for good.

    Rule, per drain: the window's mean loss over given, finite, non-skipped steps is
    compared with the best (lowest) window mean seen so far; the drain is bad when the
    mean exceeds ``best + tolerance * |best| + min_delta + start_fraction * |start|``
    (``start`` is the first window's mean; ``abs`` keeps the margin right for negative
    losses such as log-likelihoods), or when the window has a given loss but none of them
    finite. After ``patience`` consecutive bad drains, one ``divergence`` event: the guard
    then sets ``should_stop``. A good drain re-arms it.
    Windows without any given loss are ignored, and so are windows whose finite losses
    all fell on skipped steps (a loss-scaler warm-up is no evidence of divergence).

    This is Prechelt's generalization-loss criterion GL_alpha with alpha = 100 *
    ``tolerance`` percent, applied to the training loss, with two refinements:

    * a margin of ``start_fraction`` of where training started. Near a loss of 0 the
      relative rule alone reads batch noise as divergence: healthy momentum-SGD runs on
      digits wobble between window means of 0.003 and 0.07 after a best of 0.0026, ten
      times their best but 3 % of the start of 2.3;
    * a runaway rule: three bad drains in a row (and 30 steps at least), each worse than
      the one before, stop the run without waiting for the full ``patience``. A loss that
      climbs at every drain (an LR range test headed for NaN) is not coming back; a loss
      that jumped and is coming down (after a bad batch) keeps its full patience.

    Defaults: a loss twice its best and 5 % of the start above it, for five log
    intervals (three when it climbs at each), is a run that will not come back on its
    own; a spike (:class:`Spike`) recovers within a drain or two. Lower ``tolerance``
    (0.2-0.5) to stop sooner; ``tolerance=0`` and ``start_fraction=0`` stop after
    ``patience`` drains each worse than the best. ``min_delta`` is a margin in absolute
    terms. The event's ``step`` is the first step above the threshold in the first bad
    drain; its severity is ``error``, since the guard asks the loop to stop.

    Args:
        tolerance: relative margin over the best window mean, >= 0.
        patience: consecutive bad drains before the event. The defaults assume drains of
            about 10 steps; with a shorter ``log_every`` raise it in proportion (a healthy
            BERT-like run's loss swings near 0 read as divergence after 5 drains of 5).
        min_delta: absolute margin added to the threshold, >= 0.
        start_fraction: margin as a fraction of the first window's mean loss, >= 0.

    References:
        Prechelt 1998, "Early stopping - but when?", in Neural Networks: Tricks of the
        Trade, LNCS 1524.
    """

    name = "divergence"

    def __init__(
        self,
        tolerance: float = 1.0,
        patience: int = 5,
        min_delta: float = 0.0,
        start_fraction: float = 0.05,
    ) -> None:
        self.tolerance = _float_in("tolerance", tolerance, 0.0, math.inf, low_closed=True)
        self.patience = _int_at_least("patience", patience, 1)
        self.min_delta = _float_in("min_delta", min_delta, 0.0, math.inf, low_closed=True)
        self.start_fraction = _float_in(
            "start_fraction", start_fraction, 0.0, math.inf, low_closed=True
        )
        self._start: float | None = None
        self._best: float | None = None
        self._streak = 0
        self._onset = 0
        self._active = False
        self._rising = 0  # consecutive bad drains whose mean rose, within the streak
        self._rising_since = 0  # the first step of those drains
        self._last_mean = math.inf

    __repr__ = arguments_repr

    def threshold(self) -> float:
        """The window mean above which a drain is bad (NaN before the first finite one)."""
        if self._best is None:
            return math.nan
        start = 0.0 if self._start is None else abs(self._start)
        return (
            self._best
            + self.tolerance * abs(self._best)
            + self.min_delta
            + self.start_fraction * start
        )

    def observe(self, window: Window) -> list[Event]:
        """Compare this window's mean loss with the best; return the event if it diverged."""
        given = window.loss_given
        given_finite = given & np.isfinite(window.loss)
        usable = given_finite & ~window.skipped
        if given_finite.any() and not usable.any():
            return []  # finite losses only on skipped steps: nothing to judge
        if not given.any():
            return []
        mean = float(window.loss[usable].mean()) if usable.any() else math.nan
        threshold = self.threshold()
        bad = math.isnan(mean) or mean > threshold  # NaN threshold: no best yet, not bad
        if not math.isnan(mean):
            self._best = mean if self._best is None else min(self._best, mean)
            self._start = mean if self._start is None else self._start
        if not bad:
            self._streak, self._active, self._rising = 0, False, 0
            return []
        first = int(window.steps[0])
        if self._streak == 0:
            self._onset = self._first_bad_step(window, threshold)
            self._rising, self._rising_since = 1, first
        elif math.isnan(mean) or mean > self._last_mean:
            self._rising += 1
        else:
            self._rising, self._rising_since = 1, first
        self._last_mean = math.inf if math.isnan(mean) else mean
        self._streak += 1
        last = int(window.steps[-1])
        runaway = (
            self._rising >= min(self.patience, RUNAWAY_DRAINS)
            and last - self._rising_since + 1 >= RUNAWAY_STEPS
        )
        if not (self._streak >= self.patience or runaway) or self._active:
            return []
        self._active = True
        return [self._event(window, mean, threshold)]

    @staticmethod
    def _first_bad_step(window: Window, threshold: float) -> int:
        """The first step of a bad window whose loss is above the threshold (or not finite)."""
        given = window.loss_given & ~window.skipped
        bad = given & ~(window.loss <= threshold) if not math.isnan(threshold) else given
        rows = np.flatnonzero(bad)
        return int(window.steps[rows[0]]) if rows.size else int(window.steps[0])

    def _event(self, window: Window, mean: float, threshold: float) -> Event:
        seen = "has been NaN/Inf" if math.isnan(mean) else f"({mean:.4g}) has stayed above"
        bound = "" if math.isnan(mean) else f" {threshold:.4g}"
        best = "" if self._best is None else f" (best {self._best:.4g})"
        return Event(
            step=self._onset,
            kind="divergence",
            severity="error",
            metric="loss",
            value=mean,
            threshold=threshold,
            message=(
                f"Divergence: the mean loss {seen}{bound}{best} for {self.patience} log "
                "interval(s); stopping. Lower the learning rate or add warm-up, clip "
                "gradients, and resume from the last good checkpoint."
            ),
            extra={"best": self._best, "detected_at": int(window.steps[-1])},
        )

    def state_dict(self) -> dict[str, Any]:
        """Return the first and best window means, the bad-drain streak and its onset."""
        return {
            "start": self._start,
            "best": self._best,
            "streak": self._streak,
            "onset": self._onset,
            "active": self._active,
            "rising": self._rising,
            "rising_since": self._rising_since,
            "last_mean": None if math.isinf(self._last_mean) else self._last_mean,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict`."""
        keys = {"best", "streak", "onset", "active"}
        newer = {"start", "rising", "rising_since", "last_mean"} & set(state)  # older versions
        _check_keys(self, state, keys | newer)
        self._rising = int(state.get("rising", 0))
        self._rising_since = int(state.get("rising_since", 0))
        last = state.get("last_mean")
        self._last_mean = math.inf if last is None else float(last)
        start = state.get("start")
        self._start = None if start is None else float(start)
        self._best = None if state["best"] is None else float(state["best"])
        self._streak = int(state["streak"])
        self._onset = int(state["onset"])
        self._active = bool(state["active"])
