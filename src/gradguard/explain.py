"""Why an event happened and what to do: the cause, its evidence and advice with numbers.

The detectors say *what* they saw; :class:`Explainer` reads the same drained window, a
bounded history of healthy steps and a few facts about the model and its training setup
(:class:`RunFacts`), and fills ``Event.cause``, ``Event.evidence`` and ``Event.advice``
on every warning and error. Each rule needs positive evidence: where none holds, the
cause is ``unknown``. Advice names values from this run that would act on it: a clip
threshold below the norm that hurt and above the healthy ones, a learning rate below
the one in use, never a remedy the run already has.

It reads records and plain facts only (no torch), so the rules can be tested on
hand-made windows.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from gradguard.causes import CAUSES
from gradguard.records import SAMPLE_COLUMNS, SAMPLE_TOP, Advice, Event, Window

#: An update ratio (||step|| / ||weights||) around this is the usual healthy pace.
TARGET_UPDATE_RATIO = 1e-3
#: A layer whose update ratio passes this is being rewritten, not trained.
HIGH_UPDATE_RATIO = 3e-2
#: A learning rate at least this many times its earlier median was raised.
LR_JUMP = 1.5
#: A per-example loss this many robust deviations above the batch median stands out.
OUTLIER_SIGMA = 6.0
#: A batch whose median loss is this many times the run's typical median is bad as a whole.
BATCH_LEVEL = 5.0
#: Weight scale (std times sqrt(fan-in)) outside [LOW_GAIN, HIGH_GAIN] is a wrong init scale.
LOW_GAIN, HIGH_GAIN = 0.35, 2.5
#: A loss this many times its recent healthy level has not recovered from an episode.
HURT = 1.5
#: A cause stays with the episode for this many steps: a NaN after a blow-up is its end.
INHERIT_STEPS = 50

_SAMPLE = {name: i for i, name in enumerate(SAMPLE_COLUMNS)}
_NOUNS = {"exploding": "explosion", "nonfinite": "NaN/Inf", "vanishing": "vanishing gradient"}
_HISTORY = 2048


@dataclass(frozen=True)
class LayerScale:
    """The scale of a layer's weight matrix: ``std * sqrt(fan_in)`` is its gain."""

    std: float
    fan_in: int
    activation: str | None = None  # the activation after the layer, when known

    @property
    def gain(self) -> float:
        """The standard deviation times the square root of the fan-in."""
        return self.std * math.sqrt(self.fan_in)


@dataclass(frozen=True)
class RunFacts:
    """What the explainer knows about the training setup (filled by the guard).

    Attributes:
        clip_max_norm: the fixed global-norm clip threshold in use, if any.
        clipping: any clip policy is in use.
        scaler: a ``GradScaler`` is in use.
        recovery: a recovery strategy (``Rollback``) is in use.
        low_precision: ``"float16"`` or ``"bfloat16"`` when the parameters are stored so.
        saturating: saturating activation modules found in the model (``Sigmoid``, ...).
        rectified: the model has ReLU modules (units that can die).
        normalized: the model has normalization layers.
        group_lr: the learning rate of each layer's param group (depth order).
        layer_scale: reads a layer's weight scale when needed (events are rare).
    """

    clip_max_norm: float | None = None
    clipping: bool = False
    scaler: bool = False
    recovery: bool = False
    low_precision: str | None = None
    saturating: tuple[str, ...] = ()
    rectified: bool = False
    normalized: bool = False
    group_lr: Callable[[], Sequence[float]] | None = None
    layer_scale: Callable[[str], LayerScale | None] = field(default=lambda _name: None)


def _sig(value: float) -> float:
    """Two significant figures (what a user would type)."""
    if not math.isfinite(value) or value == 0:
        return value
    return float(f"{value:.2g}")


