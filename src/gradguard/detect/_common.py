"""The detectors' shared pieces: argument checks, state-key checks and window helpers."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gradguard.errors import ConfigError, check_state_keys
from gradguard.records import BoolArray, FloatArray, Window

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
    check_state_keys(owner, set(state), keys, "detector")


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


# --- window statistics -----------------------------------------------------------------


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
