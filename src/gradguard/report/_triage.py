"""What went wrong and what to do: the run's warnings and errors as episodes, and stops.

An episode is the events that share an onset and a cause (a bad batch's loss spike and
gradient-norm spike at one step are one episode), each event already one per streak
(``merge_streaks``). The report lists them at its top so the reader meets the cause,
the evidence and the advice before the plots. A stop request (``extra.stop_requested_at``)
is compared with the last logged step to tell whether the loop honoured it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from gradguard.causes import CAUSES
from gradguard.report._data import RunData, number, severity, step_of

#: How each ``cause`` code reads in the report; a code not listed is shown as it is.
CAUSE_LABELS = CAUSES
_SEVERITY_RANK = {"info": 0, "warning": 1, "error": 2}
DEFAULT_LOG_EVERY = 10


def cause_label(cause: Any) -> str:
    """The human label of a cause code; empty when the row has none (runs before causes)."""
    if cause is None or cause == "":
        return ""
    return CAUSE_LABELS.get(str(cause), str(cause))


def batch_text(batch: Any, width: int = 48) -> str:
    """A batch id as short text: strings as they are, other JSON values compact."""
    if batch is None:
        return ""
    text = batch if isinstance(batch, str) else json.dumps(batch, separators=(",", ":"))
    return text if len(text) <= width else text[: width - 1] + "…"


def advice_texts(event: dict[str, Any]) -> list[str]:
    """The advice sentences of an event, in its order (a bare string is its own text)."""
    out = []
    for item in event.get("advice") or ():
        text = item.get("text", "") if isinstance(item, dict) else item
        if isinstance(text, str) and text.strip():
            out.append(text.strip())
    return out


def kind_text(event: dict[str, Any]) -> str:
    """The event's kind, with the metric for a spike (a loss and a gradient-norm spike differ)."""
    kind = str(event.get("kind", ""))
    metric = event.get("metric")
    return f"{kind} ({metric})" if kind == "spike" and metric else kind


def _evidence(event: dict[str, Any]) -> dict[str, Any]:
    evidence = event.get("evidence")
    return evidence if isinstance(evidence, dict) else {}


@dataclass
class Episode:
    """Warning and error events with one onset and one cause, as the report tells them.

    Attributes:
        first: the onset step.
        last: the last step of the longest streak in it.
        count: how many times that streak was seen (steps, or drains for some kinds).
        severity: the worst severity of its events.
        cause: the cause code (empty when the rows have none).
        kinds: what was seen, e.g. ``spike (loss)``, in order of appearance.
        layers: the layers named, without repeats.
        batches: the batch ids at the onset, as text.
        summaries: the evidence sentences, without repeats.
        outliers: the examples whose loss stands out (``evidence.outliers``).
        advice: the advice sentences, without repeats, most effective first.
        skipped_batches: the batches a rollback skipped.
        skipped_steps: the steps a rollback undid, ``(first, last)``.
    """

    first: int
    last: int
    count: int
    severity: str
    cause: str
    kinds: list[str]
    layers: list[str]
    batches: list[str]
    summaries: list[str]
    outliers: list[dict[str, Any]]
    advice: list[str]
    skipped_batches: list[str]
    skipped_steps: tuple[int, int] | None

    def add(self, event: dict[str, Any]) -> None:
        """Fold one more event (same onset and cause) into the episode."""
        self.last = max(self.last, int(event["last_step"]))
        self.count = max(self.count, int(event["count"]))
        if _SEVERITY_RANK[severity(event)] > _SEVERITY_RANK[self.severity]:
            self.severity = severity(event)
        _extend(self.kinds, [kind_text(event)])
        _extend(self.layers, [str(n) for n in event.get("layers") or ()])
        _extend(self.batches, [batch_text(event.get("batch"))] if "batch" in event else [])
        evidence = _evidence(event)
        summary = evidence.get("summary")
        _extend(self.summaries, [summary.strip()] if isinstance(summary, str) else [])
        outliers = evidence.get("outliers")
        if isinstance(outliers, list) and not self.outliers:
            self.outliers = [o for o in outliers if isinstance(o, dict)]
        _extend(self.advice, advice_texts(event))
        skipped = evidence.get("skipped_batches")
        if isinstance(skipped, list):
            _extend(self.skipped_batches, [batch_text(b) for b in skipped])
        steps = evidence.get("skipped_steps")
        if isinstance(steps, list) and len(steps) == 2 and self.skipped_steps is None:
            lo, hi = number(steps[0]), number(steps[1])
            if math.isfinite(lo) and math.isfinite(hi):
                self.skipped_steps = (int(lo), int(hi))


