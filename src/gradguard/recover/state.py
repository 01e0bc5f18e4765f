"""What a snapshot holds, and how it is copied and put back.

The guard's parts a recovery drives (:class:`_GuardLike`, structural: no import of the
guard), the preallocated host copies of a state tree (:class:`_Mirror`, with FSDP2
shards kept as :class:`_Shard`), the RNG and GradScaler states, and a snapshot's record.
"""

from __future__ import annotations

import copy
import random
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from gradguard import _distributed


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
