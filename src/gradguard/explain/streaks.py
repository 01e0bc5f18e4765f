"""Consecutive events of one kind and cause, written as one event with a count."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from gradguard.records import Event

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
