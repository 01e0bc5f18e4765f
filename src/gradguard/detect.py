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
from itertools import pairwise
from typing import Any, Protocol, runtime_checkable

import numpy as np

from gradguard.errors import ConfigError
from gradguard.records import BoolArray, Event, FloatArray, Window

#: Largest finite fp32 value: a norm above it overflowed the fp32 accumulation.
FP32_MAX = float(np.finfo(np.float32).max)

SPIKE_METRICS = ("loss", "grad_norm")

#: Relative margin of the spike test against rounding: a window of equal values has a
#: std of 0 and a mean that summation can put an ulp below them (or a std that underflows
#: for values near 1e-200); without it the next equal value would read as a spike.
SPIKE_ROUNDING = 1e-12


@runtime_checkable
class Detector(Protocol):
    """What the guard needs from a detector: a name, ``observe`` and its state."""

    name: str

    def observe(self, window: Window) -> list[Event]:
        """Read one drained window; return the events it shows, in step order."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Return the detector's mutable state as plain JSON-able values."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore state produced by :meth:`state_dict`."""
        ...


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

_NONFINITE_CAUSES = (
    "Likely causes: a too-high learning rate or exploding gradients (clip the gradient "
    "norm, lower the LR), a log of zero or a division by zero (add an epsilon), fp16 "
    "overflow (use loss scaling or bf16)."
)


