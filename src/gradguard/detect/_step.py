"""Per-step detectors: non-finite gradients (NonFinite) and overflowing fp32 norms (Overflow)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from gradguard._repr import arguments_repr
from gradguard.detect._common import _check_keys, _int_at_least, _tensors_where, _zeroed
from gradguard.records import Event, Severity, Window

#: Largest finite fp32 value: a norm above it overflowed the fp32 accumulation.
FP32_MAX = float(np.finfo(np.float32).max)


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

    __repr__ = arguments_repr

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

    __repr__ = arguments_repr

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
