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
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import re
import shutil
import warnings
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
from gradguard.records import Event, EventKind, Window

Trigger = Literal["spike", "exploding", "nonfinite_streak", "overflow", "divergence", "vanishing"]
_TRIGGERS = ("spike", "exploding", "nonfinite_streak", "overflow", "divergence", "vanishing")

#: The kind of the event a storage fault at snapshot time raises (a write that failed, or
#: snapshot files that vanished from the directory).
SNAPSHOT_FAILED: EventKind = "snapshot_failed"

#: What a snapshot file holds (a sharded snapshot holds ``dcp`` in place of the first two).
PAYLOAD_KEYS = ("model", "optimizer", "scheduler", "scaler", "guard", "rng")

#: A finished snapshot file: ``snapshot-<step>.pt``, ``snapshot-<step>-rank<r>.pt`` (DDP).
_SNAPSHOT_FILE = re.compile(r"^snapshot-(\d+)(?:-rank(\d+))?\.pt$")


class _GuardLike(Protocol):
    """The parts of a guard a recovery drives (kept structural: no import of the guard)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    log_every: int
    step_count: int
    should_stop: bool

    @property
    def buffered(self) -> int:
        """Steps held since the last drain (0 right after one)."""
        ...

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
    lost: bool = False  # its file was found missing (reported once; still tried at a rollback)

    def name(self) -> str:
        """How events and errors name it: its file, or ``memory snapshot of step N``."""
        return f"memory snapshot of step {self.step}" if self.file is None else self.file.name


class _Unusable(Exception):
    """A snapshot that cannot be read or does not fit the guard's objects; says why."""


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

    # --- snapshots ------------------------------------------------------------------------

    def snapshot(self) -> None:
        """Take a snapshot of everything now (the guard calls this every ``every`` steps)."""
        guard = self._require_guard()
        self._since_snapshot = 0
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
            written = self._write(step, tree)
            if written is not None:
                self._snapshots.append(_Snapshot(step, None, written))
            return
        if len(self._snapshots) == self.keep:
            index = self._snapshots[0].mirror  # the one about to be evicted
        else:
            used = {s.mirror for s in self._snapshots}
            index = next(i for i in range(self.keep) if i not in used)
        self._snapshots.append(_Snapshot(step, self._mirrors[index].capture(tree), mirror=index))

    def _write(self, step: int, tree: Mapping[str, Any]) -> Path | None:
        """Save atomically (temp file, fsync, rename), then drop snapshots beyond ``keep``.

        Returns the file, or None when the write failed: its temporary file is removed and
        a ``snapshot_failed`` event is queued, so the run goes on with its older snapshots
        (a crash here would lose the whole run, not one snapshot). The directory is
        recreated if it vanished, and snapshot files that vanished with it are reported.
        Under DDP the ranks agree: when one rank's write fails, every rank drops this
        step, so that all ranks hold the same snapshots and roll back to the same step.
        """
        assert self.path is not None
        guard = self._require_guard()
        if _sharded(guard):
            return self._write_sharded(step, tree)
        final = self.path / f"snapshot-{step:09d}{_rank_suffix()}.pt"
        vanished = not self.path.exists()
        error = _save_atomically(tree, final)
        agreed = _agree(error is None, guard.device)
        if error is None and not agreed:
            _remove(final)
        lost = self._newly_lost()
        if not agreed or lost or vanished:
            event = self._storage_event(step, final, error, agreed, lost, vanished)
            self._pending.append(event)
        if not agreed:
            return None
        if len(self._snapshots) == self.keep:
            oldest = self._snapshots[0].file
            if oldest is not None and oldest != final:
                with contextlib.suppress(OSError):  # a stale file costs space, not the run
                    oldest.unlink()
        return final

    def _newly_lost(self) -> list[_Snapshot]:
        """Snapshots whose file vanished (deleted behind the run's back), not yet reported."""
        lost = [
            s for s in self._snapshots if s.file is not None and not s.lost and not s.file.exists()
        ]
        for snapshot in lost:
            snapshot.lost = True
        return lost

    def _storage_event(
        self,
        step: int,
        file: Path,
        error: BaseException | None,
        agreed: bool,
        lost: Sequence[_Snapshot],
        vanished: bool,
    ) -> Event:
        """The ``snapshot_failed`` warning: the write that failed, the files that vanished."""
        kept = [s.step for s in self._snapshots if not s.lost]
        why = None
        sentences = []
        if vanished:
            again = ": it was recreated" if agreed else ""
            sentences.append(f"The snapshot directory {file.parent} had vanished{again}.")
        if lost:
            names = ", ".join(s.name() for s in lost)
            sentences.append(f"Snapshot files are gone ({names}): a rollback cannot use them.")
        if agreed:
            sentences.append(f"The snapshot of step {step} was written ({file.name}).")
        else:
            why = _describe(error) if error is not None else "another rank's write failed"
            held = ", ".join(map(str, kept)) or "none"
            sentences.append(
                f"The snapshot of step {step} could not be written to {file} ({why}). "
                f"The run keeps its older snapshots (steps: {held}); the next snapshot tries "
                "again."
            )
        return Event(
            step=step,
            kind=SNAPSHOT_FAILED,
            value=float(step),
            threshold=math.nan,
            metric="snapshot_step",
            message=" ".join(sentences),
            severity="warning",
            extra={
                "file": str(file),
                "written": agreed,
                "error": why,
                "lost": [str(s.file) for s in lost],
                "kept": kept,
                "recreated": vanished and file.parent.is_dir(),
            },
        )

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
        """The snapshot's payload, whole in host memory and checked against the guard's objects.

        Raises :class:`_Unusable` (with the reason) for a file that cannot be read, is not
        a snapshot, or does not fit the model and optimizer. Nothing is applied here.
        """
        guard = self._require_guard()
        if snapshot.payload is not None:
            for mirror in self._mirrors:
                mirror.wait()
            payload = snapshot.payload
        else:
            assert snapshot.file is not None
            if _sharded(guard):  # decided alike on every rank: the load is collective
                payload = self._load_sharded(snapshot.file)
            else:
                payload = _read_snapshot_file(snapshot.file)
        _check_payload(payload, guard.model, guard.optimizer)
        return payload

    def _load_sharded(self, directory: Path) -> dict[str, Any]:
        """Load a ``torch.distributed.checkpoint`` snapshot into fresh copies of the shards.

        Collective (every rank reads at the same rollback). The copies keep a torn
        checkpoint from writing into the live model: the shards are applied only once the
        whole snapshot is read (at the price of one more copy of the shards meanwhile).
        """
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import get_state_dict

        guard = self._require_guard()
        model_state, optimizer_state = get_state_dict(guard.model, guard.optimizer)
        state = _fresh_like({"model": model_state, "optimizer": optimizer_state})
        rank = torch.distributed.get_rank()
        try:
            dcp.load(state, checkpoint_id=str(directory))  # type: ignore[attr-defined]
            extras = _read_snapshot_file(directory / f"extras-rank{rank}.pt")
        except (Exception, CheckpointException) as error:  # CheckpointException: BaseException
            raise _Unusable(_describe(error)) from error
        if not isinstance(extras, Mapping):
            raise _Unusable(f"extras-rank{rank}.pt holds a {type(extras).__name__}, not a dict")
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


