"""The four extension points of the guard, in one place: what it needs from each object.

A clip policy, a detector, a recovery strategy and a sink are plain objects with these
methods; the guard checks them structurally (``isinstance`` against a runtime-checkable
protocol), so a user's own class needs no base class. The built-in ones live in
``clip``, ``detect``, ``recover``, ``sinks`` and ``trackers``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import Tensor

    from gradguard.guard import Guard
    from gradguard.records import Event, Window
    from gradguard.stats import GradStats

__all__ = ["ClipPolicy", "Detector", "Recovery", "Sink"]


@runtime_checkable
class ClipPolicy(Protocol):
    """What the guard needs from a clipping policy."""

    def clip_(self, stats: GradStats) -> Tensor:
        """Clip the gradients behind ``stats`` in place; return the scale in [0, 1]."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Return the policy's mutable state (config lives in the constructor)."""
        ...

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore state produced by :meth:`state_dict`."""
        ...


@runtime_checkable
class Detector(Protocol):
    """What the guard needs from a detector: a name, ``observe`` and its state."""

    name: str

    def observe(self, window: Window) -> list[Event]:
        """Read one drained window; return the events it shows, in step order."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Return the detector's mutable state as plain JSON-able values."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore state produced by :meth:`state_dict`."""
        ...


@runtime_checkable
class Recovery(Protocol):
    """What the guard needs from a recovery strategy (see ``gradguard.Rollback``)."""

    def attach(self, guard: Guard) -> None:
        """Called once, when the guard is built."""
        ...

    def after_step(self, guard: Guard) -> None:
        """Called after every step (e.g. to take a snapshot every N steps)."""
        ...

    def on_drain(self, guard: Guard, window: Window, events: Sequence[Event]) -> list[Event]:
        """Called at each drain with its steps and the detectors' events; returns its own."""
        ...


@runtime_checkable
class Sink(Protocol):
    """What the guard needs from a destination for its logs."""

    def open(self, meta: Mapping[str, Any]) -> None:
        """Start (or resume) a run described by ``meta``."""
        ...

    def write(self, window: Window, events: Sequence[Event]) -> None:
        """Record the steps of one drain and the events it raised."""
        ...

    def close(self) -> None:
        """Flush and release resources; safe to call twice."""
        ...
