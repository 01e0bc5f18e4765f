"""Taking, writing and loading the snapshots of a :class:`~gradguard.recover.Rollback`."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from gradguard.errors import GradGuardError
from gradguard.records import Event
from gradguard.recover.state import (
    _GuardLike,
    _Mirror,
    _rng_state,
    _scaler_state,
    _Snapshot,
    _Unusable,
)
from gradguard.recover.storage import (
    SNAPSHOT_FAILED,
    _agree,
    _check_payload,
    _describe,
    _fresh_like,
    _rank_suffix,
    _read_snapshot_file,
    _remove,
    _save_atomically,
    _sharded,
)


class _Snapshots:
    """The snapshot part of :class:`~gradguard.recover.Rollback`: take, write and load them.

    The state it reads is set by ``Rollback.__init__``.
    """

    keep: int
    storage: Literal["memory", "disk"]
    path: Path | None
    _snapshots: deque[_Snapshot]
    _mirrors: list[_Mirror]
    _guard: _GuardLike | None
    _pending: list[Event]
    _since_snapshot: int

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

    def _require_guard(self) -> _GuardLike:
        if self._guard is None:
            raise GradGuardError("Rollback is not attached: pass it as Guard(recovery=...).")
        return self._guard
