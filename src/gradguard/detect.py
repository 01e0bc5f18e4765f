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
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from itertools import pairwise
from typing import Any, NamedTuple

import numpy as np

from gradguard.errors import ConfigError
from gradguard.protocols import Detector as Detector
from gradguard.records import BoolArray, Event, FloatArray, Severity, Window

#: Largest finite fp32 value: a norm above it overflowed the fp32 accumulation.
FP32_MAX = float(np.finfo(np.float32).max)

SPIKE_METRICS = ("loss", "grad_norm")

#: Bad drains in a row, each worse than the last, after which Divergence stops a run
#: without waiting for its full patience: a loss that climbs at every drain is running away.
RUNAWAY_DRAINS = 3
#: ... and at least this many steps: with a short ``log_every`` three drains are batch noise.
RUNAWAY_STEPS = 30

#: Exploding's weight rule compares each layer's parameter norm with the one at least this
#: many steps before (the previous drain, or an older one when drains are closer).
WEIGHT_SPAN = 10

#: Relative margin of the spike test against rounding: a window of equal values has a
#: std of 0 and a mean that summation can put an ulp below them (or a std that underflows
#: for values near 1e-200); without it the next equal value would read as a spike.
SPIKE_ROUNDING = 1e-12


# --- argument checks -------------------------------------------------------------------


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _float_in(
    name: str,
    value: float,
    low: float,
    high: float,
    *,
    low_closed: bool = False,
    high_closed: bool = False,
) -> float:
    """Return ``value`` as a float if it lies in the interval, else raise ConfigError."""
    ok = _is_real(value) and math.isfinite(value)
    if ok:
        above = value >= low if low_closed else value > low
        below = value <= high if high_closed else value < high
        ok = above and below
    if not ok:
        interval = f"{'[' if low_closed else '('}{low}, {high}{']' if high_closed else ')'}"
        raise ConfigError(f"{name} must be a number in {interval}, got {value!r}.")
    return float(value)


