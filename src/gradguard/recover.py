"""Recovery: roll back to an in-memory (or on-disk) snapshot after a blow-up, then cool down.

The recipe large runs (PaLM, BLOOM, OLMo) apply by hand after a loss spike: rewind to a
checkpoint from ~100 steps earlier, skip the data in between, and lower the learning rate
for a while. :class:`Rollback` does it automatically when the guard's detectors raise a
triggering event. It reads records (events, windows) and drives the objects the guard was
given; it never imports the guard.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import shutil
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from gradguard import _distributed
from gradguard.errors import ConfigError, GradGuardError
from gradguard.records import Event, Window

Trigger = Literal["spike", "exploding", "nonfinite_streak", "overflow", "divergence", "vanishing"]
_TRIGGERS = ("spike", "exploding", "nonfinite_streak", "overflow", "divergence", "vanishing")


class _GuardLike(Protocol):
    """The parts of a guard a recovery drives (kept structural: no import of the guard)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    log_every: int
    step_count: int
    should_stop: bool
    lr_factor: float
    device: torch.device

    def recovery_state(self) -> dict[str, Any]: ...

    def load_recovery_state(self, state: Mapping[str, Any]) -> None: ...


@dataclass(frozen=True)
class _Shard:
    """A DTensor's local shard in a snapshot, with what rebuilds the DTensor around it."""

    local: Tensor
    mesh: Any
    placements: tuple[Any, ...]
    shape: torch.Size
    stride: tuple[int, ...]

    def rebuild(self, device: torch.device) -> Tensor:
        """The DTensor again, its local shard copied to ``device`` (no communication)."""
        from torch.distributed.tensor import DTensor

        rebuilt: Tensor = DTensor.from_local(
            self.local.to(device, copy=True),
            self.mesh,
            self.placements,
            run_check=False,
            shape=self.shape,
            stride=self.stride,
        )
        return rebuilt


def _materialize(tree: Any, device: torch.device) -> Any:
    """A snapshot tree ready to load: shards rebuilt as DTensors, the rest deep-copied."""
    if isinstance(tree, _Shard):
        return tree.rebuild(device)
    if isinstance(tree, Tensor):
        return tree.clone()  # an optimizer may keep what it loads: never the snapshot's buffer
    if isinstance(tree, Mapping):
        out = {k: _materialize(v, device) for k, v in tree.items()}
        metadata = getattr(tree, "_metadata", None)
        if metadata is not None:
            ordered: Any = OrderedDict(out)
            ordered._metadata = metadata
            return ordered
        return out
    if isinstance(tree, list | tuple):
        return type(tree)(_materialize(v, device) for v in tree)
    return copy.deepcopy(tree)


class _Mirror:
    """Preallocated CPU copies of a nested structure of tensors, reused snapshot after snapshot.

    Tensors are copied into buffers allocated at the first capture (pinned when the source
    lives on CUDA, with non-blocking copies); everything else is deep-copied (small).
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}
        self._event: torch.cuda.Event | None = None

    def capture(self, tree: Any) -> Any:
        """Copy ``tree`` into the buffers and return the copy (buffers shared across calls)."""
        cuda = False

        def walk(value: Any, key: str) -> Any:
            nonlocal cuda
            if _distributed.is_dtensor(value):  # FSDP2: each rank keeps its own shard
                return _Shard(
                    walk(_distributed.local(value), key),
                    value.device_mesh,
                    tuple(value.placements),
                    value.shape,
                    value.stride(),
                )
            if isinstance(value, Tensor):
                buffer = self._buffers.get(key)
                if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
                    pin = value.is_cuda
                    buffer = torch.empty(value.shape, dtype=value.dtype, pin_memory=pin)
                    self._buffers[key] = buffer
                cuda = cuda or value.is_cuda
                buffer.copy_(value.detach(), non_blocking=value.is_cuda)
                return buffer
            if isinstance(value, Mapping):
                out = {k: walk(v, f"{key}/{k}") for k, v in value.items()}
                metadata = getattr(value, "_metadata", None)  # module versions, for loading
                if metadata is not None:
                    ordered: Any = OrderedDict(out)
                    ordered._metadata = copy.deepcopy(metadata)
                    return ordered
                return out
            if isinstance(value, list | tuple):
                return type(value)(walk(v, f"{key}/{i}") for i, v in enumerate(value))
            return copy.deepcopy(value)

        result = walk(tree, "")
        if cuda:
            self._event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            self._event.record()
        return result

    def wait(self) -> None:
        """Block until the copies of the last capture have landed (before reading them)."""
        if self._event is not None:
            self._event.synchronize()

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _scaler_state(scaler: Any) -> dict[str, Any] | None:
    """The scaler's state without a host sync: its scale and growth tracker tensors."""
    if scaler is None:
        return None
    scale, tracker = getattr(scaler, "_scale", None), getattr(scaler, "_growth_tracker", None)
    if isinstance(scale, Tensor) and isinstance(tracker, Tensor):
        return {"_scale": scale, "_growth_tracker": tracker}
    return {"state_dict": scaler.state_dict()}  # not yet used: no tensors to copy


