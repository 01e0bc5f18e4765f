"""Exploding: gradients too large for their weights, or growing while the loss does not fall."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from itertools import pairwise
from typing import Any, NamedTuple

import numpy as np

from gradguard._repr import arguments_repr
from gradguard.detect._common import (
    _check_keys,
    _first_loss,
    _first_usable_step,
    _float_in,
    _int_at_least,
    _layer_means,
    _layer_medians,
    _mean_loss,
    _names,
    _usable,
)
from gradguard.records import BoolArray, Event, Severity, Window

#: Exploding's weight rule compares each layer's parameter norm with the one at least this
#: many steps before (the previous drain, or an older one when drains are closer).
WEIGHT_SPAN = 10


class _RisingRun(NamedTuple):
    """The current run of rising gradient norms; it restarts at any step that does not rise."""

    first_step: int
    first_norm: float
    first_loss: float  # NaN when the step had no loss
    length: int
    last_norm: float
    base_step: int  # the last step still under twice first_norm: the growth starts after it


def _event(
    window: Window,
    *,
    step: int,
    metric: str,
    value: float,
    threshold: float,
    message: str,
    layers: tuple[str, ...] = (),
    severity: Severity = "warning",
    **extra: Any,
) -> Event:
    """An ``exploding`` event found at the end of ``window``: ``extra``, then ``detected_at``."""
    return Event(
        step=step,
        kind="exploding",
        metric=metric,
        value=value,
        threshold=threshold,
        layers=layers,
        severity=severity,
        message=message,
        extra={**extra, "detected_at": int(window.steps[-1])},
    )


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

    __repr__ = arguments_repr

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
        return _event(
            window,
            step=_first_usable_step(window),
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
        return _event(
            window,
            step=_first_usable_step(window),
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
        return _event(
            window,
            step=hit.base_step,
            metric="grad_norm",
            value=hit.last_norm,
            threshold=self.run_growth * hit.first_norm,
            layers=self._movers(window.layer_names),
            message=(
                f"Exploding gradients: the gradient norm rose at each of {hit.length} steps "
                f"in a row, {hit.last_norm / hit.first_norm:.3g}x in all "
                f"({hit.first_norm:.3g} -> {hit.last_norm:.3g}), while the loss rose."
            ),
            run_steps=hit.length,
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
        return _event(
            window,
            step=self._drains[1][0],
            metric="grad_norm",
            value=now,
            threshold=self.growth * base,
            layers=self._movers(window.layer_names),
            message=(
                f"Exploding gradients: the median gradient norm grew at each of the last "
                f"{self.patience} log interval(s), {now / base:.3g}x in all ({base:.3g} -> "
                f"{now:.3g}), while the loss rose."
            ),
            medians=medians,
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
        rose = self._loss_rose(window, self._clip_onset_loss)
        return _event(
            window,
            step=self._clip_onset,
            metric="clip_fraction",
            value=fraction,
            threshold=self.clip_fraction,
            severity="warning" if rose else "info",
            message=(
                f"Exploding gradients: clipping was active on {fraction:.0%} of steps for "
                f"{self.patience} log interval(s) while the loss rose: the gradients keep "
                f"exceeding the clip threshold."
                if rose
                else f"Clipping was active on {fraction:.0%} of steps for {self.patience} log "
                "interval(s) while the loss kept falling: the clip threshold is below the "
                "typical gradient norm, so it scales every step like a lower learning rate. "
                "Fine if intended; raise the threshold to clip only outliers."
            ),
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
