"""Snapshot storage: atomic writes, checked reads, crash leftovers.

A snapshot file is written whole or not at all (temporary file, fsync, rename), read whole
into host memory and checked against the model and optimizer before anything is applied.
:func:`load_latest_snapshot` finds the newest intact snapshot after a crash.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import shutil
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradguard import _distributed
from gradguard.errors import GradGuardError
from gradguard.records import EventKind
from gradguard.recover.state import (
    _GuardLike,
    _load_scaler_state,
    _materialize,
    _rng_state,
    _scaler_state,
    _set_rng_state,
    _Shard,
    _Unusable,
)

#: The kind of the event a storage fault at snapshot time raises (a write that failed, or
#: snapshot files that vanished from the directory).
SNAPSHOT_FAILED: EventKind = "snapshot_failed"

#: What a snapshot file holds (a sharded snapshot holds ``dcp`` in place of the first two).
PAYLOAD_KEYS = ("model", "optimizer", "scheduler", "scaler", "guard", "rng")

#: A finished snapshot file: ``snapshot-<step>.pt``, ``snapshot-<step>-rank<r>.pt`` (DDP).
_SNAPSHOT_FILE = re.compile(r"^snapshot-(\d+)(?:-rank(\d+))?\.pt$")


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