def _load_scaler_state(scaler: Any, state: Mapping[str, Any] | None) -> None:
    if scaler is None or state is None:
        return
    if "state_dict" in state:
        scaler.load_state_dict(state["state_dict"])
        return
    scaler._scale.copy_(state["_scale"])
    scaler._growth_tracker.copy_(state["_growth_tracker"])


@dataclass
class _Snapshot:
    step: int
    payload: dict[str, Any] | None  # in memory; None when on disk
    file: Path | None = None
    mirror: int = -1


class Rollback:
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
        path: the directory for disk snapshots.
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

    def __repr__(self) -> str:
        return (
            f"Rollback(every={self.every}, keep={self.keep}, on={self.on}, "
            f"lr_factor={self.lr_factor}, cooldown={self.cooldown}, "
            f"max_rollbacks={self.max_rollbacks}, storage={self.storage!r})"
        )

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
            assert self.path is not None
            self.path.mkdir(parents=True, exist_ok=True)
        self._guard = guard
        self.snapshot()

    def after_step(self, guard: _GuardLike) -> None:
        """Take a snapshot every ``every`` steps and count down the cool-down."""
        if self._rolled_back_now:
            self._rolled_back_now = False  # this step was undone: the cool-down starts next
        elif self._cooldown_left > 0:
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
        at_drain = guard.step_count % guard.log_every == 0
        if guard.step_count % self.every == 0 or (self._snapshot_next and at_drain):
            self._snapshot_next = False
            self.snapshot()

    def on_drain(self, guard: _GuardLike, window: Window, events: Sequence[Event]) -> list[Event]:
        """Roll back if a triggering event (or a streak of skipped steps) is in this drain."""
        out, self._pending = self._pending, []
        trigger = self._trigger(window, events)
        if trigger is None:
            return out
        return [*out, self._roll_back(guard, trigger)]

    # --- snapshots ------------------------------------------------------------------------

    def snapshot(self) -> None:
        """Take a snapshot of everything now (the guard calls this every ``every`` steps)."""
        guard = self._require_guard()
        tree = {
            "model": guard.model.state_dict(),
            "optimizer": guard.optimizer.state_dict(),
            "scheduler": None if guard.scheduler is None else guard.scheduler.state_dict(),
            "scaler": _scaler_state(guard.scaler),
            "guard": guard.recovery_state(),
            "rng": _rng_state(),
        }
        step = guard.step_count
        if self._snapshots and self._snapshots[-1].step == step:
            return  # just restored this one
        if self.storage == "disk":
            self._snapshots.append(_Snapshot(step, None, self._write(step, tree)))
            return
        if len(self._snapshots) == self.keep:
            index = self._snapshots[0].mirror  # the one about to be evicted
        else:
            used = {s.mirror for s in self._snapshots}
            index = next(i for i in range(self.keep) if i not in used)
        self._snapshots.append(_Snapshot(step, self._mirrors[index].capture(tree), mirror=index))

    def _write(self, step: int, tree: Mapping[str, Any]) -> Path:
        """Save atomically (temp file + rename), then drop snapshots beyond ``keep``."""
        assert self.path is not None
        if _sharded(self._require_guard()):
            return self._write_sharded(step, tree)
        final = self.path / f"snapshot-{step:09d}{_rank_suffix()}.pt"
        tmp = final.with_suffix(".pt.tmp")
        torch.save(dict(tree), tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
        if len(self._snapshots) == self.keep:
            oldest = self._snapshots[0].file
            if oldest is not None and oldest != final:
                with contextlib.suppress(FileNotFoundError):
                    oldest.unlink()
        return final

    def _write_sharded(self, step: int, tree: Mapping[str, Any]) -> Path:
        """FSDP2: a ``torch.distributed.checkpoint`` directory, renamed into place by rank 0.

        Collective: every rank calls it at the same step. Each rank also saves its own
        scheduler, scaler, guard and RNG state beside the shards.
        """
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        assert self.path is not None
        guard = self._require_guard()
        final = self.path / f"snapshot-{step:09d}"
        tmp = self.path / f"snapshot-{step:09d}.tmp"
        rank = torch.distributed.get_rank()
        model_state, optimizer_state = get_state_dict(guard.model, guard.optimizer)
        dcp.save(  # type: ignore[attr-defined]
            {"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp)
        )
        extras = {k: tree[k] for k in ("scheduler", "scaler", "guard", "rng")}
        torch.save(extras, tmp / f"extras-rank{rank}.pt")
        torch.distributed.barrier()
        if rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)  # a crash before this line leaves only the .tmp directory
            if len(self._snapshots) == self.keep and self._snapshots[0].file is not None:
                shutil.rmtree(self._snapshots[0].file, ignore_errors=True)
        torch.distributed.barrier()
        return final

    def _load(self, snapshot: _Snapshot) -> dict[str, Any]:
        if snapshot.payload is not None:
            for mirror in self._mirrors:
                mirror.wait()
            return snapshot.payload
        assert snapshot.file is not None
        if snapshot.file.is_dir():
            return self._load_sharded(snapshot.file)
        loaded: dict[str, Any] = torch.load(snapshot.file, weights_only=False)
        return loaded

    def _load_sharded(self, directory: Path) -> dict[str, Any]:
        """Load a ``torch.distributed.checkpoint`` snapshot into this rank's shards."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        guard = self._require_guard()
        model_state, optimizer_state = get_state_dict(guard.model, guard.optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=str(directory))  # type: ignore[attr-defined]
        rank = torch.distributed.get_rank()
        extras = torch.load(directory / f"extras-rank{rank}.pt", weights_only=False)
        return {"dcp": state, **extras}

    @property
    def snapshot_steps(self) -> list[int]:
        """Steps of the snapshots held, oldest first."""
        return [s.step for s in self._snapshots]

    @property
    def snapshot_nbytes(self) -> int:
        """CPU memory held by in-memory snapshots (0 on disk)."""
        return sum(m.nbytes for m in self._mirrors)

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
        snapshot = usable[-1]
        # Drop snapshots taken after the onset: they may already hold the damage.
        for dropped in (s for s in self._snapshots if s.step >= onset - 1 and s.file):
            _remove(dropped.file)  # type: ignore[arg-type]
        self._snapshots = deque(usable, maxlen=self.keep)
        now = guard.step_count
        self._restore(guard, self._load(snapshot))
        self.rollbacks += 1
        self._rolled_back_now = True
        self._streak = 0
        self._cooldown_left = self.cooldown
        guard.lr_factor = self.lr_factor if self.cooldown else 1.0
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
                f"(rollback {self.rollbacks} of at most {self.max_rollbacks})."
            ),
            extra={
                "trigger": trigger.kind,
                "trigger_step": trigger.step,
                "undone": [snapshot.step + 1, now],
                "cooldown": self.cooldown,
            },
            severity="warning",
        )

    def _give_up(self, guard: _GuardLike, trigger: Event, why: str) -> Event:
        reason = why or f"{self.max_rollbacks} rollbacks used up"
        message = (
            f"Cannot roll back after the {trigger.kind} at step {trigger.step}: {reason}. "
            "Lower the learning rate or clip harder, then restart from a checkpoint."
        )
        if self.on_exhausted == "raise" and not why:
            raise GradGuardError(message)
        guard.should_stop = guard.should_stop or not why
        return Event(
            step=guard.step_count,
            kind="rollback",
            value=math.nan,
            threshold=float(trigger.step),
            metric="restored_step",
            message=message,
            severity="error",
            extra={"trigger": trigger.kind, "trigger_step": trigger.step},
        )

    def _restore(self, guard: _GuardLike, payload: Mapping[str, Any]) -> None:
        if "dcp" in payload:
            from torch.distributed.checkpoint.state_dict import set_state_dict

            set_state_dict(
                guard.model,
                guard.optimizer,
                model_state_dict=payload["dcp"]["model"],
                optim_state_dict=payload["dcp"]["optimizer"],
            )
            self._restore_rest(guard, payload)
            return
        payload = {
            "model": _materialize(payload["model"], guard.device),
            "optimizer": _materialize(payload["optimizer"], guard.device),
            **{k: v for k, v in payload.items() if k not in ("model", "optimizer")},
        }
        guard.model.load_state_dict(payload["model"])
        guard.optimizer.load_state_dict(payload["optimizer"])
        self._restore_rest(guard, payload)

    def _restore_rest(self, guard: _GuardLike, payload: Mapping[str, Any]) -> None:
        """Scheduler, scaler, the guard's own state and the RNG streams."""
        if guard.scheduler is not None and payload["scheduler"] is not None:
            guard.scheduler.load_state_dict(copy.deepcopy(payload["scheduler"]))
        _load_scaler_state(guard.scaler, payload["scaler"])
        guard.load_recovery_state(payload["guard"])
        _set_rng_state(payload["rng"])

    def _require_guard(self) -> _GuardLike:
        if self._guard is None:
            raise GradGuardError("Rollback is not attached: pass it as Guard(recovery=...).")
        return self._guard

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


def _sharded(guard: _GuardLike) -> bool:
    """True when the model's parameters are DTensors (FSDP2)."""
    return any(_distributed.is_dtensor(p) for p in guard.model.parameters())


def _rank_suffix() -> str:
    """``-rank3`` when several processes write snapshots (DDP), else empty."""
    if _distributed.available() and torch.distributed.get_world_size() > 1:
        return f"-rank{torch.distributed.get_rank()}"
    return ""


def _remove(path: Path) -> None:
    """Delete a snapshot file, or (rank 0 only) a sharded snapshot directory."""
    if path.is_dir():
        if not _distributed.available() or torch.distributed.get_rank() == 0:
            shutil.rmtree(path, ignore_errors=True)
        return
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return value
