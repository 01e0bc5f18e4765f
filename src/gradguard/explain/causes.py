"""The causes of an event: which rule's evidence holds (learning rate, batch, init, layer).

Each rule needs positive evidence; where none holds, the cause is ``unknown``. A NaN at the
end of a blow-up inherits the blow-up's cause.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

from gradguard.explain.facts import (
    _NOUNS,
    _SAMPLE,
    BATCH_LEVEL,
    HIGH_GAIN,
    HIGH_UPDATE_RATIO,
    HURT,
    INHERIT_STEPS,
    LOW_GAIN,
    LR_JUMP,
    TARGET_UPDATE_RATIO,
    LayerScale,
    RunFacts,
    _finite_or_none,
    _first_last,
    _listed,
    _outliers,
    _Row,
    _sample_row,
    _top_is,
)
from gradguard.records import Event, Window


class _Causes:
    """The cause rules of :class:`~gradguard.explain.Explainer` and the history they read.

    The history is set by ``Explainer.__init__``.
    """

    facts: RunFacts
    _norms: deque[float]
    _losses: deque[float]
    _lrs: deque[tuple[int, float]]
    _batch_medians: deque[float]
    _batch_tops: deque[float]
    _update: np.ndarray[Any, Any] | None
    _update_typical: np.ndarray[Any, Any] | None
    _episode: tuple[int, str, dict[str, Any]] | None
    _episode_here: bool
    _last_out_of_bounds: bool
    _spiked: bool
    _last_loss: float

    # --- causes ----------------------------------------------------------------------

    def _row(self, window: Window, step: int) -> _Row | None:
        hits = np.flatnonzero(window.steps == step)
        if not hits.size:
            return None
        i = int(hits[0])
        return _Row(
            step=step,
            loss=float(window.loss[i]) if window.loss_given[i] else math.nan,
            grad_norm=float(window.grad_norm[i]),
            lr=float(window.lr[i]),
            loss_given=bool(window.loss_given[i]),
            finite=bool(window.finite[i]),
            overflow=bool(window.overflow[i]),
            skipped=bool(window.skipped[i]),
            per_layer=window.per_layer[i],
        )

    def _cause(self, window: Window, event: Event) -> tuple[str, dict[str, Any]]:
        row = self._row(window, event.step)
        inherited = self._inherited(window, event)
        if event.kind in ("nonfinite", "overflow"):
            return self._nonfinite_cause(window, event, row, inherited)
        if event.kind == "vanishing":
            return self._vanishing_cause(window, event)
        found = self._lr_jump(window, event, row)
        if found is not None:
            return found
        if inherited is not None and inherited[0] != "unknown":
            return inherited  # a model still damaged by a blow-up makes batches look bad
        for rule in (self._bad_batch, self._initialization):
            found = rule(window, event, row)
            if found is not None:
                return found
        found = self._hot_layer(window, event, row) or self._high_updates(event)
        return found or inherited or ("unknown", self._plain_evidence(event, row))

    def _updates_for(self, event: Event) -> np.ndarray[Any, Any] | None:
        """Update ratios to judge ``event`` by.

        A one-step spike's own step says nothing of the learning rate, so spikes, and any
        event of a drain that holds one, read the last ratios of a healthy drain, if any.
        """
        if self._update_typical is None:  # no healthy drain yet: the run is off from the start
            return self._update
        return self._update_typical if event.kind == "spike" or self._spiked else self._update

    def _inherited(self, window: Window, event: Event) -> tuple[str, dict[str, Any]] | None:
        """The cause of the blow-up this event ends, when one was seen just before.

        The event must come from the same drain as that blow-up's explanation, or follow a
        step whose gradient was already out of bounds (non-finite, or ten times the healthy
        median), or whose loss had not come back near its recent healthy level: an
        unrelated fault after the run recovered gets its own cause.
        """
        if self._episode is None:
            return None
        last, cause, evidence = self._episode
        if event.step - last > INHERIT_STEPS:
            return None
        step = event.step
        if not (self._episode_here or self._blowing_up(window, step) or self._hurt(window, step)):
            return None
        root = evidence.get("root", evidence.get("summary", ""))
        return cause, {
            "summary": f"It follows the blow-up seen up to step {last}: {root}",
            "follows_step": last,
            "root": root,
        }

    def _blowing_up(self, window: Window, step: int) -> bool:
        """Whether the step before ``step`` had a gradient norm out of bounds."""
        before = window.grad_norm[window.steps == step - 1]
        if not before.size:
            return self._last_out_of_bounds
        return self._out_of_bounds(float(before[0]))

    def _recent_loss(self) -> float:
        """The median of the last 32 healthy losses: the level the run had reached."""
        recent = list(self._losses)[-32:]
        return float(np.median(recent)) if recent else math.nan

    def _hurt(self, window: Window, step: int) -> bool:
        """Whether the loss was still ``HURT`` times its recent healthy level before ``step``.

        For an onset before the window, the window's mean loss is read.
        """
        if not self._losses or not len(window):
            return False
        given = window.loss_given & np.isfinite(window.loss)
        before = given & (window.steps < step)
        if before.any():
            loss = float(window.loss[before][-1])
        elif step > window.steps[0] or not given.any():
            return False
        elif step == window.steps[0]:
            loss = self._last_loss  # the previous drain's last loss
        else:
            loss = float(np.mean(window.loss[given]))  # the level a sustained event judged
        return loss > HURT * self._recent_loss()

    def _out_of_bounds(self, norm: float) -> bool:
        """Non-finite, or ten times the healthy median (always, with no healthy step yet)."""
        if not math.isfinite(norm) or not self._norms:
            return True
        return norm >= 10 * float(np.median(self._norms))

    def _plain_evidence(self, event: Event, row: _Row | None) -> dict[str, Any]:
        evidence: dict[str, Any] = {
            "summary": (
                f"The {event.kind} matches no known pattern: the learning rate was steady, "
                "the batch did not stand out and the weights have a usual scale."
            )
        }
        if row is not None:
            evidence["grad_norm"] = _finite_or_none(row.grad_norm)
        return evidence

    def _nonfinite_cause(
        self,
        window: Window,
        event: Event,
        row: _Row | None,
        inherited: tuple[str, dict[str, Any]] | None,
    ) -> tuple[str, dict[str, Any]]:
        low = self.facts.low_precision
        loss = math.nan if row is None else row.loss
        loss_given = row is not None and row.loss_given
        evidence: dict[str, Any] = {
            "loss": _finite_or_none(loss) if loss_given else None,
            "overflow_flag": bool(row.overflow) if row else None,
            "dtype": low or "float32",
        }
        if inherited is not None:
            return inherited[0], {**evidence, **inherited[1]}
        if event.kind == "overflow":  # finite elements, an fp32 norm out of range
            found = (
                self._initialization(window, event, row)
                or self._lr_jump(window, event, row)
                or self._high_updates(event)
            )
            if found is not None:
                return found
            evidence["summary"] = (
                "The gradient norm overflowed fp32 with finite elements, after no visible "
                "rise: nothing in the history names why."
            )
            return "unknown", evidence
        return self._nonfinite_loss_cause(window, event, loss if loss_given else None, evidence)

    def _nonfinite_loss_cause(
        self, window: Window, event: Event, loss: float | None, evidence: dict[str, Any]
    ) -> tuple[str, dict[str, Any]]:
        """NaN/Inf gradients on healthy history: where the loss says they were born."""
        low = self.facts.low_precision
        loss_given = loss is not None
        loss = math.nan if loss is None else loss
        loss_finite = loss_given and math.isfinite(loss)
        if loss_finite and (low == "float16" or self.facts.scaler):
            evidence["summary"] = (
                f"The loss was finite ({loss:.4g}) but the {low or 'fp16'} gradients were not: "
                f"the backward pass passed the largest {low or 'float16'} value (65504)."
            )
            return "overflow", evidence
        if loss_finite:
            evidence["summary"] = (
                f"The loss was finite ({loss:.4g}) but the gradients were not: the backward "
                "pass made the NaN/Inf (e.g. the gradient of sqrt or log at 0, or 0/0)."
            )
            return "nonfinite_backward", evidence
        if not loss_given:
            evidence["summary"] = "Non-finite gradients, and no loss was given to tell more."
            return "unknown", evidence
        samples = _sample_row(window, event.step)
        bad_examples = None if samples is None else int(samples[_SAMPLE["nonfinite"]])
        size = None if samples is None else int(samples[_SAMPLE["size"]])
        if bad_examples is not None:
            evidence["nonfinite_examples"] = bad_examples
            evidence["batch_size"] = size
        where = (
            f" in {bad_examples} of {size} examples" if bad_examples is not None and size else ""
        )
        if loss == math.inf or (samples is not None and _top_is(samples, math.inf)):
            evidence["summary"] = (
                f"The loss was +inf{where} while the steps before were healthy: a log(0) or "
                "a division by zero in the loss, not a blow-up."
            )
            return "nonfinite_loss", evidence
        if low == "float16":
            evidence["summary"] = (
                f"The loss was NaN{where} in an fp16 model whose steps before were healthy: "
                "an activation passed 65504."
            )
            return "overflow", evidence
        evidence["summary"] = (
            f"The loss was NaN{where} while the steps before were healthy: a NaN or Inf "
            "entered the forward pass (an input, or an operation such as 0/0)."
        )
        return "nonfinite_forward", evidence

    def _lr_jump(
        self, window: Window, event: Event, row: _Row | None
    ) -> tuple[str, dict[str, Any]] | None:
        """The learning rate rose before the onset: the step size, not the data."""
        onset = int(event.extra.get("onset", event.step))
        before = [lr for s, lr in self._lrs if s < onset] + [
            float(v) for s, v in zip(window.steps, window.lr, strict=True) if s < onset
        ]
        at_onset = [float(v) for v in window.lr[window.steps == onset]]
        at_onset += [lr for s, lr in self._lrs if s == onset]
        if not before or not at_onset:
            return None
        horizon = max(2 * len(window), 10)  # the rise happened within this many steps
        earlier = np.asarray(before[: max(len(before) - horizon, 1)])
        base, now = float(np.median(earlier)), at_onset[0]
        if not (base > 0 and now >= LR_JUMP * base):
            return None
        return "lr_too_high", {
            "summary": (
                f"The learning rate rose to {now:.3g} by step {onset} from {base:.3g} "
                f"(x{now / base:.3g}); the {_NOUNS.get(event.kind, event.kind)} followed."
            ),
            "lr": now,
            "lr_before": base,
        }

    def _bad_batch(
        self, window: Window, event: Event, row: _Row | None
    ) -> tuple[str, dict[str, Any]] | None:
        """A few examples, or the whole batch, stand far above this run's usual losses."""
        if event.kind != "spike":
            return None
        onset = int(event.extra.get("onset", event.step))
        samples = _sample_row(window, onset)
        if samples is None:
            return None
        median = float(samples[_SAMPLE["median"]])
        typical = float(np.median(self._batch_medians)) if self._batch_medians else math.nan
        top = float(np.median(self._batch_tops)) if self._batch_tops else math.nan
        # Hard examples stand out of every batch; a bad one stands out of the run too.
        outliers = [(p, loss) for p, loss in _outliers(samples) if not loss < BATCH_LEVEL * top]
        evidence: dict[str, Any] = {"batch_median_loss": _finite_or_none(median)}
        if math.isfinite(typical):
            evidence["typical_median_loss"] = typical
            evidence["typical_largest_loss"] = top
        if outliers and math.isfinite(top):
            worst = outliers[0]
            evidence["summary"] = (
                f"At step {onset}, {len(outliers)} example(s) of the batch had losses far "
                f"above the batch median {median:.3g} (largest {worst[1]:.4g} at position "
                f"{worst[0]}; the largest loss of a batch is usually {top:.3g}), while the "
                "learning rate was steady."
            )
            return "bad_batch", evidence
        if math.isfinite(typical) and typical > 0 and median >= BATCH_LEVEL * typical:
            if not self._isolated(window, onset):
                return None  # the next batches are as bad: the model broke, not the data
            evidence["summary"] = (
                f"At step {onset} the whole batch's median loss was {median:.3g}, "
                f"{median / typical:.3g}x this run's typical {typical:.3g}, with a steady "
                "learning rate: the batch itself is off."
            )
            return "bad_batch", evidence
        return None

    def _isolated(self, window: Window, onset: int) -> bool:
        """Whether the loss came back after ``onset`` (judged on the steps the window shows).

        A whole batch far above the usual losses is a bad batch when the next batch, on
        the weights that batch's update left, is back near the usual level; when the onset
        is the window's last step, the steps before it must have been calm.
        """
        given = window.loss_given & np.isfinite(window.loss)
        typical = self._recent_loss()
        if math.isnan(typical):
            return False
        after = given & (window.steps > onset)
        if after.any():
            return float(window.loss[after][0]) <= BATCH_LEVEL * typical
        before = given & (window.steps < onset)
        last = float(window.loss[before][-1]) if before.any() else self._last_loss
        return last <= 2 * typical

    def _initialization(
        self, window: Window, event: Event, row: _Row | None
    ) -> tuple[str, dict[str, Any]] | None:
        """Gradients too large from the very first steps, on weights of the wrong scale."""
        if event.kind not in ("exploding", "overflow") or event.step > len(window):
            return None
        if event.metric in ("weight_growth",):
            return None
        wrong = self._wrong_scales(event.layers or window.layer_names, high=True)
        if not wrong:
            return None
        name, scale = wrong[0]
        return "initialization", {
            "summary": (
                f"The gradients were too large from step 1, before any update could cause "
                f"it: layer {name}'s weights have std {scale.std:.3g} over fan-in "
                f"{scale.fan_in} (gain {scale.gain:.3g}; He or Xavier give about 1 to 1.4)."
            ),
            "layer": name,
            "weight_std": scale.std,
            "fan_in": scale.fan_in,
            "gain": scale.gain,
        }

    def _wrong_scales(self, names: Sequence[str], high: bool) -> list[tuple[str, LayerScale]]:
        found = []
        for name in names:
            scale = self.facts.layer_scale(name)
            if scale is None or scale.fan_in < 2:
                continue
            if (high and scale.gain > HIGH_GAIN) or (not high and scale.gain < LOW_GAIN):
                found.append((name, scale))
        return found

    def _hot_layer(
        self, window: Window, event: Event, row: _Row | None
    ) -> tuple[str, dict[str, Any]] | None:
        """One layer's updates far above the others': its own LR, or that layer alone."""
        if not event.layers or event.kind == "spike" and event.metric == "loss":
            return None
        names = list(window.layer_names)
        name = event.layers[0]
        if name not in names:
            return None
        j = names.index(name)
        lrs = list(self.facts.group_lr()) if self.facts.group_lr else []
        if len(lrs) == len(names):
            others = [lr for k, lr in enumerate(lrs) if k != j]
            if others and lrs[j] >= 10 * float(np.median(others)):
                return "lr_too_high", {
                    "summary": (
                        f"Layer {name} moved first and its param group's learning rate, "
                        f"{lrs[j]:.3g}, is {lrs[j] / float(np.median(others)):.3g}x the "
                        "other layers'."
                    ),
                    "layer": name,
                    "layer_lr": lrs[j],
                    "other_lr": float(np.median(others)),
                }
        ratio = self._update
        if ratio is not None and len(ratio) == len(names) and np.isfinite(ratio[j]):
            rest = np.delete(ratio, j)
            rest = rest[np.isfinite(rest)]
            sustained = event.kind in ("exploding", "divergence")
            if sustained and rest.size and ratio[j] >= 30 * float(np.median(rest)):
                return "layer_local", {
                    "summary": (
                        f"Layer {name} alone is blowing up: its update ratio {ratio[j]:.3g} is "
                        f"{ratio[j] / float(np.median(rest)):.3g}x the other layers' median."
                    ),
                    "layer": name,
                    "update_ratio": float(ratio[j]),
                }
        return None

    def _high_updates(self, event: Event) -> tuple[str, dict[str, Any]] | None:
        """Steps that rewrite a sizeable share of the weights: the learning rate."""
        ratio = self._updates_for(event)
        if ratio is None or not np.isfinite(ratio).any():
            return None
        top = float(np.nanmax(ratio))
        median = float(np.nanmedian(ratio))
        if not median >= HIGH_UPDATE_RATIO:
            return None
        return "lr_too_high", {
            "summary": (
                f"Each step changed the weights by {median:.3g} of their norm (median layer; "
                f"largest {top:.3g}), where about {TARGET_UPDATE_RATIO:g} is usual: the "
                "learning rate is too high for this model."
            ),
            "update_ratio_median": median,
            "update_ratio_max": top,
        }

    def _vanishing_cause(self, window: Window, event: Event) -> tuple[str, dict[str, Any]]:
        inherited = self._inherited(window, event)
        if inherited is not None and inherited[0] != "unknown":
            return inherited  # units saturated or killed by a blow-up: the blow-up's cause
        names = event.layers or window.layer_names[:1]
        zero = [n for n in names if self._layer_is_zero(window, n)]
        if zero and len(zero) == len(names):
            if self.facts.saturating and not self.facts.rectified:
                return "saturation", {
                    "summary": (
                        f"The gradients of {_listed(zero)} are exactly zero at every step, in "
                        f"a model of {_listed(list(self.facts.saturating))} units: saturated "
                        "at their bounds, their slope is 0."
                    ),
                    "zero_layers": zero,
                }
            return "dead_units", {
                "summary": (
                    f"The gradients of {_listed(zero)} are exactly zero at every step: no "
                    "unit before them passes a gradient (ReLUs that never fire)."
                ),
                "zero_layers": zero,
            }
        small = self._wrong_scales(names, high=False)
        if small:
            name, scale = small[0]
            return "initialization", {
                "summary": (
                    f"Layer {name}'s weights are too small to carry the signal: std "
                    f"{scale.std:.3g} over fan-in {scale.fan_in} (gain {scale.gain:.3g}; "
                    "Xavier or He give about 1 to 1.4)."
                ),
                "layer": name,
                "weight_std": scale.std,
                "fan_in": scale.fan_in,
                "gain": scale.gain,
            }
        if self.facts.saturating:
            first, last = _first_last(window, names)
            return "saturation", {
                "summary": (
                    f"The model uses {_listed(list(self.facts.saturating))}, whose slope is at "
                    f"most 1 and near 0 when saturated: the gradient shrinks layer by layer, to "
                    f"{first:.3g} at the first layer against {last:.3g} at the last."
                ),
                "first_layer_norm": first,
                "last_layer_norm": last,
            }
        return "unknown", {
            "summary": (
                "The early layers' gradients are tiny, but the weights have a usual scale and "
                "no saturating activation was found."
            )
        }

    @staticmethod
    def _layer_is_zero(window: Window, name: str) -> bool:
        names = list(window.layer_names)
        if name not in names:
            return False
        column = window.per_layer[:, names.index(name)]
        return bool(np.all(column[np.isfinite(column)] == 0))
