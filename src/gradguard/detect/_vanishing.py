"""Vanishing: the leading layers' gradients far below the rest's, drain after drain."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from gradguard._repr import arguments_repr
from gradguard.detect._common import (
    _check_keys,
    _float_in,
    _int_at_least,
    _layer_means,
    _mean_loss,
    _names,
)
from gradguard.errors import ConfigError
from gradguard.records import Event, FloatArray, Window

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

    __repr__ = arguments_repr

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