# --- storage: atomic writes, checked reads, crash leftovers --------------------------------


def load_latest_snapshot(
    path: str | os.PathLike[str], *, rank: int | None = None, model: nn.Module | None = None
) -> tuple[Path, dict[str, Any]]:
    """The newest intact snapshot in a ``Rollback(storage="disk")`` directory: resume after a crash.

    Snapshots are written to a temporary file and renamed into place, so a crash leaves
    the finished ones whole; a file can still be torn or damaged by something else (a
    copy cut short, a failing disk). This reads the ``snapshot-<step>.pt`` files newest
    step first and returns the first that loads whole and holds a complete snapshot
    (model, optimizer, scheduler, scaler, guard and RNG state). Each skipped file is
    named in one :class:`UserWarning`, with the reason. FSDP2 snapshots (directories
    written by ``torch.distributed.checkpoint``) are not read here: load them with
    ``torch.distributed.checkpoint.load`` on every rank.

    Args:
        path: the Rollback's ``path``.
        rank: under DDP, whose files to read (``snapshot-<step>-rank<rank>.pt``); None
            reads the files of a single-process run.
        model: when given, a snapshot whose model state does not fit it (missing or
            unexpected keys, other shapes) is skipped too, so the one returned loads.

    Returns:
        The file and its payload, loaded on the CPU: ``payload["model"]`` and
        ``payload["optimizer"]`` are state dicts, ``payload["guard"]`` is the guard's
        recovery state (``guard.load_recovery_state``), ``payload["rng"]`` the RNG states.

    Raises:
        GradGuardError: the directory cannot be listed, holds no snapshot file, or none
            loads (the message names every file tried and why).
    """
    directory = Path(path)
    files = _snapshot_files(directory, rank)
    failures: list[str] = []
    for file in files:
        try:
            payload = _read_snapshot_file(file)
            _check_structure(payload)
            if model is not None:
                _check_model(payload["model"], model)
        except _Unusable as error:
            failures.append(f"{file.name} ({error})")
            continue
        if failures:
            warnings.warn(
                f"load_latest_snapshot: skipped unusable snapshot(s) in {directory}: "
                + "; ".join(failures),
                stacklevel=2,
            )
        return file, payload
    raise GradGuardError(f"No usable snapshot in {directory}: tried " + "; ".join(failures) + ".")