def _int_at_least(name: str, value: int, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{name} must be an int >= {low}, got {value!r}.")
    return value


def _check_keys(owner: object, state: Mapping[str, Any], keys: set[str]) -> None:
    if set(state) != keys:
        raise ConfigError(
            f"{type(owner).__name__}.load_state_dict expects keys {sorted(keys)}, got "
            f"{sorted(state)}: was this state saved from another detector?"
        )


# --- small shared pieces ---------------------------------------------------------------


def _zeroed(window: Window, row: int) -> bool:
    """Whether the guard zeroed this step's non-finite gradients and took it."""
    return window.zeroed is not None and bool(window.zeroed[row])


def _usable(window: Window) -> BoolArray:
    """Steps whose statistics may enter a detector: finite gradients, not skipped."""
    return ~window.skipped & window.finite


def _names(names: Sequence[str], limit: int = 3) -> str:
    """``a, b, c (+2 more)``: a short list of names for a message."""
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _tensors_where(window: Window, row: int, bad: BoolArray) -> tuple[str, ...]:
    """Names of the tensors flagged in ``bad`` (a boolean row of ``per_tensor``)."""
    if window.per_tensor.ndim != 2 or window.per_tensor.shape[1] != len(window.tensor_names):
        return ()  # the guard did not record per-tensor norms for this window
    return tuple(window.tensor_names[j] for j in np.flatnonzero(bad))


# --- per-step detectors ----------------------------------------------------------------


class NonFinite:
    """One ``nonfinite`` event per step whose gradients hold a NaN or an Inf.

    Rule: ``finite`` is False for the step (and it is not flagged ``overflow``: an
    overflowed norm of finite gradients is :class:`Overflow`'s, never a false
    non-finite). The event's ``value`` is the global gradient norm (NaN or inf) and
    ``layers`` names the tensors whose own norm is not finite, so the first bad tensor
    in depth order points at where the NaN was born.

    Severity: ``error`` when the step was not skipped (the NaN reached the weights);
    ``info`` for the later steps of a streak of skipped non-finite steps, whose first step
    carried the warning;
    ``info`` when the guard steps through a ``GradScaler``, the loss is finite and the
    streak of non-finite steps is at most ``scaler_streak`` long (the scaler halves its
    scale and tries again: its start-up backoffs are its normal work; 20 halvings take
    the default scale of 65,536 below 1, past which the scaler cannot help); ``warning``
    otherwise.

    Args:
        scaler_streak: consecutive non-finite steps a loss scaler is allowed, >= 1.
    """

    name = "nonfinite"

    def __init__(self, scaler_streak: int = 20) -> None:
        self.scaler_streak = _int_at_least("scaler_streak", scaler_streak, 1)
        self._streak = 0  # consecutive non-finite steps, across windows
        self._warned = False  # the current streak has had its warning

    def __repr__(self) -> str:
        return f"NonFinite(scaler_streak={self.scaler_streak})"

    def _severity(self, window: Window, row: int, loss_bad: bool) -> Severity:
        if _zeroed(window, row):
            return "warning"  # the bad tensors' gradients were dropped, the rest stepped
        if not window.skipped[row]:
            return "error"  # NaN/Inf went into the weights
        if window.loss_scaled and not loss_bad and self._streak <= self.scaler_streak:
            return "info"  # the loss scaler backs off and tries again: its normal work
        if self._warned:
            return "info"  # this streak already has its warning
        self._warned = True
        return "warning"

    def observe(self, window: Window) -> list[Event]:
        """Return one event per non-finite step of ``window``."""
        events = []
        bad_rows = ~window.finite & ~window.overflow
        for i in range(len(window)):
            self._streak = self._streak + 1 if bad_rows[i] else 0
            if not bad_rows[i]:
                self._warned = False
                continue
            row = int(i)
            tensors = _tensors_where(window, row, ~np.isfinite(window.per_tensor[row]))
            skipped = bool(window.skipped[row])
            where = f" in {len(tensors)} tensor(s), first {tensors[0]}" if tensors else ""
            taken = "skipped" if skipped else "not skipped"
            if _zeroed(window, row):
                taken = "taken with those tensors' gradients zeroed (nonfinite='zero')"
            loss_bad = bool(window.loss_given[row]) and not math.isfinite(window.loss[row])
            origin = (
                " The loss itself is NaN/Inf: the forward pass produced it." if loss_bad else ""
            )
            severity = self._severity(window, row, loss_bad)
            if severity == "info" and window.loss_scaled and not self._warned:
                origin += " The loss scaler backs off: its normal work."
            elif severity == "info":
                origin += f" The streak of {self._streak} non-finite step(s) was warned about."
            events.append(
                Event(
                    step=int(window.steps[row]),
                    kind="nonfinite",
                    severity=severity,
                    metric="grad_norm",
                    value=float(window.grad_norm[row]),
                    threshold=math.nan,
                    layers=tensors,
                    message=(f"NaN/Inf gradients{where}; step {taken}.{origin}"),
                    extra={"skipped": skipped, "loss_finite": not loss_bad},
                )
            )
        return events

    def state_dict(self) -> dict[str, Any]:
        """Return the number of consecutive non-finite steps at the end of the last window."""
        return {"streak": self._streak, "warned": self._warned}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict` (an empty mapping: no streak)."""
        _check_keys(self, state, {"streak", "warned"} if state else set())
        self._streak = int(state.get("streak", 0))
        self._warned = bool(state.get("warned", False))


class Overflow:
    """One ``overflow`` event per step whose gradient norm overflowed fp32.

    Rule: ``overflow`` is True for the step: every gradient element is finite, but the
    sum of squares exceeded the fp32 range (elements around 1e19 and up), a sign of
    exploding gradients rather than of a NaN. ``threshold`` is the largest fp32 value;
    ``layers`` names the tensors whose own norm overflowed. No state, nothing to tune.
    """

    name = "overflow"

    def __repr__(self) -> str:
        return "Overflow()"

    def observe(self, window: Window) -> list[Event]:
        """Return one event per overflowed step of ``window``."""
        events = []
        for i in np.flatnonzero(window.overflow):
            row = int(i)
            norms = window.per_tensor[row]
            tensors = _tensors_where(window, row, ~(np.abs(norms) <= FP32_MAX))
            skipped = bool(window.skipped[row])
            events.append(
                Event(
                    step=int(window.steps[row]),
                    kind="overflow",
                    metric="grad_norm",
                    value=float(window.grad_norm[row]),
                    threshold=FP32_MAX,
                    layers=tensors,
                    message=(
                        "Gradient norm overflowed fp32 although every element is finite "
                        f"(step {'skipped' if skipped else 'not skipped'}): gradients are "
                        "exploding. Clip the gradient norm and lower the learning rate."
                    ),
                    extra={"skipped": skipped},
                )
            )
        return events

    def state_dict(self) -> dict[str, Any]:
        """Return the detector's state: none."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore state; only an empty mapping fits."""
        _check_keys(self, state, set())


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

    def __repr__(self) -> str:
        return (
            f"Spike(window={self.window}, sigma={self.sigma}, min_samples={self.min_samples}, "
            f"metrics={self.metrics!r}, min_factor={self.min_factor}, "
            f"reference={self.reference}, damage={self.damage}, persist={self.persist}, "
            f"shift_damage={self.shift_damage}, shift_sigma={self.shift_sigma})"
        )

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


# --- sustained detectors ---------------------------------------------------------------

_VANISHING_FIX = "Early layers learn slowly or not at all."


class Vanishing:
    """Gradients that die out on their way to the input: the first layers barely learn.

    Rule, per drain: each layer's gradient norm is averaged over the window's usable
    steps and divided by the largest layer average of that window. The vanishing layers
    are the leading run, in depth order (``named_parameters`` order, input side first), of
    layers whose ratio is below ``threshold``: the gradient that reaches a layer has
    passed every layer after it, so when it dies out through depth, every layer before
    the point where it died is weak too. A small layer with a healthy layer before it is
    small for its own reasons and is not vanishing: attention query and key projections
    at initialization (their gradient is second order while attention is uniform: 1e-4
    of the largest layer in a BERT at init), LayerNorm gains, biases. When the condition
    holds for ``patience`` consecutive drains, one ``warning`` event names the leading
    weak layers, the first one first; it re-arms when the condition clears.

    A leading run made only of layers whose gradient is exactly 0 is dead units (ReLUs
    that never fire, so nothing flows back through them) or parameters the loss never
    uses. It counts only while the run is stuck: the window's mean loss is still within
    ``stuck`` (relative) of the first window's, as it is for a network of dead units
    sitting at chance. Without a loss it always counts. ``ignore_zero=True`` leaves
    layers whose gradient is exactly 0 out of the rule.

    A small gradient is a symptom only if the weights barely move: an adaptive optimizer
    (Adam and its kin) divides each gradient by its own running size, so a layer with a
    tiny gradient can still take full-size steps. Where the guard measured a layer's
    update ratio (``Window.update_ratio``: the norm of a step's weight change over the
    weights' norm, one layer subset per drain), a layer whose last measured ratio is at
    least ``min_update`` is learning and ends the leading run.

    Defaults: a layer 1,000 times weaker than the strongest is, in practice, not being
    trained (measured at initialization, width 32: a 20-layer sigmoid MLP with PyTorch's
    default init gives its first layer a ratio of 5e-17, the same MLP with ReLU and He
    init 0.3); three drains rule out a noisy window. The smallest median update ratio of
    any layer in ten healthy runs (GPT, BERT, ViT, ResNet, LSTM, GRU, MLPs; SGD and
    AdamW) is 1.3e-4, while the weak layers of vanishing runs move by 1e-8 or less (0 in
    fp32 for a deep sigmoid MLP): ``min_update`` 1e-6 sits between.

    Args:
        threshold: ratio to the largest layer norm below which a layer counts, in (0, 1).
        patience: consecutive drains the condition must hold.
        ignore_zero: leave layers with exactly zero gradient out.
        stuck: the relative loss improvement under which dead units count, in (0, 1).
        min_update: an update ratio at or above which a layer is learning, in (0, 1).

    References:
        Pascanu, Mikolov & Bengio 2013, "On the difficulty of training recurrent neural
        networks" (ICML); Glorot & Bengio 2010, "Understanding the difficulty of training
        deep feedforward neural networks" (AISTATS); Lu et al. 2020, "Dying ReLU and
        initialization" (CiCP).
    """

    name = "vanishing"

    def __init__(
        self,
        threshold: float = 1e-3,
        patience: int = 3,
        ignore_zero: bool = False,
        stuck: float = 0.05,
        min_update: float = 1e-6,
    ) -> None:
        self.threshold = _float_in("threshold", threshold, 0.0, 1.0)
        self.min_update = _float_in("min_update", min_update, 0.0, 1.0)
        self._updates: list[float] | None = None  # last measured update ratio per layer
        self.patience = _int_at_least("patience", patience, 1)
        if not isinstance(ignore_zero, bool):
            raise ConfigError(f"ignore_zero must be True or False, got {ignore_zero!r}.")
        self.ignore_zero = ignore_zero
        self.stuck = _float_in("stuck", stuck, 0.0, 1.0)
        self._first_loss: float | None = None
        self._streak = 0
        self._onset = 0
        self._active = False

    def __repr__(self) -> str:
        return (
            f"Vanishing(threshold={self.threshold}, patience={self.patience}, "
            f"ignore_zero={self.ignore_zero}, stuck={self.stuck}, min_update={self.min_update})"
        )

    def observe(self, window: Window) -> list[Event]:
        """Update the streak with this window; return an event when an episode starts."""
        self._follow_updates(window)
        norms = _layer_means(window)
        if norms is None:
            return []
        loss = _mean_loss(window)
        if self._first_loss is None and not math.isnan(loss):
            self._first_loss = loss
        top = float(norms.max())
        ratios = norms / top if top > 0 else np.zeros_like(norms)
        leading = self._leading_weak(norms, ratios)
        if leading and all(norms[j] == 0 for j in leading) and not self._stuck(loss):
            leading = []
        if not leading:
            self._streak, self._active = 0, False
            return []
        self._onset = int(window.steps[0]) if self._streak == 0 else self._onset
        self._streak += 1
        if self._streak < self.patience or self._active:
            return []
        self._active = True
        return [self._event(window, leading, ratios, norms, loss)]

    def _follow_updates(self, window: Window) -> None:
        ratio = window.update_ratio
        if ratio is None:
            return
        if self._updates is None or len(self._updates) != len(ratio):
            self._updates = [math.nan] * len(ratio)
        for j, value in enumerate(ratio):
            if math.isfinite(value):
                self._updates[j] = float(value)

    def _learning(self, j: int) -> bool:
        """Whether layer ``j``'s last measured update ratio says it moves."""
        updates = self._updates
        return updates is not None and j < len(updates) and updates[j] >= self.min_update

    def _leading_weak(self, norms: FloatArray, ratios: FloatArray) -> list[int]:
        leading = []
        for j in range(len(norms)):
            if self.ignore_zero and norms[j] == 0:
                continue
            if ratios[j] >= self.threshold or self._learning(j):
                break
            leading.append(j)
        return leading if len(leading) < len(norms) else []

    def _stuck(self, loss: float) -> bool:
        if math.isnan(loss) or self._first_loss is None:
            return True
        return loss > self._first_loss - self.stuck * abs(self._first_loss)

    def _event(
        self,
        window: Window,
        leading: list[int],
        ratios: FloatArray,
        norms: FloatArray,
        loss: float,
    ) -> Event:
        names = tuple(window.layer_names[j] for j in leading)
        zero = [window.layer_names[j] for j in leading if norms[j] == 0]
        small = [window.layer_names[j] for j in leading if norms[j] != 0]
        smallest = float(min(ratios[j] for j in leading))
        parts = []
        if small:
            parts.append(
                f"Vanishing gradients in the first {len(leading)} layer(s), {_names(small)}: "
                f"gradient norm below {self.threshold:g} of the largest layer's for "
                f"{self.patience} log interval(s) (smallest ratio {smallest:.2g}). "
                f"{_VANISHING_FIX}"
            )
        if zero:
            stuck = (
                f" while the loss stays at {loss:.4g} (first window {self._first_loss:.4g})"
                if self._first_loss is not None and not math.isnan(loss)
                else ""
            )
            parts.append(
                f"Exactly zero gradient in {_names(zero)}{stuck}: dead units (ReLUs that "
                "never fire pass no gradient back; use LeakyReLU, He init, a lower learning "
                "rate, or reinitialize) or parameters the loss does not use (freeze them, "
                "or pass ignore_zero=True)."
            )
        return Event(
            step=self._onset,
            kind="vanishing",
            metric="grad_norm_ratio",
            value=smallest,
            threshold=self.threshold,
            layers=names,
            message=" ".join(parts),
            extra={
                "ratios": {window.layer_names[j]: float(ratios[j]) for j in leading},
                "zero": zero,
                "detected_at": int(window.steps[-1]),
                **self._update_extra(window, leading),
            },
        )

    def _update_extra(self, window: Window, leading: list[int]) -> dict[str, Any]:
        """The weak layers' last measured update ratios: how little they move."""
        if self._updates is None:
            return {}
        measured = {
            window.layer_names[j]: self._updates[j]
            for j in leading
            if j < len(self._updates) and math.isfinite(self._updates[j])
        }
        return {"update_ratios": measured} if measured else {}

    def state_dict(self) -> dict[str, Any]:
        """Return the streak, its onset, whether it was reported, the first loss, updates."""
        return {
            "streak": self._streak,
            "onset": self._onset,
            "active": self._active,
            "first_loss": self._first_loss,
            "updates": None if self._updates is None else list(self._updates),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict` (one saved before updates: none)."""
        keys = {"streak", "onset", "active", "first_loss"}
        _check_keys(self, state, keys | ({"updates"} if "updates" in state else set()))
        updates = state.get("updates")
        self._updates = None if updates is None else [float(v) for v in updates]
        self._streak = int(state["streak"])
        self._onset = int(state["onset"])
        self._active = bool(state["active"])
        first = state["first_loss"]
        self._first_loss = None if first is None else float(first)


def _layer_medians(window: Window) -> FloatArray | None:
    """Median per-layer norm over the usable steps whose layer norms are all finite."""
    rows = _layer_rows(window)
    return None if rows is None else np.asarray(np.median(window.per_layer[rows], axis=0))


def _loss_rows(window: Window) -> BoolArray:
    """Usable steps with a given, finite loss."""
    return _usable(window) & window.loss_given & np.isfinite(window.loss)


def _mean_loss(window: Window) -> float:
    """Mean of the window's given, finite losses on usable steps (NaN when none)."""
    rows = _loss_rows(window)
    return float(window.loss[rows].mean()) if rows.any() else math.nan


def _first_loss(window: Window) -> float:
    """The window's first given, finite loss on a usable step (NaN when none)."""
    rows = _loss_rows(window)
    return float(window.loss[rows][0]) if rows.any() else math.nan


def _first_usable_step(window: Window) -> int:
    """The first step of the window with finite gradients that was not skipped."""
    usable = _usable(window) & np.isfinite(window.grad_norm)
    return int(window.steps[usable][0]) if usable.any() else int(window.steps[0])


def _layer_rows(window: Window) -> BoolArray | None:
    """The usable steps whose layer norms are all finite; None without per-layer norms."""
    per_layer = window.per_layer
    if len(window) == 0 or per_layer.ndim != 2 or per_layer.shape[1] == 0:
        return None
    if per_layer.shape[1] != len(window.layer_names):
        return None  # the guard did not record per-layer norms for this window
    rows = _usable(window) & np.isfinite(per_layer).all(axis=1)
    return rows if rows.any() else None


def _layer_means(window: Window) -> FloatArray | None:
    """Mean per-layer norm over the usable steps whose layer norms are all finite."""
    rows = _layer_rows(window)
    return None if rows is None else np.asarray(window.per_layer[rows].mean(axis=0))


class _RisingRun(NamedTuple):
    """The current run of rising gradient norms; it restarts at any step that does not rise."""

    first_step: int
    first_norm: float
    first_loss: float  # NaN when the step had no loss
    length: int
    last_norm: float
    base_step: int  # the last step still under twice first_norm: the growth starts after it


class Exploding:
    """Gradients too large for the weights they update, or growing while the loss does not fall.

    Rule, per drain, over the usable steps (finite, not skipped), any of:

    * size (``metric="grad_to_weight"``): the median over layers of a layer's median
      gradient norm over the window divided by its parameter norm at the window's start
      is above ``max_ratio``. A plain SGD step of LR
      ``lr`` changes a layer by ``lr`` times this ratio, relative: at 100, even LR 0.01
      replaces the weights at every step. Healthy networks sit between 1e-4 and 1 (a GPT,
      a BERT and an MLP at initialization, measured); a 12-layer ReLU MLP with N(0, 1)
      weights sits at 3e7, a tanh RNN with recurrent spectral radius 3 at 80-700. Needs
      the parameter norms the guard measures at each drain; the median ignores a few
      zero-initialized layers, whose ratio is infinite at the start.
    * growth (``metric="grad_norm"``): the window median of the global norm grew at each
      of the last ``patience`` drains, by a factor of at least ``growth`` in all, and the
      loss rose meanwhile by ``loss_rise`` of the progress made before (of the loss itself
      when none was). A gradient that grows while the loss falls or barely moves is a
      model leaving a plateau (a learning transition) or Adam's noise near a low loss, not
      an explosion.
    * fast growth (``metric="grad_norm"``): the norm rose at each of ``run_steps``
      consecutive usable steps or more, by a factor of at least ``run_growth`` in all,
      and the loss rose meanwhile (as below). Its onset is the last step of the run still
      under twice the run's first norm: a run may begin with small rises of ordinary
      noise before the blow-up proper.
    * weights (``metric="weight_growth"``): a layer's parameter norm grew by a factor of
      ``weight_growth`` or more since the drain at least 10 steps back (since the guard
      was built, for the first drains) while the loss rose: that layer's updates are far
      too large for it, as with a param group whose LR is 1,000x the rest. Its own
      gradient may not grow at all (a layer's gradient scales with the other layers'
      weights), so the weights name the culprit; layers whose norm was 0 are left out.
    * clipping (``metric="clip_fraction"``): the clip scale was below 1 on at least
      ``clip_fraction`` of the window's steps, for ``patience`` consecutive drains, and the
      loss rose meanwhile. Clipping at every step while the loss falls is a threshold
      below the typical norm (a recipe choice, or a scale on the LR): one ``info`` event
      per streak says so.

    One ``warning`` event per episode: it fires when any holds and re-arms only once none
    does. ``layers`` names the layers that moved most against their own history (for
    growth, the ratio of a layer's mean norm now to its mean norm before the growth; for
    size, the layers above ``max_ratio``, input side first), the first mover first.

    Args:
        growth: total growth factor of the median that counts, > 1.
        patience: consecutive drains of growth (or of heavy clipping).
        clip_fraction: share of a window's steps clipped that counts, in (0, 1].
        run_steps: consecutive rising steps that count as fast growth, >= 2.
        run_growth: total growth over such a run that counts, > 1.
        max_ratio: the median gradient-to-weight norm ratio above which gradients are
            too large for the weights, > 0.
        weight_growth: growth of one layer's parameter norm within one drain that counts
            when the loss rises, > 1.
        loss_rise: how much the loss must rise for growth to count, as a share of the
            progress made before it (of the loss itself when there was none), >= 0.

    References:
        Pascanu, Mikolov & Bengio 2013, "On the difficulty of training recurrent neural
        networks" (ICML): the exploding gradient problem and norm clipping; You, Gitman &
        Ginsburg 2017, "Large batch training of convolutional networks" (LARS): the
        gradient-to-weight norm ratio per layer.
    """

    name = "exploding"

    def __init__(
        self,
        growth: float = 10.0,
        patience: int = 3,
        clip_fraction: float = 0.9,
        run_steps: int = 8,
        run_growth: float = 100.0,
        max_ratio: float = 100.0,
        weight_growth: float = 10.0,
        loss_rise: float = 0.25,
    ) -> None:
        self.growth = _float_in("growth", growth, 1.0, math.inf)
        self.patience = _int_at_least("patience", patience, 1)
        self.clip_fraction = _float_in("clip_fraction", clip_fraction, 0.0, 1.0, high_closed=True)
        self.run_steps = _int_at_least("run_steps", run_steps, 2)
        self.run_growth = _float_in("run_growth", run_growth, 1.0, math.inf)
        self.max_ratio = _float_in("max_ratio", max_ratio, 0.0, math.inf)
        self.weight_growth = _float_in("weight_growth", weight_growth, 1.0, math.inf)
        self.loss_rise = _float_in("loss_rise", loss_rise, 0.0, math.inf, low_closed=True)
        self._run: _RisingRun | None = None
        # (first step, median norm, mean loss, per-layer mean norms) of recent drains
        self._drains: deque[tuple[int, float, float, list[float]]] = deque(maxlen=self.patience + 1)
        self._clip_streak = 0
        self._clip_onset = 0
        self._clip_onset_loss = math.nan  # the mean loss of the streak's first drain
        self._clip_noted = False  # the streak's info event was given
        self._active = False
        self._start_loss: float | None = None  # the first drain's mean loss
        # (last step, per-layer parameter norms, mean loss) of recent drains
        self._weights: deque[tuple[int, list[float], float]] = deque(maxlen=WEIGHT_SPAN + 1)

    def __repr__(self) -> str:
        return (
            f"Exploding(growth={self.growth}, patience={self.patience}, "
            f"clip_fraction={self.clip_fraction}, run_steps={self.run_steps}, "
            f"run_growth={self.run_growth}, max_ratio={self.max_ratio}, "
            f"weight_growth={self.weight_growth}, loss_rise={self.loss_rise})"
        )

    def observe(self, window: Window) -> list[Event]:
        """Update the drains, the rising run and the clipping streak; return a new episode."""
        usable = _usable(window) & np.isfinite(window.grad_norm)
        if not usable.any():
            return []
        first = int(window.steps[0])
        means = _layer_means(window)
        if self._start_loss is None and not math.isnan(_mean_loss(window)):
            self._start_loss = _mean_loss(window)
        self._drains.append(
            (
                first,
                float(np.median(window.grad_norm[usable])),
                _mean_loss(window),
                [] if means is None else [float(v) for v in means],
            )
        )
        fraction = float(np.mean(window.scale[usable] < 1.0))
        self._follow_clipping(window, fraction)
        run_event = self._run_event(window, usable)  # always: it follows the steps
        event = (
            self._size_event(window)
            or self._weight_event(window)
            or self._growth_event(window)
            or run_event
        )
        note: list[Event] = []
        if event is None and self._clip_streak >= self.patience:
            clipping = self._clip_event(window, fraction)
            if clipping.needs_attention:
                event = clipping
            elif not self._clip_noted:  # a note, once per streak; no episode opened
                self._clip_noted = True
                note = [clipping]
        if event is None:
            self._active = False
            return note
        fire, self._active = not self._active, True
        return [event] if fire else []

    def _follow_clipping(self, window: Window, fraction: float) -> None:
        if fraction >= self.clip_fraction:
            if self._clip_streak == 0:
                self._clip_onset = int(window.steps[0])
                self._clip_onset_loss = _mean_loss(window)
            self._clip_streak += 1
        else:
            self._clip_streak, self._clip_noted = 0, False

    def _size_event(self, window: Window) -> Event | None:
        weights = window.weight_norm
        medians = _layer_medians(window)  # one spiked step is Spike's, not a size
        if medians is None or weights is None or len(weights) != len(medians):
            return None
        if window.weight_norm_before is not None and len(window.weight_norm_before) == len(weights):
            weights = window.weight_norm_before  # the weights these gradients started from
        present = weights > 0
        if not present.any():
            return None
        ratios = medians[present] / weights[present]
        median = float(np.median(ratios))
        if not median > self.max_ratio:
            return None
        names = np.asarray(window.layer_names)[present]
        over = tuple(str(n) for n, r in zip(names, ratios, strict=True) if r > self.max_ratio)
        return Event(
            step=_first_usable_step(window),
            kind="exploding",
            metric="grad_to_weight",
            value=median,
            threshold=self.max_ratio,
            layers=over,
            message=(
                f"Exploding gradients: the median layer's gradient norm is {median:.3g} times "
                f"its weight norm (limit {self.max_ratio:g}; healthy networks sit near "
                f"1e-4 to 1), in {len(over)} of {len(ratios)} layers, first {_names(over)}: "
                f"any SGD step above LR {1 / median:.2g} replaces the weights."
            ),
            extra={"detected_at": int(window.steps[-1])},
        )

    def _weight_event(self, window: Window) -> Event | None:
        """A layer whose weights grew ``weight_growth``-fold while the loss rose.

        The growth is measured since the drain at least ``WEIGHT_SPAN`` steps back (since
        the guard was built, for the first drains).
        """
        now = window.weight_norm
        if now is None:
            return None
        if not self._weights and window.weight_norm_before is not None:
            initial = [float(v) for v in window.weight_norm_before]
            self._weights.append((int(window.steps[0]) - 1, initial, _first_loss(window)))
        last = int(window.steps[-1])
        base = next(
            (entry for entry in reversed(self._weights) if entry[0] <= last - WEIGHT_SPAN),
            self._weights[0] if self._weights else None,
        )
        self._weights.append((last, [float(v) for v in now], _mean_loss(window)))
        if base is None or len(base[1]) != len(now):
            return None
        before = np.asarray(base[1])
        with np.errstate(divide="ignore", invalid="ignore"):
            growth = np.where(before > 0, now / before, 1.0)  # zero-initialized: no ratio
        grown = np.flatnonzero(growth >= self.weight_growth)
        if not grown.size or not self._loss_rose(window, base[2]):
            return None
        order = grown[np.argsort(-growth[grown], kind="stable")]
        names = tuple(window.layer_names[j] for j in order)
        top = float(growth[order[0]])
        return Event(
            step=_first_usable_step(window),
            kind="exploding",
            metric="weight_growth",
            value=top,
            threshold=self.weight_growth,
            layers=names,
            message=(
                f"Exploding weights in {_names(names)}: the parameter norm of {names[0]} grew "
                f"{top:.3g}x since step {max(base[0], 0)} ({before[order[0]]:.3g} -> "
                f"{now[order[0]]:.3g}) while the loss rose: its updates are far too "
                "large for it."
            ),
            extra={"detected_at": int(window.steps[-1])},
        )

    def _loss_rose(self, window: Window, before: float) -> bool:
        """Whether the window's mean loss rose from ``before`` (see :meth:`_rose`).

        ``before`` NaN (no earlier drain) compares with the window's first loss.
        """
        return self._rose(_first_loss(window) if math.isnan(before) else before, _mean_loss(window))

    def _run_event(self, window: Window, usable: BoolArray) -> Event | None:
        """Follow the run of rising norms step by step; an event if it blew up here."""
        hit: _RisingRun | None = None
        for i in np.flatnonzero(usable):
            step, value = int(window.steps[i]), float(window.grad_norm[i])
            loss = float(window.loss[i]) if window.loss_given[i] else math.nan
            run = self._run
            if run is not None and value > run.last_norm:
                base = step if value < 2.0 * run.first_norm else run.base_step
                run = run._replace(length=run.length + 1, last_norm=value, base_step=base)
            else:
                run = _RisingRun(step, value, loss, 1, value, step)
            self._run = run
            grew = run.first_norm > 0 and value >= self.run_growth * run.first_norm
            if run.length >= self.run_steps and grew and self._rose(run.first_loss, loss):
                hit = run
        if hit is None:
            return None
        return Event(
            step=hit.base_step,
            kind="exploding",
            metric="grad_norm",
            value=hit.last_norm,
            threshold=self.run_growth * hit.first_norm,
            layers=self._movers(window.layer_names),
            message=(
                f"Exploding gradients: the gradient norm rose at each of {hit.length} steps "
                f"in a row, {hit.last_norm / hit.first_norm:.3g}x in all "
                f"({hit.first_norm:.3g} -> {hit.last_norm:.3g}), while the loss rose."
            ),
            extra={"run_steps": hit.length, "detected_at": int(window.steps[-1])},
        )

    def _rose(self, before: float, now: float) -> bool:
        """Whether the loss rose from ``before`` to ``now`` by ``loss_rise`` of the progress.

        The progress is the start loss minus ``before`` (``before`` itself when there was
        none); without both losses, True: nothing says the growth is learning.
        """
        if math.isnan(before) or math.isnan(now):
            return True
        start = before if self._start_loss is None else self._start_loss
        return now - before >= self.loss_rise * max(start - before, abs(before))

    def _growth_event(self, window: Window) -> Event | None:
        if len(self._drains) <= self.patience:
            return None
        medians = [median for _, median, _, _ in self._drains]
        base, now = medians[0], medians[-1]
        rising = all(a < b for a, b in pairwise(medians))
        if not (rising and base > 0 and now >= self.growth * base):
            return None
        if not self._loss_rose(window, self._drains[0][2]):
            return None
        return Event(
            step=self._drains[1][0],
            kind="exploding",
            metric="grad_norm",
            value=now,
            threshold=self.growth * base,
            layers=self._movers(window.layer_names),
            message=(
                f"Exploding gradients: the median gradient norm grew at each of the last "
                f"{self.patience} log interval(s), {now / base:.3g}x in all ({base:.3g} -> "
                f"{now:.3g}), while the loss rose."
            ),
            extra={"medians": medians, "detected_at": int(window.steps[-1])},
        )

    def _movers(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """Layers whose mean norm grew most from the oldest kept drain to this one."""
        before, now = self._drains[0][3], self._drains[-1][3]
        if not before or len(before) != len(now) or len(now) != len(names):
            return ()
        growth = np.array(
            [
                n / b if b > 0 else (math.inf if n > 0 else 1.0)
                for b, n in zip(before, now, strict=True)
            ]
        )
        top = float(growth.max())
        if not top > 1.0:
            return ()
        order = np.argsort(-growth, kind="stable")
        cut = math.sqrt(top)  # within the top half of the growth, in log scale
        return tuple(names[j] for j in order if growth[j] >= cut and growth[j] > 1.0)

    def _clip_event(self, window: Window, fraction: float) -> Event:
        if self._loss_rose(window, self._clip_onset_loss):
            return Event(
                step=self._clip_onset,
                kind="exploding",
                metric="clip_fraction",
                value=fraction,
                threshold=self.clip_fraction,
                message=(
                    f"Exploding gradients: clipping was active on {fraction:.0%} of steps for "
                    f"{self.patience} log interval(s) while the loss rose: the gradients keep "
                    f"exceeding the clip threshold."
                ),
                extra={"detected_at": int(window.steps[-1])},
            )
        return Event(
            step=self._clip_onset,
            kind="exploding",
            metric="clip_fraction",
            value=fraction,
            threshold=self.clip_fraction,
            severity="info",
            message=(
                f"Clipping was active on {fraction:.0%} of steps for {self.patience} log "
                "interval(s) while the loss kept falling: the clip threshold is below the "
                "typical gradient norm, so it scales every step like a lower learning rate. "
                "Fine if intended; raise the threshold to clip only outliers."
            ),
            extra={"detected_at": int(window.steps[-1])},
        )

    def state_dict(self) -> dict[str, Any]:
        """Return the recent drains, the clipping streak, the rising run and the episode."""
        return {
            "drains": [[s, m, loss, list(layers)] for s, m, loss, layers in self._drains],
            "clip_streak": self._clip_streak,
            "clip_onset": self._clip_onset,
            "clip_onset_loss": None if math.isnan(self._clip_onset_loss) else self._clip_onset_loss,
            "clip_noted": self._clip_noted,
            "active": self._active,
            "run": None if self._run is None else list(self._run),
            "start_loss": self._start_loss,
            "weights": [
                [step, norms, None if math.isnan(loss) else loss]
                for step, norms, loss in self._weights
            ],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict`."""
        _check_keys(
            self,
            state,
            {
                "drains",
                "clip_streak",
                "clip_onset",
                "clip_onset_loss",
                "clip_noted",
                "active",
                "run",
                "start_loss",
                "weights",
            },
        )
        self._weights = deque(
            (
                (int(step), [float(v) for v in norms], math.nan if loss is None else float(loss))
                for step, norms, loss in state["weights"]
            ),
            maxlen=WEIGHT_SPAN + 1,
        )
        start = state["start_loss"]
        self._start_loss = None if start is None else float(start)
        self._drains = deque(
            (
                (int(s), float(m), float(loss), [float(v) for v in layers])
                for s, m, loss, layers in state["drains"]
            ),
            maxlen=self.patience + 1,
        )
        self._clip_streak = int(state["clip_streak"])
        self._clip_onset = int(state["clip_onset"])
        onset_loss = state["clip_onset_loss"]
        self._clip_onset_loss = math.nan if onset_loss is None else float(onset_loss)
        self._clip_noted = bool(state["clip_noted"])
        self._active = bool(state["active"])
        run = state["run"]
        self._run = (
            None
            if run is None
            else _RisingRun(
                int(run[0]), float(run[1]), float(run[2]), int(run[3]), float(run[4]), int(run[5])
            )
        )


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

    def __repr__(self) -> str:
        return (
            f"Divergence(tolerance={self.tolerance}, patience={self.patience}, "
            f"min_delta={self.min_delta}, start_fraction={self.start_fraction})"
        )

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
