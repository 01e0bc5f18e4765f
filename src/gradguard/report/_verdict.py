"""The one-sentence verdict at the top of a report, from the metrics and the events."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from gradguard.report._data import RunData, as_step, number, severity
from gradguard.report._triage import stop_request

Level = Literal["ok", "warn", "bad"]

_SPIKE_WORDS = {"loss": "loss spike", "grad_norm": "gradient-norm spike"}
_TRIGGER_WORDS = {
    "nonfinite": "streak of non-finite gradients",
    "exploding": "gradient explosion",
    "overflow": "gradient-norm overflow",
    "vanishing": "vanishing gradient",
    "divergence": "divergence",
}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _first_step(events: Sequence[dict[str, Any]]) -> int:
    return min(int(e["first_step"]) for e in events)


def _steps(events: Sequence[dict[str, Any]]) -> int:
    """How many steps the events cover: a streak counts each of its steps."""
    return sum(int(e["count"]) for e in events)


def _layers_text(events: Sequence[dict[str, Any]]) -> str:
    names = list(dict.fromkeys(n for e in events for n in e.get("layers", ())))
    if not names:
        return ""
    more = f" (+{len(names) - 2} more)" if len(names) > 2 else ""
    return f" in {', '.join(names[:2])}{more}"


def _metric(event: dict[str, Any]) -> str:
    """The metric an event measured, as text (empty when the row has none)."""
    return str(event.get("metric") or "")


def _onset(rollback: dict[str, Any]) -> int | None:
    """The step of the fault a rollback answered (its ``threshold``), None if not logged."""
    return as_step(rollback.get("threshold"))


def _describe_trigger(run: RunData, rollback: dict[str, Any]) -> str:
    """``a loss spike at step 701``: what a rollback undid, from its onset's event."""
    onset = _onset(rollback)
    trigger = str(rollback.get("extra", {}).get("trigger", "fault"))
    if trigger == "spike":
        metrics = [
            _metric(e)
            for e in run.events_of("spike", attention=True)
            if e.get("first_step") == onset
        ]
        metric = "loss" if "loss" in metrics else metrics[0] if metrics else ""
        words = _SPIKE_WORDS.get(metric, "spike")
    else:
        words = _TRIGGER_WORDS.get(trigger, trigger) or "fault"
    article = "an" if words[0] in "aeiou" else "a"
    return f"{article} {words}" + ("" if onset is None else f" at step {onset}")


def _rollback_part(run: RunData) -> tuple[str | None, bool]:
    """The rollbacks' clause, and whether one of them failed."""
    rollbacks = run.events_of("rollback")
    done = [e for e in rollbacks if np.isfinite(number(e.get("value")))]
    failed = [e for e in rollbacks if not np.isfinite(number(e.get("value")))]
    clauses = []
    if done:
        first = _describe_trigger(run, done[0])
        if len(done) == 1:
            clauses.append(f"1 rollback after {first}")
        else:
            clauses.append(f"{len(done)} rollbacks, the first after {first}")
    if failed:
        onset = _onset(failed[0])
        at = "" if onset is None else f" at step {onset}"
        clauses.append(f"no rollback possible after the fault{at}")
    return ("; ".join(clauses) or None), bool(failed)


#: Event kinds the verdict describes in a clause of their own; others are counted.
_DESCRIBED = frozenset(
    {"nonfinite", "overflow", "spike", "vanishing", "exploding", "snapshot_failed"}
    | {"rollback", "cooldown", "divergence"}
)


def _event_parts(run: RunData) -> list[str]:
    parts = []
    nonfinite = [
        e for e in run.events_of("nonfinite", attention=True) if e.get("metric") != "skipped_steps"
    ]
    skipped = int(run.flag("skipped").sum()) if nonfinite else 0
    if skipped:
        parts.append(f"{_plural(skipped, 'step')} skipped for non-finite gradients")
    elif nonfinite:
        steps = _steps(nonfinite)
        parts.append(f"non-finite gradients at {_plural(steps, 'step')} (not skipped)")
    overflow = run.events_of("overflow", attention=True)
    if overflow:
        parts.append(f"the fp32 gradient norm overflowed at {_plural(_steps(overflow), 'step')}")
    spike_events = run.events_of("spike", attention=True)
    spikes = Counter(_metric(e) for e in spike_events)
    for metric, count in sorted(spikes.items()):
        first = _first_step([e for e in spike_events if _metric(e) == metric])
        word = _SPIKE_WORDS.get(metric, "spike")
        parts.append(f"{_plural(count, word)} (first at step {first})")
    for kind in ("vanishing", "exploding"):
        found = run.events_of(kind, attention=True)
        if found:
            where = _layers_text(found)
            parts.append(f"{kind} gradients from step {_first_step(found)}{where}")
    failed_writes = run.events_of("snapshot_failed", attention=True)
    if failed_writes:
        error = str(failed_writes[0].get("extra", {}).get("error") or "").split(":")[0]
        why = f" ({error})" if error else ""
        parts.append(
            f"{_plural(len(failed_writes), 'snapshot write')} failed (first at step "
            f"{_first_step(failed_writes)}{why}): a rollback falls back to older snapshots"
        )
    others = [e for e in run.events if e.get("kind") not in _DESCRIBED and severity(e) != "info"]
    if others:
        kinds = ", ".join(sorted({str(e.get("kind")) for e in others}))
        parts.append(f"{_plural(len(others), 'other warning')} ({kinds})")
    return parts


def verdict(run: RunData) -> tuple[Level, str]:
    """The run in one sentence, and how worried to be (``ok``, ``warn``, ``bad``).

    ``bad``: the run diverged, a rollback could not be made or the guard asked the loop
    to stop (the sentence says whether it did); ``warn``: any other
    warning or error event; ``ok``: none (``info`` events, such as a loss scaler's
    backoffs or a spike with no effect on the loss, need no action and are only counted).
    """
    final_steps = len(np.unique(run.steps))
    if not run.metrics:
        return "warn", "no steps logged: metrics.jsonl is empty or missing."
    parts = _event_parts(run)
    rollback, failed = _rollback_part(run)
    if rollback:
        parts.append(rollback)
    divergence = run.events_of("divergence")
    if divergence:
        parts.append(f"diverged at step {_first_step(divergence)}")
    stop = stop_request(run)
    if stop is not None:
        parts.append(stop.sentence())
    if not parts:
        clipped = int((run.column("scale")[run.final] < 1.0).sum())
        shrunk = f"; the clip policy shrank {_plural(clipped, 'step')}" if clipped else ""
        infos = len(run.events)
        what = f"no warnings ({_plural(infos, 'info event')})" if infos else "no events"
        return "ok", f"healthy: {what} in {_plural(final_steps, 'step')}{shrunk}."
    level: Level = "bad" if divergence or failed or stop is not None else "warn"
    sentence = "; ".join(parts)
    undone = len(run.metrics) - int(run.final.sum())
    restarted = len(run.meta.get("sessions", ())) > 1
    by = "rollbacks or restarts" if restarted else "rollbacks"
    more = f", {undone} more undone by {by}" if undone else ""
    count = f"{_plural(final_steps, 'step')} logged{more}"
    return level, f"{sentence[0].upper()}{sentence[1:]} ({count})."