def _snapshot_files(directory: Path, rank: int | None) -> list[Path]:
    """The finished snapshot files of one rank (or of a single process), newest step first."""
    try:
        names = os.listdir(directory)
    except OSError as error:
        raise GradGuardError(f"Cannot list snapshots in {directory}: {_describe(error)}") from error
    found = []
    for name in names:
        match = _SNAPSHOT_FILE.match(name)
        if match is None or (None if match[2] is None else int(match[2])) != rank:
            continue
        found.append((int(match[1]), directory / name))
    if not found:
        which = "" if rank is None else f" of rank {rank}"
        raise GradGuardError(f"No snapshot file{which} in {directory} (snapshot-<step>.pt).")
    return [file for _, file in sorted(found, reverse=True)]


def _describe(error: BaseException) -> str:
    """An error in one line for an event or a message: its type and text, shortened."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= 300 else text[:297] + "..."


def _read_snapshot_file(file: Path) -> Any:
    """Load a file whole into host memory; any failure becomes the reason it is unusable.

    A torn or foreign file can fail in every way unpickling can (``EOFError``,
    ``UnpicklingError``, torch's ``RuntimeError`` for a broken zip, ``OSError`` when it
    is missing or unreadable), so every exception counts; ``KeyboardInterrupt`` does not.
    ``weights_only=False``: snapshots hold Python and NumPy RNG states; the files are the
    run's own.
    """
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as error:
        raise _Unusable(_describe(error)) from error


def _check_structure(payload: Any) -> None:
    """A snapshot's dict: every part present, state dicts where state dicts belong."""
    if not isinstance(payload, Mapping):
        raise _Unusable(f"holds a {type(payload).__name__}, not a snapshot's dict")
    expected = ("dcp", *PAYLOAD_KEYS[2:]) if "dcp" in payload else PAYLOAD_KEYS
    missing = [key for key in expected if key not in payload]
    if missing:
        raise _Unusable(f"not a complete snapshot: {', '.join(missing)} missing")
    if "dcp" not in payload:
        if not isinstance(payload["model"], Mapping):
            raise _Unusable("its model state is not a state dict")
        optimizer = payload["optimizer"]
        if not isinstance(optimizer, Mapping) or not {"state", "param_groups"} <= set(optimizer):
            raise _Unusable("its optimizer state is not an optimizer's state dict")
    for key in ("guard", "rng"):
        if not isinstance(payload[key], Mapping):
            raise _Unusable(f"its {key} state is not a dict")