def _extend(items: list[str], new: list[str]) -> None:
    items.extend(x for x in new if x and x not in items)


def episodes(run: RunData) -> list[Episode]:
    """The warning and error events grouped by onset and cause, ordered by onset."""
    found: dict[tuple[int, str], Episode] = {}
    for event in run.events:
        if severity(event) == "info":
            continue
        first = int(event["first_step"])
        cause = str(event.get("cause") or "")
        key = (first, cause)
        if key not in found:
            found[key] = Episode(
                first, first, 1, "warning", cause, [], [], [], [], [], [], [], None
            )
        found[key].add(event)
    return sorted(found.values(), key=lambda e: e.first)


def log_every(run: RunData) -> int:
    """The guard's ``log_every`` from ``meta.json`` (10, the default, when absent)."""
    value = number(dict(run.meta.get("config", {})).get("log_every"))
    return int(value) if math.isfinite(value) and value >= 1 else DEFAULT_LOG_EVERY


@dataclass(frozen=True)
class StopRequest:
    """When the guard set ``should_stop``, which event did, and where training ended.

    Attributes:
        at: the step at which ``should_stop`` was set.
        kind: the kind of the event that set it.
        onset: that event's first step.
        ended: the last step in ``metrics.jsonl``.
        log_every: the guard's drain interval: the loop can only see the request at a
            drain, so ending up to one interval after it counts as stopping.
        inferred: True for runs written before ``stop_requested_at`` existed: a
            divergence set ``should_stop`` at the drain after its step, estimated here.
    """

    at: int
    kind: str
    onset: int
    ended: int
    log_every: int
    inferred: bool

    @property
    def ignored(self) -> bool:
        """The loop went on more than one log interval past the request."""
        return self.ended - self.at > self.log_every

    def sentence(self) -> str:
        """``stop requested at step N (by KIND at step M)`` and where training really ended."""
        about = "about " if self.inferred else ""
        head = f"stop requested at {about}step {self.at} (by {self.kind} at step {self.onset})"
        if self.ignored:
            return (
                f"{head}, but the loop went on to step {self.ended}: it did not stop "
                "(it did not check guard.should_stop)"
            )
        return f"{head}; training ended at step {self.ended}"


def stop_request(run: RunData) -> StopRequest | None:
    """The first stop request of the run, or None when the guard never asked to stop.

    Events carry ``extra.stop_requested_at``; a divergence without it (a run written
    before it existed) set ``should_stop`` at the drain closing its log interval.
    """
    if not run.metrics:
        return None
    ended = int(run.steps.max())
    every = log_every(run)
    found: list[StopRequest] = []
    for event in run.events:
        extra = event.get("extra")
        at = step_of(extra, "stop_requested_at") if isinstance(extra, dict) else None
        inferred = at is None
        if at is None and event.get("kind") == "divergence":
            at = min(ended, -(-int(event["last_step"]) // every) * every)
        if at is not None:
            kind = str(event.get("kind", ""))
            found.append(StopRequest(at, kind, int(event["first_step"]), ended, every, inferred))
    return min(found, key=lambda s: s.at) if found else None
