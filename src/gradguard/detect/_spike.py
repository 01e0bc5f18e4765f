"""Spike: loss and gradient-norm jumps far above the local level, judged in log scale."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from gradguard._repr import arguments_repr
from gradguard.detect._common import _check_keys, _float_in, _int_at_least, _names, _usable
from gradguard.errors import ConfigError
from gradguard.records import Event, Severity, Window

SPIKE_METRICS = ("loss", "grad_norm")

#: Relative margin of the spike test against rounding: a window of equal values has a
#: std of 0 and a mean that summation can put an ulp below them (or a std that underflows
#: for values near 1e-200); without it the next equal value would read as a spike.
SPIKE_ROUNDING = 1e-12


class Spike:
    """Loss and gradient-norm spikes: a jump far above the local level, judged in log scale.

    Rule, per metric and per step, on ``x = log(value)`` (on the value itself once the
    metric has been zero or negative, as a log-likelihood can be): with at least
    ``min_samples`` earlier values, the local level is the median of the last
    ``reference`` values and the noise is the spread of step-to-step changes over the last
    ``window`` values (1.4826 times their median absolute deviation, over sqrt 2). A value
    is a spike when ``x`` exceeds the level by more than ``sigma`` times the noise and by
    at least a factor ``min_factor``. Only finite values of non-skipped steps are tested or
    kept (the loss only where given), so a NaN step neither fires nor poisons the history.

    Why this shape: a rolling mean and standard deviation (OLMo-core's rule) read the
    steep descent at the start of training as noise (the window's std is the descent
    itself), so a blow-up there, while the loss still falls fast, stays under the
    threshold; a median of recent values follows the descent, and step-to-step changes
    measure the noise without the trend. The log scale makes one rule fit a loss of 2.3
    and one of 0.01. A spike enters the history winsorized (clipped to the threshold it
    crossed), so one huge value neither hides the rest of a burst nor freezes the history
    after a real level shift.

    Severity: a loss spike is a ``warning`` when it undoes at least ``damage`` of the
    progress made so far (by default all of it: the jump above the level is at least the
    start level minus the current level, and at least the level itself). A smaller,
    passing loss spike, as momentum SGD makes near a low loss, is ``info``. A
    gradient-norm spike is ``info`` when the loss was given (the clip policy or the skip
    contain it, and a loss spike reports any damage), a ``warning`` otherwise. Within one
    run of consecutive spike steps only the first warning stays a warning; the later ones
    are ``info`` and say which warning they continue.

    Level shifts: late in training, batch-to-batch noise can hide a tenfold rise of the
    loss from the step-by-step test. So the loss's level is watched too: the median of the
    last ``persist`` losses (most of them, that is) against the median of the
    ``reference`` before them, as they are (not winsorized). A rise of ``min_factor`` and
    of ``shift_sigma`` standard errors of that difference of medians is a lasting shift:
    the loss did not come back, the weights were moved (an LR burst, a bad run of
    batches). It is a ``warning`` when it undoes ``shift_damage`` of the progress and
    ``info`` otherwise (Adam near a low loss swings by 3-30x and comes back within tens of
    steps); ``Rollback`` undoes a shift whatever its severity. Five standard errors keep
    it silent on 100,000 steps of lognormal noise up to sigma 0.5 (four gave 4-9 false
    shifts). Its ``step`` is the first step of the new level, ``extra["detected_at"]``
    where it held, ``extra["shift"]`` is True.

    ``layers`` names the layers whose gradient norm jumped most against their own recent
    level, the largest jump first. ``extra["onset"]`` is the first step of the run of
    consecutive steps with a spike (of either metric) that this one belongs to: after an
    LR burst the gradient often jumps a step before the loss shows the damage.

    Args:
        window: how many recent values the noise is measured over.
        sigma: how many noise widths above the level make a spike.
        min_samples: values needed before any test, in [2, window].
        metrics: which of ``"loss"`` and ``"grad_norm"`` to watch.
        min_factor: the least ratio of a spike to the level, > 1.
        reference: how many recent values the level is the median of.
        damage: share of the progress a loss spike must undo to be a warning, > 0.
        persist: steps a new loss level must hold to be a lasting shift, >= 1.
        shift_damage: share of the progress a lasting shift must undo to be a warning, > 0.
        shift_sigma: standard errors of the difference of the two medians a lasting shift
            must exceed, > 0.

    References:
        Hampel 1974, "The influence curve and its role in robust estimation" (JASA): the
        median and MAD as outlier-resistant level and scale; OLMo-core's
        ``SkipStepOptimizer`` for the z-test this rule refines.
    """

    name = "spike"

    def __init__(
        self,
        window: int = 64,
        sigma: float = 6.0,
        min_samples: int = 8,
        metrics: Sequence[str] = SPIKE_METRICS,
        min_factor: float = 2.0,
        reference: int = 8,
        damage: float = 1.0,
        persist: int = 5,
        shift_damage: float = 0.5,
        shift_sigma: float = 5.0,
    ) -> None:
        self.window = _int_at_least("window", window, 2)
        self.sigma = _float_in("sigma", sigma, 0.0, math.inf)
        self.min_samples = _int_at_least("min_samples", min_samples, 2)
        if self.min_samples > self.window:
            raise ConfigError(
                f"min_samples must be in [2, window={self.window}], got {min_samples!r}: "
                "the window can never hold more values than its length."
            )
        self.metrics = _spike_metrics(metrics)
        self.min_factor = _float_in("min_factor", min_factor, 1.0, math.inf)
        self.reference = _int_at_least("reference", reference, 1)
        self.damage = _float_in("damage", damage, 0.0, math.inf)
        self.persist = _int_at_least("persist", persist, 1)
        self.shift_damage = _float_in("shift_damage", shift_damage, 0.0, math.inf)
        self.shift_sigma = _float_in("shift_sigma", shift_sigma, 0.0, math.inf)
        self._history: dict[str, deque[float]] = {
            m: deque(maxlen=self.window) for m in self.metrics
        }
        self._linear: dict[str, bool] = dict.fromkeys(self.metrics, False)
        self._start: dict[str, list[float]] = {m: [] for m in self.metrics}
        self._layers: deque[list[float]] = deque(maxlen=self.reference)
        self._noise_now: dict[str, float] = {}  # the noise of the last test, per metric
        # [first, last] step of the current run of consecutive steps with a spike
        self._streak = [0, -1]
        # the last reference + persist tested losses, as (step, value in the loss's scale)
        self._recent: deque[tuple[int, float]] = deque(maxlen=self.reference + self.persist)
        self._shifted = False  # a level shift was reported and has not cleared
        self._last_warning = -(10**9)  # the step of the last loss warning
        self._warned = False  # the current run of spikes has had its warning

    __repr__ = arguments_repr

    def observe(self, window: Window) -> list[Event]:
        """Test each usable value of ``window`` in step order; return the spikes."""
        usable = _usable(window)
        tested = {
            metric: usable
            & np.isfinite(window.loss if metric == "loss" else window.grad_norm)
            & (window.loss_given if metric == "loss" else True)
            for metric in self.metrics
        }
        layers_ok = window.per_layer.ndim == 2 and window.per_layer.shape[1] == len(
            window.layer_names
        )
        events: list[Event] = []
        for i in range(len(window)):
            step = int(window.steps[i])
            found = []
            for metric in self.metrics:
                if not tested[metric][i]:
                    continue
                value = float(window.loss[i] if metric == "loss" else window.grad_norm[i])
                event = self._test(metric, step, value, window, i if layers_ok else None)
                if event is not None:
                    found.append(event)
            if found:
                events += self._follow_streak(step, found)
            if "loss" in tested and tested["loss"][i]:
                shifted = self._follow_level(step, float(window.loss[i]), found)
                events += [shifted] if shifted is not None else []
            if layers_ok and usable[i] and np.isfinite(window.per_layer[i]).all():
                self._layers.append(window.per_layer[i].tolist())
        return events

    def _follow_level(self, step: int, loss: float, found: list[Event]) -> Event | None:
        """Test for a lasting shift of the loss's level; a warning when it first holds.

        Over the last ``reference + persist`` tested losses (as they are, not winsorized):
        the median of the last ``persist`` against the median of the ``reference`` before
        them, in the metric's scale. A shift counts when it is at least ``min_factor`` and
        ``shift_sigma`` standard errors of that difference of medians; it re-arms once the
        shift is back under half of that.
        """
        if any(e.metric == "loss" and e.severity == "warning" for e in found):
            self._last_warning = step
        self._recent.append((step, self._scaled("loss", loss)))
        if len(self._recent) < self.reference + self.persist:
            return None
        values = np.array([x for _, x in self._recent])
        before = float(np.median(values[: self.reference]))
        after = float(np.median(values[self.reference :]))
        noise = self._noise_now.get("loss", 0.0)  # measured by this step's spike test
        floor = (
            (self.min_factor - 1.0) * abs(before)
            if self._linear["loss"]
            else math.log(self.min_factor)
        )
        # the standard error of a difference of two medians: 1.2533 sd / sqrt(n) each
        error = 1.2533 * noise * math.sqrt(1 / self.persist + 1 / self.reference)
        needed = max(floor, self.shift_sigma * error)
        shift = after - before
        if shift < needed / 2:
            self._shifted = False
        if not shift > needed or self._shifted:
            return None
        self._shifted = True
        onset = next(s for s, x in list(self._recent)[self.reference :] if x - before >= floor)
        if self._last_warning >= onset - self.reference:
            return None  # the spike that started it was warned about
        level, now = self._value("loss", before), self._value("loss", after)
        start = self._value("loss", float(np.median(self._start["loss"])))
        undone = (now - level) / (start - level) if start > level else math.inf
        severity: Severity = "warning" if undone >= self.shift_damage else "info"
        if severity == "warning":
            self._last_warning = step
        share = f"{min(undone, 9.99):.0%}" if math.isfinite(undone) else "all"
        advice = (
            "Check the learning rate and the batches since that step, or clip gradients."
            if severity == "warning"
            else "A recovery (Rollback) undoes it; no action needed otherwise."
        )
        return Event(
            step=onset,
            kind="spike",
            metric="loss",
            value=now,
            threshold=self._value("loss", before + needed),
            severity=severity,
            message=(
                f"Loss level shift from step {onset}: the median of the last {self.persist} "
                f"losses ({now:.4g}) is {now / level if level else math.inf:.3g}x the median of "
                f"the {self.reference} before ({level:.4g}) and has not come back, undoing "
                f"{share} of the progress since the start ({start:.4g}). {advice}"
            ),
            extra={"onset": onset, "detected_at": step, "level": level, "shift": True},
        )

    def _scaled(self, metric: str, value: float) -> float:
        """``value`` in the metric's scale (log unless it has been zero or negative)."""
        if self._linear[metric] or value <= 0:
            return value
        return math.log(value)

    def _noise(self, metric: str) -> float:
        """1.4826 MAD of the kept values' step-to-step changes, over sqrt 2 (0 when few)."""
        history = self._history[metric]
        if len(history) < 3:
            return 0.0
        steps = np.diff(np.fromiter(history, dtype=np.float64, count=len(history)))
        return 1.4826 * float(np.median(np.abs(steps - np.median(steps)))) / math.sqrt(2)

    def _follow_streak(self, step: int, found: list[Event]) -> list[Event]:
        """Extend (or start) the run of spike steps; only its first warning stays one."""
        if self._streak[1] != step - 1:
            self._streak = [step, step]
            self._warned = False
        self._streak[1] = step
        out = []
        for event in found:
            event.extra["onset"] = self._streak[0]
            repeat = event.severity == "warning" and self._warned
            out.append(_continued(event, self._streak[0]) if repeat else event)
            self._warned = self._warned or event.severity == "warning"
        return out

    def _to_scale(self, metric: str, value: float) -> float:
        if value <= 0 and not self._linear[metric]:
            self._linear[metric] = True  # a zero or negative value: judge it linearly
            self._history[metric].clear()
            self._start[metric] = []
            if metric == "loss":
                self._recent.clear()
        return self._scaled(metric, value)

    def _test(
        self, metric: str, step: int, value: float, window: Window, row: int | None
    ) -> Event | None:
        """Test one value against the history, then add it (winsorized) to the history."""
        x = self._to_scale(metric, value)
        history = self._history[metric]
        start = self._start[metric]
        event = None
        if len(history) >= self.min_samples:
            past = np.fromiter(history, dtype=np.float64, count=len(history))
            level = float(np.median(past[-self.reference :]))
            noise = self._noise_now[metric] = self._noise(metric)
            floor = (
                (self.min_factor - 1.0) * abs(level)
                if self._linear[metric]
                else math.log(self.min_factor)
            )
            limit = level + max(self.sigma * noise, floor) + SPIKE_ROUNDING * abs(level)
            if x > limit:
                event = self._event(metric, step, value, limit, level, noise, window, row)
                x = limit
        history.append(x)
        if len(start) < self.reference:
            start.append(x)
        return event

    def _value(self, metric: str, x: float) -> float:
        return x if self._linear[metric] else math.exp(x)

    def _event(
        self,
        metric: str,
        step: int,
        value: float,
        limit: float,
        level: float,
        noise: float,
        window: Window,
        row: int | None,
    ) -> Event:
        level_value, threshold = self._value(metric, level), self._value(metric, limit)
        start_value = self._value(metric, float(np.median(self._start[metric])))
        jump = value - level_value
        if metric == "loss":
            undone = jump / (start_value - level_value) if start_value > level_value else math.inf
            hurt = jump >= self.damage * max(start_value - level_value, abs(level_value))
            severity: Severity = "warning" if hurt else "info"
            what = "Loss"
            effect = (
                f"it undoes {min(undone, 9.99):.0%} of the progress since the start "
                f"({start_value:.4g} -> {level_value:.4g})"
                if math.isfinite(undone)
                else "the loss had not improved on its start"
            )
            fix = (
                "Check the batch for bad data, lower the learning rate or clip gradients."
                if severity == "warning"
                else "No action needed unless it lasts."
            )
        else:
            given = bool(window.loss_given[row]) if row is not None else False
            severity = "info" if given else "warning"
            what, effect = "Gradient-norm", "the clip policy or the optimizer contains it"
            fix = (
                "A loss spike at the same step would show damage."
                if given
                else "Clip the gradient norm (NormClip, ZClip), lower the learning rate, "
                "check the batch."
            )
        layers = self._jumped_layers(window, row)
        where = f" Largest jump in {_names(layers)}." if layers else ""
        return Event(
            step=step,
            kind="spike",
            metric=metric,
            value=value,
            threshold=threshold,
            layers=layers,
            severity=severity,
            message=(
                f"{what} spike: {value:.4g} against a local level of {level_value:.4g} "
                f"(threshold {threshold:.4g}); {effect}.{where} {fix}"
            ),
            extra={"level": level_value, "noise": noise, "start": start_value},
        )

    def _jumped_layers(self, window: Window, row: int | None) -> tuple[str, ...]:
        """Layers whose norm rose at least ``min_factor`` over their own recent median."""
        if row is None or not self._layers:
            return ()
        now = np.array([_log(v) for v in window.per_layer[row]])
        before = np.array([_log(v) for v in np.median(np.array(self._layers), axis=0)])
        with np.errstate(invalid="ignore"):  # a layer at exactly 0 before and now: no jump
            jumps = np.nan_to_num(now - before, nan=0.0)
        order = np.argsort(-jumps, kind="stable")
        return tuple(window.layer_names[j] for j in order if jumps[j] >= math.log(self.min_factor))

    def state_dict(self) -> dict[str, Any]:
        """Return the histories (at most ``window`` floats per metric) and the start levels."""
        return {
            "history": {m: list(h) for m, h in self._history.items()},
            "linear": dict(self._linear),
            "start": {m: list(v) for m, v in self._start.items()},
            "layers": [list(row) for row in self._layers],
            "streak": list(self._streak),
            "recent": [[s, x] for s, x in self._recent],
            "shifted": self._shifted,
            "last_warning": self._last_warning,
            "warned": self._warned,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the histories saved by :meth:`state_dict`."""
        _check_keys(
            self,
            state,
            {
                "history",
                "linear",
                "start",
                "layers",
                "streak",
                "recent",
                "shifted",
                "last_warning",
                "warned",
            },
        )
        self._warned = bool(state["warned"])
        self._streak = [int(v) for v in state["streak"]]
        self._recent = deque(
            ((int(s), float(x)) for s, x in state["recent"]), maxlen=self.reference + self.persist
        )
        self._shifted = bool(state["shifted"])
        self._last_warning = int(state["last_warning"])
        self._history = {
            m: deque((float(v) for v in state["history"][m]), maxlen=self.window)
            for m in self.metrics
        }
        self._linear = {m: bool(state["linear"][m]) for m in self.metrics}
        self._start = {m: [float(v) for v in state["start"][m]] for m in self.metrics}
        self._layers = deque(
            ([float(v) for v in row] for row in state["layers"]), maxlen=self.reference
        )


def _continued(event: Event, onset: int) -> Event:
    """A warning that repeats one already given for the same run of spikes, as info."""
    return replace(
        event,
        severity="info",
        message=f"{event.message} (Continues the spike warned about at step {onset}.)",
    )


def _log(value: float) -> float:
    """``log(value)``, with ``-inf`` for 0 (a layer whose gradient is exactly zero)."""
    return math.log(value) if value > 0 else -math.inf


def _spike_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    valid = isinstance(metrics, Sequence) and not isinstance(metrics, str) and bool(metrics)
    chosen = tuple(metrics) if valid else ()
    if not valid or len(set(chosen)) != len(chosen) or not set(chosen) <= set(SPIKE_METRICS):
        raise ConfigError(
            f"metrics must be a non-empty sequence of distinct names from {SPIKE_METRICS}, "
            f"e.g. ('loss',), got {metrics!r}."
        )
    return chosen