def _check_payload(payload: Any, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Whether a payload can be applied to this model and optimizer without a partial load.

    ``model.load_state_dict`` copies tensor after tensor and reports a mismatch only at
    the end, and ``optimizer.load_state_dict`` accepts moments of any shape: both are
    checked here, before anything is applied.
    """
    _check_structure(payload)
    if "dcp" not in payload:  # torch.distributed.checkpoint checked the shards as it loaded
        _check_model(payload["model"], model)
        _check_optimizer(payload["optimizer"], optimizer)


def _shape(value: Any) -> tuple[int, ...] | None:
    """The (global) shape of a tensor or of a snapshot's shard; None for anything else."""
    if isinstance(value, Tensor | _Shard):
        return tuple(value.shape)
    return None


def _check_model(state: Mapping[str, Any], model: nn.Module) -> None:
    """Same keys as the model's state dict, and a tensor of the same shape for each tensor."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise _Unusable(
            "its model state does not match the model: "
            f"missing {_few(missing)}, unexpected {_few(unexpected)}"
        )
    for key, reference in expected.items():
        want, got = _shape(reference), _shape(state[key])
        if want is not None and got != want:
            held = "no tensor" if got is None else f"shape {list(got)}"
            raise _Unusable(
                f"its model state does not match the model: {key!r} holds {held}, "
                f"the model's has shape {list(want)}"
            )


def _check_optimizer(state: Mapping[str, Any], optimizer: torch.optim.Optimizer) -> None:
    """Same groups and group sizes; each state tensor shaped like the optimizer's own.

    Only tensors the optimizer already holds under the same key are compared: optimizers
    keep state of many shapes (factored moments, preconditioners), and the live state is
    the one reference that fits them all.
    """
    groups, saved = state["param_groups"], state["state"]
    if not isinstance(groups, list | tuple) or not isinstance(saved, Mapping):
        raise _Unusable("its optimizer state is not an optimizer's state dict")
    if len(groups) != len(optimizer.param_groups):
        raise _Unusable(
            f"its optimizer has {len(groups)} parameter groups, this one "
            f"{len(optimizer.param_groups)}"
        )
    for i, (group, live) in enumerate(zip(groups, optimizer.param_groups, strict=True)):
        ids = group.get("params") if isinstance(group, Mapping) else None
        if not isinstance(ids, list | tuple) or len(ids) != len(live["params"]):
            raise _Unusable(f"its optimizer's group {i} does not hold this one's parameters")
        for pid, param in zip(ids, live["params"], strict=True):
            _check_optimizer_entry(saved.get(pid), optimizer.state.get(param), pid)


def _check_optimizer_entry(saved: Any, live: Any, pid: Any) -> None:
    if saved is None or not isinstance(live, Mapping):
        return
    if not isinstance(saved, Mapping):
        raise _Unusable(f"its optimizer state of parameter {pid} is not a dict")
    for key, value in saved.items():
        want, got = _shape(live.get(key)), _shape(value)
        if want is not None and got is not None and want != got:
            raise _Unusable(
                f"its optimizer state does not match: {key!r} of parameter {pid} has shape "
                f"{list(got)}, this optimizer's {list(want)}"
            )


def _few(keys: Sequence[str]) -> str:
    """Up to three keys, then how many more: enough to recognise a foreign model."""
    if not keys:
        return "none"
    more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
    return ", ".join(repr(k) for k in keys[:3]) + more


@dataclass
class _Undo:
    """What a restore that fails half-way puts back: every part but the model's weights.

    Cheap: the optimizer's state dict holds references to its current tensors (loading
    another state installs new tensors and leaves these alone); the rest is small.
    """

    optimizer: dict[str, Any]
    scheduler: Any
    scaler: Any
    guard: dict[str, Any]
    rng: dict[str, Any]

    @classmethod
    def capture(cls, guard: _GuardLike) -> _Undo:
        """The current optimizer, scheduler, scaler, guard and RNG state."""
        scheduler = None if guard.scheduler is None else guard.scheduler.state_dict()
        return cls(
            optimizer=guard.optimizer.state_dict(),
            scheduler=copy.deepcopy(scheduler),
            scaler=_materialize(_scaler_state(guard.scaler), guard.device),
            guard=copy.deepcopy(guard.recovery_state()),
            rng=_rng_state(),
        )

    def apply(self, guard: _GuardLike) -> None:
        """Put it all back."""
        guard.optimizer.load_state_dict(self.optimizer)
        if guard.scheduler is not None:
            guard.scheduler.load_state_dict(self.scheduler)
        _load_scaler_state(guard.scaler, self.scaler)
        guard.load_recovery_state(self.guard)
        _set_rng_state(self.rng)


def _agree(ok: bool, device: torch.device) -> bool:
    """Whether every rank succeeded (one all-reduce when several ranks run), else ``ok``.

    Under DDP each rank writes and reads its own files: a fault on one rank must change
    the decision of all of them, or the ranks would hold different snapshots and restore
    different steps.
    """
    if not (_distributed.available() and torch.distributed.get_world_size() > 1):
        return ok
    flag = torch.tensor([1 if ok else 0], device=device)
    _distributed.ALL_REDUCE_CALLS[0] += 1
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def _save_atomically(tree: Mapping[str, Any], final: Path) -> BaseException | None:
    """``torch.save`` to a temporary file, fsync, rename over ``final``: whole or absent.

    Returns None, or the error of a failed write after removing its temporary file:
    ``OSError``, or ``RuntimeError``, the way torch's zip writer reports I/O failures
    (a missing directory, a full disk). The directory is created if it vanished.
    """
    tmp = final.with_suffix(".pt.tmp")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        torch.save(dict(tree), tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except (OSError, RuntimeError) as error:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        return error
    _fsync_directory(final.parent)
    return None


def _fsync_directory(directory: Path) -> None:
    """Make a rename durable (best effort: some filesystems cannot fsync a directory)."""
    with contextlib.suppress(OSError):
        handle = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def _remove_leftovers(directory: Path) -> None:
    """Delete the temporary files and directories of writes a crash interrupted.

    ``*.pt.tmp`` files (this rank's only, under DDP: the others may be writing theirs)
    and, on rank 0 or in a single process, ``snapshot-*.tmp`` directories (FSDP2).
    """
    distributed = _distributed.available() and torch.distributed.get_world_size() > 1
    pattern = f"*{_rank_suffix()}.pt.tmp" if distributed else "*.pt.tmp"
    for file in directory.glob(pattern):
        if not file.is_dir():
            with contextlib.suppress(FileNotFoundError):
                file.unlink()
    if not distributed or torch.distributed.get_rank() == 0:
        for tmp_dir in directory.glob("snapshot-*.tmp"):
            if tmp_dir.is_dir():
                shutil.rmtree(tmp_dir, ignore_errors=True)


def _fresh_like(tree: Any) -> Any:
    """The same structure with new, uninitialised tensors (DTensors keep their layout)."""
    if isinstance(tree, Tensor):
        return torch.empty_like(tree)
    if isinstance(tree, Mapping):
        return {k: _fresh_like(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_fresh_like(v) for v in tree)
    return copy.deepcopy(tree)
