"""The recovery policy: when to roll back, to which snapshot, and the LR cool-down after."""

from __future__ import annotations

import copy
import math
import os
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from gradguard import _distributed
from gradguard._repr import arguments_repr
from gradguard.errors import ConfigError, GradGuardError
from gradguard.records import Event, Window
from gradguard.recover.snapshots import _Snapshots
from gradguard.recover.state import (
    _GuardLike,
    _load_scaler_state,
    _materialize,
    _Mirror,
    _set_rng_state,
    _Snapshot,
    _Unusable,
)
from gradguard.recover.storage import _agree, _describe, _remove, _remove_leftovers, _sharded, _Undo

Trigger = Literal["spike", "exploding", "nonfinite_streak", "overflow", "divergence", "vanishing"]
_TRIGGERS = ("spike", "exploding", "nonfinite_streak", "overflow", "divergence", "vanishing")


class Rollback(_Snapshots):
    """Snapshot every ``every`` steps; on a blow-up, restore the last good one and cool down.

    Every ``every`` steps it copies the model, optimizer, LR scheduler, GradScaler, the
    guard's own state (clip policy, detectors, step counter) and the RNG states (torch CPU
    and CUDA, Python, NumPy), keeping the ``keep`` newest. When the guard's detectors raise
    an event whose kind is in ``on`` (or ``nonfinite_streak`` consecutive steps were
    skipped), it restores the newest snapshot taken before the update that preceded the
    event's onset (the loss of step t is computed on the weights of step t - 1), multiplies
    every group's LR by ``lr_factor`` for ``cooldown`` optimizer steps (only during the
    step itself: the schedule resumes untouched afterwards), and emits a ``rollback``
    event, then a ``cooldown`` event when the cool-down ends. The data loader simply moves
    on: the batches between the snapshot and the blow-up are skipped, as in the PaLM
    recipe. After ``max_rollbacks`` rollbacks it raises :class:`GradGuardError`
    (``on_exhausted="raise"``) or sets ``guard.should_stop`` (``"stop"``).

    Storage faults never escape ``guard.step``. A snapshot is read whole into host memory
    and checked against the model and optimizer (keys, shapes) before anything is applied;
    one that cannot be read or does not fit (torn, deleted, unreadable, foreign) is
    skipped for the next older one, and the ``rollback`` event lists it in
    ``extra["unreadable"]``. When none is left, the rollback is exhausted: it raises
    :class:`GradGuardError` naming every snapshot tried (``on_exhausted="raise"``) or sets
    ``guard.should_stop`` with an ``error`` event naming them (``"stop"``). A disk write
    that fails (directory gone or read-only, disk full) removes its temporary file and
    becomes a ``snapshot_failed`` warning at the next drain; the run keeps its older
    snapshots and the next snapshot tries again, recreating the directory if it vanished.

    Defaults: ``every=100`` and ``keep=2`` follow the PaLM recipe (rewind ~100 steps) with
    one older snapshot in reserve, in case the newest already holds the damage; halving the
    LR for 200 steps lets Adam's moments re-settle before the full LR returns.

    Memory: one snapshot holds the parameters and buffers plus the optimizer state (AdamW:
    3x the parameters), in CPU memory (pinned when the model is on CUDA); ``keep``
    snapshots hold ``keep`` times that. ``snapshot_nbytes`` reports it.

    Args:
        every: steps between snapshots; a multiple of the guard's ``log_every``.
        keep: snapshots kept (newest first).
        on: event kinds that trigger a rollback.
        lr_factor: LR multiplier during the cool-down, in (0, 1].
        cooldown: optimizer steps of cool-down.
        max_rollbacks: rollbacks allowed before giving up.
        storage: ``"memory"`` or ``"disk"`` (atomic ``torch.save``: temp file + rename).
        path: the directory for disk snapshots; one per run (temporary files left there
            by a crash are removed when the guard is built).
        nonfinite_streak: consecutive skipped steps that count as a ``nonfinite_streak``.
        on_exhausted: ``"raise"`` or ``"stop"`` when ``max_rollbacks`` is used up.
        spike_metrics: which spikes trigger: by default loss spikes only, since a gradient
            spike is clipped or skipped before it reaches the weights, while a loss spike
            means the weights were already hurt. Add ``"grad_norm"`` when running without
            a clip policy: every gradient-norm spike then triggers, even one of ``info``
            severity. A lasting shift of the loss's level triggers whatever its severity:
            the weights were moved and did not come back. Other events trigger only at
            ``warning`` or ``error`` severity (a passing loss spike near a low loss is
            ``info`` and leaves the run alone).

    References:
        Chowdhery et al. 2022, "PaLM: Scaling Language Modeling with Pathways", sec. 5.1.
    """

    def __init__(
        self,
        every: int = 100,
        keep: int = 2,
        on: Sequence[Trigger] = ("spike", "exploding", "nonfinite_streak"),
        lr_factor: float = 0.5,
        cooldown: int = 200,
        max_rollbacks: int = 10,
        storage: Literal["memory", "disk"] = "memory",
        path: str | os.PathLike[str] | None = None,
        nonfinite_streak: int = 5,
        on_exhausted: Literal["raise", "stop"] = "raise",
        spike_metrics: Sequence[str] = ("loss",),
    ) -> None:
        self.every = _positive_int("every", every)
        self.keep = _positive_int("keep", keep)
        self.on = tuple(on)
        for kind in self.on:
            if kind not in _TRIGGERS:
                raise ConfigError(f"on: unknown trigger {kind!r}; choose from {_TRIGGERS}.")
        if not isinstance(lr_factor, int | float) or not 0 < lr_factor <= 1:
            raise ConfigError(f"lr_factor must lie in (0, 1], got {lr_factor!r}.")
        self.lr_factor = float(lr_factor)
        self.cooldown = _positive_int("cooldown", cooldown, minimum=0)
        self.max_rollbacks = _positive_int("max_rollbacks", max_rollbacks, minimum=0)
        if storage not in ("memory", "disk"):
            raise ConfigError(f"storage must be 'memory' or 'disk', got {storage!r}.")
        if storage == "disk" and path is None:
            raise ConfigError("storage='disk' needs path=, a directory for the snapshots.")
        self.storage = storage
        self.path = None if path is None else Path(path)
        self.nonfinite_streak = _positive_int("nonfinite_streak", nonfinite_streak)
        if on_exhausted not in ("raise", "stop"):
            raise ConfigError(f"on_exhausted must be 'raise' or 'stop', got {on_exhausted!r}.")
        self.on_exhausted = on_exhausted
        if isinstance(spike_metrics, str) or not set(spike_metrics) <= {"loss", "grad_norm"}:
            raise ConfigError(
                f"spike_metrics must be a list of 'loss' and 'grad_norm', got {spike_metrics!r}."
            )
        self.spike_metrics = tuple(spike_metrics)
        self.rollbacks = 0
        self._cooldown_left = 0
        self._streak = 0
        self._streak_onset = 0
        self._snapshots: deque[_Snapshot] = deque(maxlen=self.keep)
        self._mirrors = [_Mirror() for _ in range(self.keep)]
        self._guard: _GuardLike | None = None
        self._pending: list[Event] = []
        self._rolled_back_now = False
        self._snapshot_next = False
        self._since_snapshot = 0  # steps taken since the last snapshot (or restore)

    __repr__ = arguments_repr

    # --- the guard's hooks ---------------------------------------------------------------

    def attach(self, guard: _GuardLike) -> None:
        """Check the cadence and take the first snapshot (step 0).

        A Rollback belongs to one guard: its snapshots are that guard's model and
        optimizer, so a second guard is refused (a rollback would load the other model's
        weights) unless the first one was closed.
        """
        owner = getattr(self, "_guard", None)
        if owner is not None and owner is not guard and not getattr(owner, "_closed", False):
            raise ConfigError(
                "this Rollback already belongs to another Guard (its snapshots hold that "
                "guard's model and optimizer): give each Guard its own gg.Rollback(...)."
            )
        if self.every % guard.log_every:
            raise ConfigError(
                f"Rollback(every={self.every}) must be a multiple of the guard's "
                f"log_every={guard.log_every}, so snapshots fall right after a drain."
            )
        if self.storage == "disk":
            self._prepare_directory(guard)
        self._guard = guard
        self.snapshot()
        if self.storage == "disk" and not self._snapshots:
            self._guard = None  # the guard is not built: this Rollback stays free
            failed = self._pending.pop()
            raise ConfigError(
                f"Rollback(path={str(self.path)!r}): the first snapshot could not be written "
                f"({failed.extra['error']}); give a directory the run can write to."
            )

    def _prepare_directory(self, guard: _GuardLike) -> None:
        """Create the directory and remove what a crash mid-write left there.

        A crash between ``torch.save`` and the rename leaves a ``*.pt.tmp`` file (or a
        ``snapshot-*.tmp`` directory for FSDP2): never a snapshot, only disk space. Under
        DDP each rank removes its own files; the FSDP2 directories are rank 0's, and the
        ranks wait for it (the first snapshot, right after, is collective anyway).
        """
        assert self.path is not None
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            _remove_leftovers(self.path)
        except OSError as error:
            raise ConfigError(
                f"Rollback(path={str(self.path)!r}) cannot use that directory for snapshots "
                f"({_describe(error)})."
            ) from error
        if _sharded(guard) and _distributed.available():
            torch.distributed.barrier()

    def after_step(self, guard: _GuardLike) -> None:
        """Take a snapshot every ``every`` steps and count down the cool-down."""
        if self._rolled_back_now:
            self._rolled_back_now = False  # this step was undone: the cool-down starts next
            return
        self._since_snapshot += 1
        if self._cooldown_left > 0:
            self._cooldown_left -= 1
            if self._cooldown_left == 0:
                guard.lr_factor = 1.0
                self._pending.append(
                    Event(
                        step=guard.step_count,
                        kind="cooldown",
                        value=self.lr_factor,
                        threshold=math.nan,
                        metric="lr_factor",
                        message=(
                            f"Cool-down over after {self.cooldown} steps at {self.lr_factor}x "
                            "the learning rate: the schedule resumes."
                        ),
                        severity="info",
                    )
                )
        # Counted in steps taken, not by the step's number: a run resumed (or numbered by
        # a trainer) at any step keeps its snapshots right after its own drains.
        if guard.buffered == 0 and (self._since_snapshot >= self.every or self._snapshot_next):
            self._snapshot_next = False
            self.snapshot()

    def on_drain(self, guard: _GuardLike, window: Window, events: Sequence[Event]) -> list[Event]:
        """Roll back if a triggering event (or a streak of skipped steps) is in this drain.

        Returns the events queued since the last drain (``cooldown``, ``snapshot_failed``),
        then the ``rollback`` event if one fired. When the rollback raises (exhausted),
        the queued events stay queued for the next drain.
        """
        trigger = self._trigger(window, events)
        rollback = [] if trigger is None else [self._roll_back(guard, trigger)]
        out, self._pending = self._pending, []
        return [*out, *rollback]

    # --- rolling back --------------------------------------------------------------------

    def _trigger(self, window: Window, events: Sequence[Event]) -> Event | None:
        streak_event = self._follow_streak(window)
        for event in events:
            if event.kind == "spike" and event.metric not in self.spike_metrics:
                continue  # a gradient spike was clipped or skipped: the weights are unhurt
            opted_in = event.kind == "spike" and event.metric == "grad_norm"
            lasting = event.kind == "spike" and bool(event.extra.get("shift"))
            if not (event.needs_attention or opted_in or lasting):
                continue  # an info event that passed: nothing to undo
            if event.kind in self.on:
                return event
        if "nonfinite_streak" in self.on:
            return streak_event
        return None

    def _follow_streak(self, window: Window) -> Event | None:
        found: Event | None = None
        for step, skipped in zip(window.steps, window.skipped, strict=True):
            if not skipped:
                self._streak = 0
                continue
            if self._streak == 0:
                self._streak_onset = int(step)
            self._streak += 1
            if self._streak == self.nonfinite_streak:
                found = Event(
                    step=self._streak_onset,
                    kind="nonfinite",
                    value=float(self._streak),
                    threshold=float(self.nonfinite_streak),
                    metric="skipped_steps",
                    message=f"{self._streak} consecutive steps skipped (non-finite gradients).",
                    severity="warning",
                )
        return found

    def _roll_back(self, guard: _GuardLike, trigger: Event) -> Event:
        onset = int(trigger.extra.get("onset", trigger.step))
        # The loss and gradients of step t are computed on the weights the update of step
        # t - 1 produced: a snapshot taken at t - 1 or later may already hold the damage.
        usable = [s for s in self._snapshots if s.step < onset - 1]
        if not usable or self.rollbacks >= self.max_rollbacks:
            return self._give_up(guard, trigger, "no snapshot predates it" if not usable else "")
        # Drop snapshots taken after the onset: they may already hold the damage.
        for dropped in (s for s in self._snapshots if s.step >= onset - 1 and s.file):
            _remove(dropped.file)  # type: ignore[arg-type]
        self._snapshots = deque(usable, maxlen=self.keep)
        now = guard.step_count
        snapshot, unusable = self._restore_newest(guard)
        if snapshot is None:
            return self._give_up(guard, trigger, "no snapshot could be restored", unusable)
        self.rollbacks += 1
        self._rolled_back_now = True
        self._since_snapshot = 0
        self._streak = 0
        self._cooldown_left = self.cooldown
        guard.lr_factor = self.lr_factor if self.cooldown else 1.0
        skipped = (
            f" Skipped {len(unusable)} unusable newer snapshot(s): "
            + "; ".join(f"{u['name']} ({u['error']})" for u in unusable)
            + "."
            if unusable
            else ""
        )
        return Event(
            step=now,
            kind="rollback",
            value=float(snapshot.step),
            threshold=float(onset),
            metric="restored_step",
            message=(
                f"Rolled back from step {now} to the snapshot of step {snapshot.step}, before "
                f"the {trigger.kind} at step {onset}; learning rate x{self.lr_factor} for "
                f"{self.cooldown} steps. The batches in between are skipped "
                f"(rollback {self.rollbacks} of at most {self.max_rollbacks}).{skipped}"
            ),
            extra={
                "trigger": trigger.kind,
                "trigger_step": trigger.step,
                "undone": [snapshot.step + 1, now],
                "cooldown": self.cooldown,
                **({"unreadable": unusable} if unusable else {}),
            },
            severity="warning",
        )

    def _restore_newest(self, guard: _GuardLike) -> tuple[_Snapshot | None, list[dict[str, Any]]]:
        """Restore the newest snapshot that loads and fits, dropping the ones that do not.

        Returns the snapshot restored (None when none could be) and, for each one skipped,
        ``{"file", "name", "step", "error"}``. An unusable snapshot is forgotten (a rollback
        will not try it again) but its file stays on disk for inspection: the same step's
        next snapshot replaces it. Under DDP or FSDP2 the ranks agree on each snapshot, so
        all of them restore the same step even when one rank's file is the bad one.
        """
        unusable: list[dict[str, Any]] = []
        while self._snapshots:
            snapshot = self._snapshots[-1]
            error = None
            try:
                self._restore(guard, self._load(snapshot))
            except _Unusable as found:
                error = str(found)
            if _agree(error is None, guard.device):
                return snapshot, unusable
            self._snapshots.pop()
            unusable.append(
                {
                    "file": None if snapshot.file is None else str(snapshot.file),
                    "name": snapshot.name(),
                    "step": snapshot.step,
                    "error": error or "unusable on another rank",
                }
            )
        return None, unusable

    def _give_up(
        self,
        guard: _GuardLike,
        trigger: Event,
        why: str,
        unusable: Sequence[Mapping[str, Any]] = (),
    ) -> Event:
        """No rollback: when exhausted, raise or ask the loop to stop; else go on as it is.

        Exhausted means ``max_rollbacks`` used up (``why`` empty), or snapshots that
        predate the onset exist but none could be restored (``unusable`` lists them): the
        run relied on a rollback that cannot happen. When no snapshot predates the onset
        at all, training goes on unrestored, as before.
        """
        exhausted = not why or bool(unusable)
        reason = why or f"{self.max_rollbacks} rollbacks used up"
        if unusable:
            reason += "; tried " + "; ".join(f"{u['name']} ({u['error']})" for u in unusable)
        message = (
            f"Cannot roll back after the {trigger.kind} at step {trigger.step}: {reason}. "
            "Lower the learning rate or clip harder, then restart from a checkpoint."
        )
        if self.on_exhausted == "raise" and exhausted:
            raise GradGuardError(message)
        guard.should_stop = guard.should_stop or exhausted
        return Event(
            step=guard.step_count,
            kind="rollback",
            value=math.nan,
            threshold=float(trigger.step),
            metric="restored_step",
            message=message,
            severity="error",
            extra={
                "trigger": trigger.kind,
                "trigger_step": trigger.step,
                **({"unreadable": [dict(u) for u in unusable]} if unusable else {}),
            },
        )

    def _restore(self, guard: _GuardLike, payload: Mapping[str, Any]) -> None:
        """Apply a checked payload, all of it or nothing.

        The model's keys and shapes were checked beforehand, so its ``load_state_dict``
        comes last: what may still fail (the optimizer's, the scheduler's, the guard's own
        state) is put back as it was before :class:`_Unusable` is raised.
        """
        undo = _Undo.capture(guard)
        try:
            if "dcp" in payload:
                from torch.distributed.checkpoint.state_dict import set_state_dict

                self._restore_rest(guard, payload)
                set_state_dict(
                    guard.model,
                    guard.optimizer,
                    model_state_dict=payload["dcp"]["model"],
                    optim_state_dict=payload["dcp"]["optimizer"],
                )
                return
            model_state = _materialize(payload["model"], guard.device)
            optimizer_state = _materialize(payload["optimizer"], guard.device)
            self._restore_rest(guard, payload)
            guard.optimizer.load_state_dict(optimizer_state)
            guard.model.load_state_dict(model_state)
        except Exception as error:  # a checked payload that still fails: put it all back
            undo.apply(guard)
            raise _Unusable(f"could not be applied: {_describe(error)}") from error

    def _restore_rest(self, guard: _GuardLike, payload: Mapping[str, Any]) -> None:
        """Scheduler, scaler, the guard's own state and the RNG streams."""
        if guard.scheduler is not None and payload["scheduler"] is not None:
            guard.scheduler.load_state_dict(copy.deepcopy(payload["scheduler"]))
        _load_scaler_state(guard.scaler, payload["scaler"])
        guard.load_recovery_state(payload["guard"])
        _set_rng_state(payload["rng"])

    def state_dict(self) -> dict[str, Any]:
        """Counters for resuming (snapshots are not included: they are the run itself)."""
        return {
            "rollbacks": self.rollbacks,
            "cooldown_left": self._cooldown_left,
            "streak": self._streak,
            "streak_onset": self._streak_onset,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the counters saved by :meth:`state_dict`.

        Snapshots taken before the load describe another state (often the fresh model the
        guard was built around): they are dropped, and a new one is taken at the next
        drain, so a rollback never rewinds a resumed run to before its checkpoint.
        """
        self._snapshots.clear()
        self._snapshot_next = True
        self.rollbacks = int(state["rollbacks"])
        self._cooldown_left = int(state["cooldown_left"])
        self._streak = int(state["streak"])
        self._streak_onset = int(state["streak_onset"])


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return value