def jsonable(value: Any) -> Any:
    """A JSON-ready copy of a batch id: tensors and arrays become lists, others ``repr``."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    tolist = getattr(value, "tolist", None)
    if callable(tolist):  # torch tensors, numpy arrays and scalars
        return jsonable(tolist())
    return repr(value)


@dataclass
class _Row:
    """One step of a window, as plain numbers."""

    step: int
    loss: float
    grad_norm: float
    lr: float
    loss_given: bool
    finite: bool
    overflow: bool
    skipped: bool
    per_layer: np.ndarray[Any, Any]


class Explainer:
    """Fills cause, evidence and advice on the warning and error events of each drain.

    Keeps a bounded history (at most ``2,048`` steps of gradient norms and losses, the
    last update ratio of each layer, the recent batch ids) and, per episode, the cause of
    the last blow-up so that the NaN at its end is blamed on the same cause.
    """

    def __init__(self, facts: RunFacts | None = None) -> None:
        self.facts = facts or RunFacts()
        self._norms: deque[float] = deque(maxlen=_HISTORY)
        self._losses: deque[float] = deque(maxlen=_HISTORY)
        self._lrs: deque[tuple[int, float]] = deque(maxlen=_HISTORY)
        self._batch_medians: deque[float] = deque(maxlen=256)
        self._batch_tops: deque[float] = deque(maxlen=256)
        self._update: np.ndarray[Any, Any] | None = None  # last measured ratio per layer
        self._update_typical: np.ndarray[Any, Any] | None = None
        self._episode: tuple[int, str, dict[str, Any]] | None = None  # (last step, cause, ev)
        self._episode_here = False  # the episode was explained in the current drain
        self._last_out_of_bounds = False  # the last step's gradient norm was out of bounds
        self._spiked = False  # the current drain holds a spike
        self._last_loss = math.nan  # the previous drain's last finite loss

    # --- public ----------------------------------------------------------------------

    def explain(self, window: Window, events: Sequence[Event]) -> list[Event]:
        """Return ``events`` with a cause, evidence and advice on each warning or error."""
        self._observe_updates(window)
        onset = min((e.step for e in events if e.needs_attention), default=None)
        # Sudden one-step events first: a blow-up that the same drain shows is their
        # consequence, and inherits their cause, whatever step its detector dates it to.
        order = sorted(range(len(events)), key=lambda i: events[i].kind != "spike")
        out = list(events)
        self._episode_here = False
        self._spiked = any(e.kind == "spike" for e in events)
        for i in order:
            event = events[i]
            if not event.needs_attention or event.cause or event.kind in ("rollback", "cooldown"):
                continue
            cause, evidence = self._cause(window, event)
            evidence = {**evidence, **self._batch_evidence(window, event)}
            event = replace(event, cause=cause, evidence=evidence)
            event = replace(event, batch=self._batch_at(window, event.step))
            out[i] = replace(event, advice=self._advice(cause, window, event, evidence))
            seen = int(event.extra.get("detected_at", event.step))
            if self._episode is None or seen >= self._episode[0] or event.kind == "spike":
                self._episode = (
                    max(seen, self._episode[0] if self._episode else seen),
                    cause,
                    evidence,
                )
                self._episode_here = True
        out = [self._second_look(window, e) for e in out]
        self._remember(window, onset)
        return out

    def _second_look(self, window: Window, event: Event) -> Event:
        """An unknown event of a drain whose blow-up got a cause takes that cause."""
        if event.cause != "unknown" or not self._episode_here or self._episode is None:
            return event
        found = self._inherited(window, event)
        if found is None or found[0] == "unknown":
            return event
        evidence = {**found[1], **{k: v for k, v in event.evidence.items() if k == "outliers"}}
        return replace(
            event,
            cause=found[0],
            evidence=evidence,
            advice=self._advice(found[0], window, event, evidence),
        )

    def explain_rollback(self, event: Event, trigger: Event | None, skipped: list[Any]) -> Event:
        """A rollback carries its trigger's cause and the batches it skipped."""
        evidence: dict[str, Any] = dict(event.evidence)
        undone = event.extra.get("undone")
        if undone:
            evidence["skipped_steps"] = list(undone)
        if skipped:
            evidence["skipped_batches"] = skipped
        cause = trigger.cause if trigger is not None and trigger.cause else "unknown"
        first = f"Rolled back after the {trigger.kind} at step {trigger.step}" if trigger else ""
        if first:
            evidence["summary"] = (
                f"{first} (cause: {CAUSES.get(cause, cause)}); "
                f"{len(skipped)} batch id(s) of the undone steps are not replayed."
                if skipped
                else f"{first} (cause: {CAUSES.get(cause, cause)})."
            )
        return replace(event, cause=cause, evidence=evidence)

    def state_dict(self) -> dict[str, Any]:
        """The history, as plain lists (JSON-ready)."""
        return {
            "norms": list(self._norms),
            "losses": list(self._losses),
            "lrs": [list(p) for p in self._lrs],
            "batch_medians": list(self._batch_medians),
            "batch_tops": list(self._batch_tops),
            "update": None if self._update is None else self._update.tolist(),
            "update_typical": _listed_or_none(self._update_typical),
            "episode": None if self._episode is None else list(self._episode),
            "last_out_of_bounds": self._last_out_of_bounds,
            "last_loss": self._last_loss,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (an empty mapping: no history)."""
        self._norms = deque(state.get("norms", ()), maxlen=_HISTORY)
        self._losses = deque(state.get("losses", ()), maxlen=_HISTORY)
        self._lrs = deque(((int(s), float(v)) for s, v in state.get("lrs", ())), maxlen=_HISTORY)
        self._batch_medians = deque(state.get("batch_medians", ()), maxlen=256)
        self._batch_tops = deque(state.get("batch_tops", ()), maxlen=256)
        update, typical = state.get("update"), state.get("update_typical")
        self._update = None if update is None else np.asarray(update, dtype=np.float64)
        self._update_typical = None if typical is None else np.asarray(typical, dtype=np.float64)
        episode = state.get("episode")
        self._episode = (
            None if episode is None else (int(episode[0]), str(episode[1]), dict(episode[2]))
        )
        self._last_out_of_bounds = bool(state.get("last_out_of_bounds", False))
        self._last_loss = float(state.get("last_loss", math.nan))

    # --- history ---------------------------------------------------------------------

    def _observe_updates(self, window: Window) -> None:
        ratio = window.update_ratio
        if ratio is None:
            return
        if self._update is None or len(self._update) != len(ratio):
            self._update = np.full(len(ratio), np.nan)
        measured = np.isfinite(ratio)
        self._update[measured] = ratio[measured]

    def _remember(self, window: Window, onset: int | None) -> None:
        """Keep the window's healthy steps as the reference.

        Healthy: before any event's onset in this drain, and more than ``INHERIT_STEPS``
        after the last explained episode (a run recovering from a blow-up is not the
        reference its next event is judged against).
        """
        healthy = window.finite & ~window.skipped & np.isfinite(window.grad_norm)
        if onset is not None:
            healthy &= window.steps < onset
        if self._episode is not None:
            healthy &= window.steps > self._episode[0] + INHERIT_STEPS
        self._norms.extend(float(v) for v in window.grad_norm[healthy])
        given = healthy & window.loss_given & np.isfinite(window.loss)
        self._losses.extend(float(v) for v in window.loss[given])
        self._lrs.extend((int(s), float(v)) for s, v in zip(window.steps, window.lr, strict=True))
        if window.samples is not None:
            medians = window.samples[:, _SAMPLE["median"]]
            self._batch_medians.extend(float(v) for v in medians[healthy & np.isfinite(medians)])
            tops = window.samples[:, _SAMPLE["top0"]]
            self._batch_tops.extend(float(v) for v in tops[healthy & np.isfinite(tops)])
        if self._update is not None and len(window) and bool(healthy[-1]):
            self._update_typical = self._update.copy()  # measured on a healthy step
        if len(window):
            self._last_out_of_bounds = self._out_of_bounds(float(window.grad_norm[-1]))
            last = window.loss_given & np.isfinite(window.loss)
            self._last_loss = float(window.loss[last][-1]) if last.any() else math.nan

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

    # --- the batch -------------------------------------------------------------------

    def _typical_top(self) -> float:
        """The usual largest per-example loss of a batch in this run (NaN before any)."""
        return float(np.median(self._batch_tops)) if self._batch_tops else math.nan

    def _standing_out(self, samples: np.ndarray[Any, Any]) -> list[tuple[int, float]]:
        """(position, loss) of the examples that stand out of their batch and of the run.

        Hard examples stand out of every batch; a bad one is also ``BATCH_LEVEL`` times
        the usual largest loss of a batch. Non-finite losses always stand out. Where the
        whole batch is off, its largest losses stand out of the run alone.
        """
        top = self._typical_top()
        if math.isnan(top):
            return _outliers(samples)
        found = []
        for k in range(min(SAMPLE_TOP, int(samples[_SAMPLE["size"]]))):
            loss = float(samples[_SAMPLE["top0"] + k])
            if not math.isfinite(loss) or loss >= BATCH_LEVEL * top:
                found.append((int(samples[_SAMPLE["position0"] + k]), loss))
        return found

    @staticmethod
    def _batch_at(window: Window, step: int) -> Any:
        if window.batch is None:
            return None
        hits = np.flatnonzero(window.steps == step)
        return jsonable(window.batch[int(hits[0])]) if hits.size else None

    def _batch_evidence(self, window: Window, event: Event) -> dict[str, Any]:
        """The examples whose losses stood out at the event's step, named by the batch id."""
        onset = int(event.extra.get("onset", event.step))
        samples = _sample_row(window, onset)
        if samples is None:
            return {}
        found = self._standing_out(samples)
        if not found:
            return {}
        batch = self._batch_at(window, onset)
        ids = batch if isinstance(batch, list) and len(batch) == int(samples[3]) else None
        return {
            "outliers": [
                {
                    "position": position,
                    "id": None if ids is None else ids[position],
                    "loss": loss if math.isfinite(loss) else str(loss),
                }
                for position, loss in found
            ]
        }

    # --- advice ----------------------------------------------------------------------

    def _advice(
        self, cause: str, window: Window, event: Event, evidence: dict[str, Any]
    ) -> tuple[Advice, ...]:
        row = self._row(window, int(event.extra.get("onset", event.step)))
        rules: dict[str, Callable[[], list[Advice | None]]] = {
            "lr_too_high": lambda: [
                self._lr_advice(window, event, evidence, row),
                self._clip_advice(row),
            ],
            "bad_batch": lambda: [
                self._inspect_advice(event, evidence),
                self._clip_advice(row),
                self._rollback_advice(),
            ],
            "overflow": self._overflow_advice,
            "nonfinite_loss": lambda: [
                self._epsilon_advice("loss"),
                self._inspect_advice(event, evidence),
            ],
            "nonfinite_backward": lambda: [self._epsilon_advice("backward")],
            "nonfinite_forward": lambda: [
                self._inspect_advice(event, evidence),
                Advice(
                    "inspect_batch",
                    "Check the inputs for NaN/Inf before the forward pass "
                    "(torch.isfinite(x).all()) and look for 0/0 in the model.",
                    {"check": "torch.isfinite"},
                ),
            ],
            "initialization": lambda: [self._init_advice(evidence)],
            "saturation": lambda: self._saturation_advice(evidence),
            "dead_units": lambda: self._dead_advice(window, event),
            "layer_local": lambda: [
                self._layer_advice(window, evidence, row),
                self._clip_advice(row),
            ],
        }
        if event.kind == "vanishing" and cause == "unknown":
            rules["unknown"] = lambda: self._normalization_advice()
        steps = rules.get(cause, lambda: [self._clip_advice(row)])()
        if cause in ("lr_too_high", "layer_local", "unknown") and event.kind != "vanishing":
            steps.append(self._rollback_advice())
        kept: list[Advice] = []
        for item in steps:
            if item is not None and all(item.text != k.text for k in kept):
                kept.append(item)
        return tuple(kept)

    def healthy_clip(self) -> float | None:
        """A clip threshold from the healthy history: its 95th percentile gradient norm."""
        if len(self._norms) < 8:
            return None
        return _sig(float(np.quantile(np.asarray(self._norms), 0.95)))

    def _clip_advice(self, row: _Row | None) -> Advice | None:
        threshold = self.healthy_clip()
        if threshold is None or row is None:
            return None
        norm = row.grad_norm
        if math.isfinite(norm) and not threshold < norm:
            return None  # it would not have acted on this step
        current = self.facts.clip_max_norm
        if current is not None and current <= threshold:
            return None  # the run already clips at least as hard
        typical = float(np.median(np.asarray(self._norms)))
        seen = f"{norm:.3g}" if math.isfinite(norm) else "non-finite"
        return Advice(
            "clip",
            f"Clip the global gradient norm at {threshold:g} (gg.NormClip({threshold:g})): the "
            f"95th percentile of this run's healthy steps (median {typical:.3g}); this step's "
            f"norm was {seen}.",
            {"max_norm": threshold, "healthy_median": _sig(typical)},
        )

    def _lr_advice(
        self, window: Window, event: Event, evidence: dict[str, Any], row: _Row | None
    ) -> Advice | None:
        if "layer_lr" in evidence:
            layer_lr, other = float(evidence["layer_lr"]), float(evidence["other_lr"])
            new = _sig(max(other, layer_lr / 10))
            if new < layer_lr:
                return Advice(
                    "group_lr",
                    f"Lower the learning rate of the param group holding layer "
                    f"{evidence['layer']} from {layer_lr:g} to {new:g} (the other layers use "
                    f"{other:g}).",
                    {"layer": evidence["layer"], "lr": new, "from": layer_lr},
                )
        current = row.lr if row is not None else float(window.lr[-1])
        if not (math.isfinite(current) and current > 0):
            return None
        if "lr_before" in evidence:
            new = _sig(float(evidence["lr_before"]))
            reason = "the value it had while training was healthy"
            current = float(evidence.get("lr", current))
        else:
            ratio = self._update
            top = float(np.nanmax(ratio)) if ratio is not None and np.isfinite(ratio).any() else 0
            factor = min(0.5, TARGET_UPDATE_RATIO / top) if top > 0 else 0.1
            new = _sig(current * factor)
            reason = (
                f"so the largest update ratio, {top:.3g}, comes near {TARGET_UPDATE_RATIO:g}"
                if top > 0
                else "a tenth, until the updates stay small"
            )
        if not new < current:
            return None
        return Advice(
            "lr",
            f"Lower the learning rate from {current:g} to {new:g}: {reason}.",
            {"lr": new, "from": current},
        )

    def _inspect_advice(self, event: Event, evidence: dict[str, Any]) -> Advice | None:
        batch = event.batch
        outliers = evidence.get("outliers") or []
        if batch is None and not outliers:
            return None
        names = [
            o["id"] if o.get("id") is not None else f"position {o['position']}" for o in outliers
        ]
        who = f" examples {_listed([str(n) for n in names])}" if names else " its examples"
        where = f"batch {_short(batch)}" if batch is not None else "the batch"
        return Advice(
            "inspect_batch",
            f"Inspect {where}:{who} stand out; fix or drop them.",
            {"batch": batch, "examples": names},
        )

    def _rollback_advice(self) -> Advice | None:
        if self.facts.recovery:
            return None
        return Advice(
            "rollback",
            "Add recovery=gg.Rollback(): it restores the weights from before such a step and "
            "skips the batches in between.",
            {"recovery": "Rollback"},
        )

    def _epsilon_advice(self, where: str) -> Advice:
        eps = 1e-4 if self.facts.low_precision == "float16" else 1e-7
        if where == "loss":
            text = (
                f"Keep the loss finite: log(p.clamp_min({eps:g})) instead of log(p), or work in "
                "log space (F.log_softmax, F.cross_entropy); guard divisions the same way."
            )
        else:
            text = (
                f"Keep the backward finite: sqrt(x + {eps:g}) and log(x + {eps:g}) instead of "
                "sqrt(x) and log(x) where x can be 0; avoid 0/0."
            )
        return Advice("epsilon", text, {"epsilon": eps})

    def _overflow_advice(self) -> list[Advice | None]:
        steps: list[Advice | None] = []
        if self.facts.low_precision == "float16" and not self.facts.scaler:
            steps.append(
                Advice(
                    "bf16",
                    "Keep the weights in fp32 and compute in bfloat16 (torch.autocast(..., "
                    "dtype=torch.bfloat16)): its range is fp32's, 3.4e38 against fp16's 65504.",
                    {"dtype": "bfloat16"},
                )
            )
            steps.append(
                Advice(
                    "scaler",
                    "Or stay in fp16 with autocast and torch.amp.GradScaler(), passed as "
                    "Guard(scaler=...): it lowers the loss scale when gradients overflow.",
                    {"scaler": "GradScaler"},
                )
            )
        elif not self.facts.scaler:
            steps.append(
                Advice(
                    "scaler",
                    "Use torch.amp.GradScaler() (Guard(scaler=...)) to scale the loss "
                    "dynamically: a fixed scale overflows fp16's 65504.",
                    {"scaler": "GradScaler"},
                )
            )
        else:
            steps.append(
                Advice(
                    "bf16",
                    "The GradScaler could not bring the gradients into fp16's range: compute "
                    "in bfloat16 (fp32's range) instead.",
                    {"dtype": "bfloat16"},
                )
            )
        return steps

    def _init_advice(self, evidence: dict[str, Any]) -> Advice | None:
        if "weight_std" not in evidence:
            return None
        fan_in, std = int(evidence["fan_in"]), float(evidence["weight_std"])
        he, xavier = math.sqrt(2.0 / fan_in), math.sqrt(1.0 / fan_in)
        target = xavier if self.facts.saturating else he
        scheme = (
            "Xavier (gg.init, nn.init.xavier_normal_)"
            if self.facts.saturating
            else ("He (nn.init.kaiming_normal_)")
        )
        return Advice(
            "init",
            f"Initialise layer {evidence['layer']} and its like with {scheme}: std "
            f"{_sig(target):g} for fan-in {fan_in}, not {std:.3g}; or gg.init.lsuv "
            "to measure it on a batch.",
            {"layer": evidence["layer"], "std": _sig(target), "from": std},
        )

    def _saturation_advice(self, evidence: dict[str, Any]) -> list[Advice | None]:
        used = _listed(list(self.facts.saturating))
        first = evidence.get("first_layer_norm")
        measured = f": the first layer's gradient is {first:.3g} here" if first is not None else ""
        steps: list[Advice | None] = [
            Advice(
                "activation",
                f"Replace {used} in the hidden layers with ReLU or GELU, whose slope is 1 "
                f"where active{measured}.",
                {"activation": "ReLU", "from": list(self.facts.saturating)},
            )
        ]
        if not self.facts.normalized:
            steps.append(
                Advice(
                    "normalization",
                    "Or add LayerNorm/BatchNorm before each activation, which keeps the "
                    "inputs in the activation's steep range.",
                    {"normalization": "LayerNorm"},
                )
            )
        return steps

    def _normalization_advice(self) -> list[Advice | None]:
        if self.facts.normalized:
            return []
        return [
            Advice(
                "normalization",
                "Standardise the inputs (mean 0, std 1 per feature) and add LayerNorm or "
                "BatchNorm between layers, so that each layer sees inputs of unit scale.",
                {"normalization": "LayerNorm"},
            )
        ]

    def _dead_advice(self, window: Window, event: Event) -> list[Advice | None]:
        lr = float(window.lr[-1])
        steps: list[Advice | None] = [
            Advice(
                "activation",
                "Use LeakyReLU(0.01) (or GELU) so that units with negative inputs still pass "
                "a gradient and can come back.",
                {"activation": "LeakyReLU", "negative_slope": 0.01},
            )
        ]
        if math.isfinite(lr) and lr > 0:
            steps.append(
                Advice(
                    "lr",
                    f"Lower the learning rate from {lr:g} to {_sig(lr / 10):g}: large steps "
                    "push the biases of ReLU units below zero for every input.",
                    {"lr": _sig(lr / 10), "from": lr},
                )
            )
        return steps

    def _layer_advice(
        self, window: Window, evidence: dict[str, Any], row: _Row | None
    ) -> Advice | None:
        name = evidence.get("layer")
        if name is None:
            return None
        lr = row.lr if row is not None else float(window.lr[-1])
        ratio = float(evidence.get("update_ratio", math.nan))
        factor = min(0.5, TARGET_UPDATE_RATIO / ratio) if ratio > 0 else 0.1
        new = _sig(lr * factor)
        if not new < lr:
            return None
        return Advice(
            "group_lr",
            f"Give layer {name} its own param group with learning rate {new:g} (now {lr:g}): "
            f"its update ratio is {ratio:.3g}.",
            {"layer": name, "lr": new, "from": lr},
        )


def _listed_or_none(values: np.ndarray[Any, Any] | None) -> list[float] | None:
    return None if values is None else [float(v) for v in values]


def _short(value: Any, width: int = 60) -> str:
    """A batch id for a sentence: its JSON, cut to ``width`` characters with its length."""
    text = json.dumps(value)
    if len(text) <= width:
        return text
    if not isinstance(value, list):
        return text[: width - 3] + "..."
    cut = max(text.rfind(",", 0, width - 5), 1)  # whole ids only
    return f"{text[:cut]}, ...] ({len(value)} ids)"


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _listed(names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _first_last(window: Window, names: Sequence[str]) -> tuple[float, float]:
    medians = np.nanmedian(np.where(np.isfinite(window.per_layer), window.per_layer, np.nan), 0)
    return float(medians[0]), float(medians[-1])


def _sample_row(window: Window, step: int) -> np.ndarray[Any, Any] | None:
    """The sample-loss summary of ``step``, if its losses were given."""
    if window.samples is None:
        return None
    hits = np.flatnonzero(window.steps == step)
    if not hits.size:
        return None
    row = window.samples[int(hits[0])]
    return None if not np.isfinite(row[_SAMPLE["size"]]) else row


def _top_is(samples: np.ndarray[Any, Any], value: float) -> bool:
    tops = samples[_SAMPLE["top0"] : _SAMPLE["top0"] + SAMPLE_TOP]
    return bool(np.any(tops == value))


def _outliers(samples: np.ndarray[Any, Any]) -> list[tuple[int, float]]:
    """(position, loss) of the top losses that stand out: non-finite, or far above the rest."""
    median, mad = float(samples[_SAMPLE["median"]]), float(samples[_SAMPLE["mad"]])
    size = int(samples[_SAMPLE["size"]])
    spread = max(1.4826 * mad, 1e-3 * abs(median), 1e-12) if math.isfinite(mad) else math.inf
    found = []
    for k in range(min(SAMPLE_TOP, size)):
        loss = float(samples[_SAMPLE["top0"] + k])
        position = int(samples[_SAMPLE["position0"] + k])
        far = (
            math.isfinite(loss) and (loss - median) / spread >= OUTLIER_SIGMA and loss > 2 * median
        )
        if not math.isfinite(loss) or far:
            found.append((position, loss))
    return found


_RANK = {"info": 0, "warning": 1, "error": 2}
#: Kinds raised per step: their streaks are runs of consecutive steps. The others are
#: judged per drain, and a streak continues from one drain to the next.
PER_STEP_KINDS = ("nonfinite", "overflow", "spike")


class Streaks:
    """Consecutive events of one kind and cause become one event with a count.

    An event continues the open streak of its kind when it has the streak's cause (an
    info event without a cause joins any) and follows it directly: at the next step for
    the kinds raised per step (:data:`PER_STEP_KINDS`), within ``gap`` steps (one log
    interval) for the kinds judged per drain. The streak keeps its first event's step,
    cause, evidence and advice; ``count``, ``last_step`` and the highest severity grow.
    The run directory gets a streak's row again when its count passes a power of two and
    when it ends, so a 3,000-step NaN streak writes about a dozen rows, the last of which
    holds the count.
    """

    def __init__(self, gap: int) -> None:
        self.gap = gap
        self._open: dict[str, Event] = {}
        self._written: dict[tuple[str, int], int] = {}
        self._ended: set[tuple[str, int]] = set()

    @staticmethod
    def same(a: Event, b: Event) -> bool:
        """Whether two events are rows of one streak."""
        return a.kind == b.kind and a.step == b.step and a.cause == b.cause

    def merge(
        self, events: Sequence[Event], drain_step: int, final: bool = False
    ) -> tuple[list[Event], list[Event]]:
        """Return the events that start a streak (or stand alone) and the streaks updated."""
        new: list[Event] = []
        updated: dict[tuple[str, int], Event] = {}
        for event in events:
            if event.kind in ("rollback", "cooldown"):
                if event.kind == "rollback":  # the steps restart: every streak ends here
                    self._end_all(updated)
                new.append(event)
                continue
            streak = self._open.get(event.kind)
            if streak is not None and self._continues(streak, event):
                grown = _grow(streak, event)
                self._open[event.kind] = grown
                key = (grown.kind, grown.step)
                if any(self.same(n, grown) for n in new):
                    new = [grown if self.same(n, grown) else n for n in new]
                else:
                    updated[key] = grown
                continue
            if streak is not None:
                self._end(streak, updated)
            opened = replace(event, last_step=_last_seen(event))
            self._open[event.kind] = opened
            self._written[(opened.kind, opened.step)] = 1
            new.append(opened)
        for kind, streak in list(self._open.items()):
            if final or streak.end_step < drain_step - self.gap:
                self._end(streak, updated)
                del self._open[kind]
        for event in new:  # written whole with this drain
            key = (event.kind, event.step)
            self._written[key] = event.count
            updated.pop(key, None)
            self._forget_if_done(key)
        return new, list(updated.values())

    def _forget_if_done(self, key: tuple[str, int]) -> None:
        """Drop the bookkeeping of a streak that ended and whose last row is written."""
        if key in self._ended and key not in {(e.kind, e.step) for e in self._open.values()}:
            self._ended.discard(key)
            self._written.pop(key, None)

    def close_all(self) -> list[Event]:
        """End every open streak (the guard closes); return those with rows still owed."""
        updated: dict[tuple[str, int], Event] = {}
        self._end_all(updated)
        return list(updated.values())

    def _end_all(self, updated: dict[tuple[str, int], Event]) -> None:
        for streak in self._open.values():
            self._end(streak, updated)
        self._open.clear()

    def due(self, event: Event) -> bool:
        """Whether a streak's updated row goes to the sinks now (and note it as written)."""
        key = (event.kind, event.step)
        written = self._written.get(key, 0)
        passed_power_of_two = event.count.bit_length() > written.bit_length()
        ended = key in self._ended
        if event.count == written or not (passed_power_of_two or ended):
            return False
        self._written[key] = event.count
        self._forget_if_done(key)
        return True

    def _continues(self, streak: Event, event: Event) -> bool:
        gap = 1 if event.kind in PER_STEP_KINDS else self.gap
        if event.step < streak.step or event.step > streak.end_step + gap:
            return False
        # an info row without a cause joins any streak; a cause never changes mid-streak
        return not event.cause or event.cause == streak.cause

    def _end(self, streak: Event, updated: dict[tuple[str, int], Event]) -> None:
        key = (streak.kind, streak.step)
        if self._written.get(key, 0) == streak.count:
            self._written.pop(key, None)  # its last row is written: nothing owed
            return
        self._ended.add(key)
        updated[key] = streak


def _last_seen(event: Event) -> int:
    """The last step an event's condition was seen: its confirmation for sustained ones."""
    return max(event.end_step, int(event.extra.get("detected_at", event.step)))


def _grow(streak: Event, event: Event) -> Event:
    severity = event.severity if _RANK[event.severity] > _RANK[streak.severity] else None
    # per-step kinds count steps: a second event at a step already counted (a loss and a
    # gradient-norm spike at once) adds none
    same_step = event.kind in PER_STEP_KINDS and event.step <= streak.end_step
    return replace(
        streak,
        count=streak.count + (0 if same_step else event.count),
        last_step=max(streak.end_step, _last_seen(event)),
        severity=severity or streak.severity,
    )
