"""Tools for testing training loops: deterministic fault injection (:mod:`.faults`)."""

from __future__ import annotations

from gradguard.testing.faults import Fault, FaultInjector

__all__ = ["Fault", "FaultInjector"]
