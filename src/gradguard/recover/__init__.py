"""Recovery: roll back to an in-memory (or on-disk) snapshot after a blow-up, then cool down.

The recipe large runs (PaLM, BLOOM, OLMo) apply by hand after a loss spike: rewind to a
checkpoint from ~100 steps earlier, skip the data in between, and lower the learning rate
for a while. :class:`Rollback` does it automatically when the guard's detectors raise a
triggering event. It reads records (events, windows) and drives the objects the guard was
given; it never imports the guard.

Snapshot storage can fail under a long run: a file torn or deleted behind its back, a
directory removed or made read-only, a full disk. None of these crashes ``guard.step``: a
failed write becomes a ``snapshot_failed`` event and the run keeps its older snapshots; an
unusable snapshot at a rollback is skipped for the next older one, and the ``rollback``
event names it. :func:`load_latest_snapshot` finds the newest intact snapshot after a crash.

The parts: ``rollback`` (:class:`Rollback`: triggers, rolling back, the cool-down),
``snapshots`` (taking, writing and loading snapshots), ``state`` (what a snapshot holds,
copied and put back) and ``storage`` (atomic writes, checked reads, crash leftovers,
:func:`load_latest_snapshot`).
"""

from __future__ import annotations

from gradguard.recover.rollback import Rollback, Trigger
from gradguard.recover.storage import PAYLOAD_KEYS, SNAPSHOT_FAILED, load_latest_snapshot

__all__ = ["PAYLOAD_KEYS", "SNAPSHOT_FAILED", "Rollback", "Trigger", "load_latest_snapshot"]