class NonFinite:
    """One ``nonfinite`` event per step whose gradients hold a NaN or an Inf.

    Rule: ``finite`` is False for the step (and it is not flagged ``overflow``: an
    overflowed norm of finite gradients is :class:`Overflow`'s, never a false
    non-finite). The event's ``value`` is the global gradient norm (NaN or inf) and
    ``layers`` names the tensors whose own norm is not finite, so the first bad tensor
    in depth order points at where the NaN was born. There is nothing to tune; the
    detector has no state.
    """

    name = "nonfinite"

    def __repr__(self) -> str:
        return "NonFinite()"

    def observe(self, window: Window) -> list[Event]:
        """Return one event per non-finite step of ``window``."""
        events = []
        for i in np.flatnonzero(~window.finite & ~window.overflow):
            row = int(i)
            tensors = _tensors_where(window, row, ~np.isfinite(window.per_tensor[row]))
            skipped = bool(window.skipped[row])
            where = f" in {len(tensors)} tensor(s), first {tensors[0]}" if tensors else ""
            loss_bad = bool(window.loss_given[row]) and not math.isfinite(window.loss[row])
            origin = (
                " The loss itself is NaN/Inf: the forward pass produced it." if loss_bad else ""
            )
            events.append(
                Event(
                    step=int(window.steps[row]),
                    kind="nonfinite",
                    metric="grad_norm",
                    value=float(window.grad_norm[row]),
                    threshold=math.nan,
                    layers=tensors,
                    message=(
                        f"NaN/Inf gradients{where}; step "
                        f"{'skipped' if skipped else 'not skipped'}.{origin} {_NONFINITE_CAUSES}"
                    ),
                    extra={"skipped": skipped, "loss_finite": not loss_bad},
                )
            )
        return events

    def state_dict(self) -> dict[str, Any]:
        """Return the detector's state: none."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore state; only an empty mapping fits."""
        _check_keys(self, state, set())


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
    """Loss and gradient-norm spikes: a one-sided z-test against a rolling window.

    Rule, per metric and per step: with at least ``min_samples`` earlier values in the
    rolling window of the last ``window`` values, ``v`` is a spike when
    ``v - mean > sigma * std`` (population std of the window, plus a 1e-12 relative margin
    against rounding); the event's threshold is ``mean + sigma * std``. Only finite values
    of non-skipped steps are tested or enter the window (the loss only where given), so a
    NaN step neither fires nor poisons the statistics.

    A spike enters the window winsorized, clipped to the threshold it crossed. OLMo-core
    adds every value as it is, so one huge spike inflates the std and hides the rest of
    a burst (with N(0, 1) history, 3 of 10 spikes at 10 sigma are caught); leaving spikes
    out catches a whole burst but freezes the window forever after a genuine level
    shift, which then fires at every step. Clipping to the threshold catches every spike
    of a 5-step burst at 10 sigma and of a 10-step burst at 20 sigma, and after a
    permanent shift the window catches up within tens of steps (the same rule as
    :class:`~gradguard.clip.ZClip`, which updates its EMA with the clipped value).

    Defaults are OLMo-core's skip-step rule (``SkipStepOptimizer``): 128 steps, 6 sigma,
    at least half the window before testing. Lower ``sigma`` (4-5) to catch smaller
    spikes in a smooth run; raise it, or ``min_samples``, if noisy small-batch runs flag
    ordinary steps. A window whose values are all equal flags any increase at all.

    Args:
        window: how many recent values the mean and std are taken over.
        sigma: how many standard deviations above the mean make a spike.
        min_samples: values needed in the window before any test, in [2, window].
        metrics: which of ``"loss"`` and ``"grad_norm"`` to watch.

    References:
        OLMo-core, ``olmo_core.optim.skip_step_optimizer.SkipStepOptimizer``.
    """

    name = "spike"

    def __init__(
        self,
        window: int = 128,
        sigma: float = 6.0,
        min_samples: int = 64,
        metrics: Sequence[str] = SPIKE_METRICS,
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
        self._history: dict[str, deque[float]] = {
            metric: deque(maxlen=self.window) for metric in self.metrics
        }

    def __repr__(self) -> str:
        return (
            f"Spike(window={self.window}, sigma={self.sigma}, "
            f"min_samples={self.min_samples}, metrics={self.metrics!r})"
        )

    def observe(self, window: Window) -> list[Event]:
        """Test each usable value of ``window`` in step order; return the spikes."""
        events: list[Event] = []
        for metric in self.metrics:
            values = window.loss if metric == "loss" else window.grad_norm
            ok = _usable(window) & np.isfinite(values)
            if metric == "loss":
                ok &= window.loss_given
            for i in np.flatnonzero(ok):
                event = self._test(metric, int(window.steps[i]), float(values[i]))
                if event is not None:
                    events.append(event)
        events.sort(key=lambda event: event.step)  # stable: loss before grad_norm
        return events

    def _test(self, metric: str, step: int, value: float) -> Event | None:
        """Test one value against the window, then add it (winsorized) to the window."""
        history = self._history[metric]
        event = None
        if len(history) >= self.min_samples:
            past = np.fromiter(history, dtype=np.float64, count=len(history))
            mean, std = float(past.mean()), float(past.std())
            threshold = mean + self.sigma * std
            if value - mean > self.sigma * std + SPIKE_ROUNDING * abs(mean):
                event = self._event(metric, step, value, threshold, mean, std)
                value = min(value, threshold)
        history.append(value)
        return event

    def _event(
        self, metric: str, step: int, value: float, threshold: float, mean: float, std: float
    ) -> Event:
        what = "Loss" if metric == "loss" else "Gradient-norm"
        fix = (
            "Check the batch for bad data, lower the learning rate or clip gradients."
            if metric == "loss"
            else "Clip the gradient norm (NormClip, ZClip), lower the learning rate, "
            "check the batch."
        )
        return Event(
            step=step,
            kind="spike",
            metric=metric,
            value=value,
            threshold=threshold,
            message=(
                f"{what} spike: {value:.4g} is above mean + {self.sigma:g} std = "
                f"{threshold:.4g} of the last {len(self._history[metric])} steps. {fix}"
            ),
            extra={"mean": mean, "std": std},
        )

    def state_dict(self) -> dict[str, Any]:
        """Return the rolling window of each metric (at most ``window`` floats each)."""
        return {metric: list(history) for metric, history in self._history.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the rolling windows saved by :meth:`state_dict`."""
        _check_keys(self, state, set(self.metrics))
        self._history = {
            metric: deque((float(v) for v in state[metric]), maxlen=self.window)
            for metric in self.metrics
        }


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

_VANISHING_FIX = (
    "Early layers learn slowly or not at all. Use ReLU-family activations instead of "
    "sigmoid/tanh, He/Xavier initialization, BatchNorm/LayerNorm and residual "
    "connections (LSTM/GRU for recurrent nets)."
)


class Vanishing:
    """Layers whose gradient stays tiny next to the network's largest, drain after drain.

    Rule, per drain: each layer's gradient norm is averaged over the window's usable
    steps and divided by the largest layer average of that window; a layer whose ratio
    stays below ``threshold`` for ``patience`` consecutive drains is vanishing. One event
    per layer episode: it fires when the layer first qualifies (layers qualifying at the
    same drain share one event, named in depth order) and re-arms when its ratio climbs
    back. ``value`` is the smallest ratio among them. A layer whose norm is exactly 0 is
    a separate case, dead units (a dead ReLU layer) or parameters the loss never uses;
    the message says so, and ``ignore_zero=True`` leaves such layers out.

    Defaults: a layer 1,000 times weaker than the strongest is, in practice, not being
    trained (measured at initialization, width 32: a 10-layer sigmoid MLP with PyTorch's
    default init gives its first layer a ratio of 3e-9, the same MLP with ReLU and He init
    0.3); three drains rule out a noisy window. Lower ``threshold`` for networks with
    deliberately small modules (a lone LayerNorm, a scalar gate) that trip it while
    healthy; pass ``ignore_zero=True`` when some parameters are unused on purpose.

    Args:
        threshold: ratio to the largest layer norm below which a layer counts, in (0, 1).
        patience: consecutive drains the ratio must stay below ``threshold``.
        ignore_zero: leave layers with exactly zero gradient out.

    References:
        Pascanu, Mikolov & Bengio 2013, "On the difficulty of training recurrent neural
        networks" (ICML); Glorot & Bengio 2010, "Understanding the difficulty of training
        deep feedforward neural networks" (AISTATS).
    """

    name = "vanishing"

    def __init__(
        self, threshold: float = 1e-3, patience: int = 3, ignore_zero: bool = False
    ) -> None:
        self.threshold = _float_in("threshold", threshold, 0.0, 1.0)
        self.patience = _int_at_least("patience", patience, 1)
        if not isinstance(ignore_zero, bool):
            raise ConfigError(f"ignore_zero must be True or False, got {ignore_zero!r}.")
        self.ignore_zero = ignore_zero
        self._streak: dict[str, int] = {}  # layer -> consecutive drains below threshold
        self._onset: dict[str, int] = {}  # layer -> first step of its current streak
        self._active: list[str] = []  # layers already reported in their current episode

    def __repr__(self) -> str:
        return (
            f"Vanishing(threshold={self.threshold}, patience={self.patience}, "
            f"ignore_zero={self.ignore_zero})"
        )

    def observe(self, window: Window) -> list[Event]:
        """Update each layer's streak with this window; return an event for new episodes."""
        norms = _layer_means(window)
        if norms is None:
            return []
        top = float(norms.max())
        ratios = norms / top if top > 0 else np.zeros_like(norms)
        below = ratios < self.threshold
        if self.ignore_zero:
            below &= norms != 0
        first = int(window.steps[0])
        newly: list[int] = []
        streak: dict[str, int] = {}
        onset: dict[str, int] = {}
        for j, name in enumerate(window.layer_names):
            if not below[j]:
                continue
            streak[name] = self._streak.get(name, 0) + 1
            onset[name] = self._onset.get(name, first)
            if streak[name] >= self.patience and name not in self._active:
                newly.append(j)
        self._streak, self._onset = streak, onset
        self._active = [n for n in window.layer_names if n in streak and n in self._active]
        self._active += [window.layer_names[j] for j in newly]
        if not newly:
            return []
        return [self._event(window, newly, ratios, norms)]

    def _event(
        self, window: Window, newly: list[int], ratios: FloatArray, norms: FloatArray
    ) -> Event:
        names = tuple(window.layer_names[j] for j in newly)
        zero = [window.layer_names[j] for j in newly if norms[j] == 0]
        small = [window.layer_names[j] for j in newly if norms[j] != 0]
        smallest = float(min(ratios[j] for j in newly))
        parts = []
        if small:
            parts.append(
                f"Vanishing gradients in {_names(small)}: gradient norm below "
                f"{self.threshold:g} of the largest layer's for {self.patience} log "
                f"interval(s) (smallest ratio {smallest:.2g}). {_VANISHING_FIX}"
            )
        if zero:
            parts.append(
                f"Exactly zero gradient in {_names(zero)}: dead units (e.g. dead ReLUs; "
                "try LeakyReLU or a lower learning rate) or parameters the loss does not "
                "use (freeze or remove them, or pass ignore_zero=True)."
            )
        return Event(
            step=min(self._onset[name] for name in names),
            kind="vanishing",
            metric="grad_norm_ratio",
            value=smallest,
            threshold=self.threshold,
            layers=names,
            message=" ".join(parts),
            extra={
                "ratios": {window.layer_names[j]: float(ratios[j]) for j in newly},
                "zero": zero,
                "detected_at": int(window.steps[-1]),
            },
        )

    def state_dict(self) -> dict[str, Any]:
        """Return each below-threshold layer's streak and onset, and the reported layers."""
        return {
            "streak": dict(self._streak),
            "onset": dict(self._onset),
            "active": list(self._active),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the streaks saved by :meth:`state_dict`."""
        _check_keys(self, state, {"streak", "onset", "active"})
        self._streak = {str(k): int(v) for k, v in state["streak"].items()}
        self._onset = {str(k): int(v) for k, v in state["onset"].items()}
        self._active = [str(name) for name in state["active"]]


def _layer_means(window: Window) -> FloatArray | None:
    """Mean per-layer norm over the usable steps whose layer norms are all finite."""
    per_layer = window.per_layer
    if len(window) == 0 or per_layer.ndim != 2 or per_layer.shape[1] == 0:
        return None
    if per_layer.shape[1] != len(window.layer_names):
        return None  # the guard did not record per-layer norms for this window
    rows = _usable(window) & np.isfinite(per_layer).all(axis=1)
    if not rows.any():
        return None
    means: FloatArray = per_layer[rows].mean(axis=0)
    return means


_EXPLODING_FIX = (
    "Clip the gradient norm, lower the learning rate or add LR warm-up / a decay "
    "schedule, use He/Xavier initialization and normalization layers; for RNNs use "
    "LSTM/GRU."
)


class Exploding:
    """Sustained growth of the global gradient norm, or clipping that never lets go.

    Rule, per drain, over the usable steps (finite, not skipped), either of:

    * growth (``metric="grad_norm"``): the window median of the global norm grew at each
      of the last ``patience`` drains, and by a factor of at least ``growth`` over the
      smallest median of those drains (the one just before the growth began);
    * fast growth (``metric="grad_norm"``): the norm rose at each of ``run_steps``
      consecutive usable steps or more, by a factor of at least ``run_growth`` in all (a
      blow-up within one log interval, as in an RNN whose recurrent weights have a
      spectral radius above 1);
    * clipping (``metric="clip_fraction"``): the clip scale was below 1 on at least
      ``clip_fraction`` of the window's steps, for ``patience`` consecutive drains.

    One event per episode: it fires when either holds and re-arms only once neither
    does (growth takes precedence when both start together). ``value`` is the current
    median (or clipped fraction), ``threshold`` is ``growth`` times the smallest median
    (or ``clip_fraction``).

    Defaults: a tenfold rise of the median over three drains is far outside the drift of
    a healthy run (a window median ignores single spikes, which :class:`Spike` reports),
    and clipping on 90% of steps for three drains means the gradients are persistently
    larger than the threshold, not merely noisy. Lower ``growth`` to hear of slower
    blow-ups; raise ``clip_fraction`` to 1.0, or pass a larger clip threshold, for runs
    that clip on purpose at every step (some LLM recipes do).

    Args:
        growth: total growth factor of the median that counts, > 1.
        patience: consecutive drains of growth (or of heavy clipping).
        clip_fraction: share of a window's steps clipped that counts, in (0, 1].
        run_steps: consecutive rising steps that count as fast growth, >= 2.
        run_growth: total growth over such a run that counts, > 1. A healthy run's norm
            can swing 20-30x over a few steps (seen with momentum SGD on digits); eight
            rises in a row and a hundredfold are well outside that.

    References:
        Pascanu, Mikolov & Bengio 2013, "On the difficulty of training recurrent neural
        networks" (ICML): the exploding gradient problem and norm clipping.
    """

    name = "exploding"

    def __init__(
        self,
        growth: float = 10.0,
        patience: int = 3,
        clip_fraction: float = 0.9,
        run_steps: int = 8,
        run_growth: float = 100.0,
    ) -> None:
        self.growth = _float_in("growth", growth, 1.0, math.inf)
        self.patience = _int_at_least("patience", patience, 1)
        self.clip_fraction = _float_in("clip_fraction", clip_fraction, 0.0, 1.0, high_closed=True)
        self.run_steps = _int_at_least("run_steps", run_steps, 2)
        self.run_growth = _float_in("run_growth", run_growth, 1.0, math.inf)
        # the current run of rising norms: [first step, first norm, length, last norm]
        self._run: list[float] = []
        # (first step, median) of the last patience + 1 drains with usable steps
        self._medians: deque[tuple[int, float]] = deque(maxlen=self.patience + 1)
        self._clip_streak = 0
        self._clip_onset = 0
        self._active = False

    def __repr__(self) -> str:
        return (
            f"Exploding(growth={self.growth}, patience={self.patience}, "
            f"clip_fraction={self.clip_fraction}, run_steps={self.run_steps}, "
            f"run_growth={self.run_growth})"
        )

    def observe(self, window: Window) -> list[Event]:
        """Update the medians and the clipping streak; return an event for a new episode."""
        usable = _usable(window) & np.isfinite(window.grad_norm)
        if not usable.any():
            return []
        first = int(window.steps[0])
        self._medians.append((first, float(np.median(window.grad_norm[usable]))))
        fraction = float(np.mean(window.scale[usable] < 1.0))
        if fraction >= self.clip_fraction:
            self._clip_onset = first if self._clip_streak == 0 else self._clip_onset
            self._clip_streak += 1
        else:
            self._clip_streak = 0
        event = self._run_event(window, usable)
        event = self._growth_event(window) or event
        if event is None and self._clip_streak >= self.patience:
            event = self._clip_event(window, fraction)
        if event is None:
            self._active = False
            return []
        fire, self._active = not self._active, True
        return [event] if fire else []

    def _run_event(self, window: Window, usable: BoolArray) -> Event | None:
        """Follow the run of rising norms step by step; an event if it blew up here."""
        hit: tuple[int, float, int, float] | None = None
        for step, norm in zip(window.steps[usable], window.grad_norm[usable], strict=True):
            value = float(norm)
            if self._run and value > self._run[3]:
                self._run[2] += 1
                self._run[3] = value
            else:
                self._run = [float(step), value, 1.0, value]
            first_step, first, length, _ = self._run
            if length >= self.run_steps and first > 0 and value >= self.run_growth * first:
                hit = (int(first_step), first, int(length), value)
        if hit is None:
            return None
        first_step, first, length, value = hit
        return Event(
            step=first_step,
            kind="exploding",
            metric="grad_norm",
            value=value,
            threshold=self.run_growth * first,
            message=(
                f"Exploding gradients: the gradient norm rose at each of {length} steps in a "
                f"row, {value / first:.3g}x in all ({first:.3g} -> {value:.3g}). "
                f"{_EXPLODING_FIX}"
            ),
            extra={"run_steps": length, "detected_at": int(window.steps[-1])},
        )

    def _growth_event(self, window: Window) -> Event | None:
        if len(self._medians) <= self.patience:
            return None
        medians = [median for _, median in self._medians]
        base, now = medians[0], medians[-1]
        rising = all(a < b for a, b in pairwise(medians))
        if not (rising and base > 0 and now >= self.growth * base):
            return None
        return Event(
            step=self._medians[1][0],
            kind="exploding",
            metric="grad_norm",
            value=now,
            threshold=self.growth * base,
            message=(
                f"Exploding gradients: the median gradient norm grew at each of the last "
                f"{self.patience} log interval(s), {now / base:.3g}x in all ({base:.3g} -> "
                f"{now:.3g}). {_EXPLODING_FIX}"
            ),
            extra={"medians": medians, "detected_at": int(window.steps[-1])},
        )

    def _clip_event(self, window: Window, fraction: float) -> Event:
        return Event(
            step=self._clip_onset,
            kind="exploding",
            metric="clip_fraction",
            value=fraction,
            threshold=self.clip_fraction,
            message=(
                f"Exploding gradients: clipping was active on {fraction:.0%} of steps for "
                f"{self.patience} log interval(s): the gradients keep exceeding the clip "
                f"threshold. {_EXPLODING_FIX}"
            ),
            extra={"detected_at": int(window.steps[-1])},
        )

    def state_dict(self) -> dict[str, Any]:
        """Return the recent medians, the clipping streak and whether an episode is open."""
        return {
            "medians": [[step, median] for step, median in self._medians],
            "clip_streak": self._clip_streak,
            "clip_onset": self._clip_onset,
            "active": self._active,
            "run": list(self._run),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict`."""
        _check_keys(self, state, {"medians", "clip_streak", "clip_onset", "active", "run"})
        self._medians = deque(
            ((int(step), float(median)) for step, median in state["medians"]),
            maxlen=self.patience + 1,
        )
        self._clip_streak = int(state["clip_streak"])
        self._clip_onset = int(state["clip_onset"])
        self._active = bool(state["active"])
        self._run = [float(v) for v in state["run"]]


class Divergence:
    """Early stopping when the loss has run away from its best for good.

    Rule, per drain: the window's mean loss over given, finite, non-skipped steps is
    compared with the best (lowest) window mean seen so far; the drain is bad when the
    mean exceeds ``best + tolerance * |best| + min_delta + start_fraction * |start|``
    (``start`` is the first window's mean; ``abs`` keeps the margin right for negative
    losses such as log-likelihoods), or when the window has a given loss but none of them
    finite. After ``patience`` consecutive bad drains, one
    ``divergence`` event: the guard then sets ``should_stop``. A good drain re-arms it.
    Windows without any given loss are ignored, and so are windows whose finite losses
    all fell on skipped steps (a loss-scaler warm-up is no evidence of divergence).

    This is Prechelt's generalization-loss criterion GL_alpha with alpha = 100 *
    ``tolerance`` percent, applied to the training loss. Defaults: a loss twice its best,
    for five log intervals, is a run that will not come back on its own; a spike
    (:class:`Spike`) recovers within a drain or two. Lower ``tolerance`` (0.2-0.5) to stop
    sooner; ``tolerance=0`` stops after ``patience`` drains each worse than the best.
    Near a loss of 0 the relative rule reads batch noise as divergence: healthy
    momentum-SGD runs on digits were stopped at window losses of 0.004-0.17 against a
    start of 2.3 (the lab's ``residual`` experiment). ``start_fraction=0.05`` asks the loss
    to climb back by 5 % of where training started as well: on 8 seeds of a 6-layer ReLU
    MLP (SGD, momentum 0.9, LR 0.05) it stopped none of the runs the default stopped 2 of.
    It is not the default because it also delays the stop of runs that diverge slowly
    from a low loss (the lab's ``early-stopping`` range test then stops before NaN on 2 of
    5 seeds instead of 5 of 5). ``min_delta`` is the same margin in absolute terms.

    Args:
        tolerance: relative margin over the best window mean, >= 0.
        patience: consecutive bad drains before the event.
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
        start_fraction: float = 0.0,
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
            self._streak, self._active = 0, False
            return []
        self._onset = int(window.steps[0]) if self._streak == 0 else self._onset
        self._streak += 1
        if self._streak < self.patience or self._active:
            return []
        self._active = True
        return [self._event(window, mean, threshold)]

    def _event(self, window: Window, mean: float, threshold: float) -> Event:
        seen = "has been NaN/Inf" if math.isnan(mean) else f"({mean:.4g}) has stayed above"
        bound = "" if math.isnan(mean) else f" {threshold:.4g}"
        best = "" if self._best is None else f" (best {self._best:.4g})"
        return Event(
            step=self._onset,
            kind="divergence",
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
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict`."""
        keys = {"best", "streak", "onset", "active"}
        _check_keys(self, state, keys | {"start"} if "start" in state else keys)  # 0.1 had none
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
