"""The explainer: fills cause, evidence and advice on each drain's events, keeps the history."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from gradguard.causes import CAUSES
from gradguard.explain.advice import _Advice
from gradguard.explain.facts import (
    _HISTORY,
    _SAMPLE,
    BATCH_LEVEL,
    INHERIT_STEPS,
    RunFacts,
    _listed_or_none,
    _outliers,
    _sample_row,
    jsonable,
)
from gradguard.records import SAMPLE_TOP, Event, Window


class Explainer(_Advice):
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
