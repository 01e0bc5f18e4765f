"""What grad_stats needs from torch.distributed: local shards, replica counts, one reduction.

Under FSDP2 (DTensor gradients) every rank holds a shard of each gradient: per-tensor
squared norms are computed from the local shards and summed across ranks in ONE
all-reduce that also carries the loss. Under DDP the gradients are already averaged and
identical on every rank: only the loss, when given, is averaged. Every decision taken
downstream reads these reduced values, so all ranks agree by construction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

#: All-reduces issued by gradguard in this process (tests and benchmarks read it).
ALL_REDUCE_CALLS = [0]


def available() -> bool:
    """True when torch.distributed is built in and a process group is initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_dtensor(t: object) -> bool:
    """True for a ``torch.distributed.tensor.DTensor``."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (no communication), or the tensor itself."""
    local_tensor: Tensor = getattr(t, "_local_tensor", t)
    return local_tensor


def replicas(t: Tensor) -> int:
    """How many ranks hold the same shard of ``t`` (the product of its Replicate mesh dims)."""
    if not is_dtensor(t):
        return 1
    mesh: Any = t.device_mesh  # type: ignore[attr-defined]
    placements: Sequence[Any] = t.placements  # type: ignore[attr-defined]
    return math.prod(mesh.size(i) for i, p in enumerate(placements) if p.is_replicate())


@dataclass(frozen=True)
class Sharding:
    """How a model's gradients are laid out across ranks, found once per layout.

    Attributes:
        sharded: some gradients are DTensors: their norms need a reduction.
        group: the process group to reduce over (None: the default group).
        world: ranks in that group.
        replicas: per trainable tensor, how many ranks hold the same shard (fp64), or
            None when no tensor is replicated.
    """

    sharded: bool
    group: Any
    world: int
    replicas: Tensor | None


def detect(
    model: object, params: Sequence[Tensor], device: torch.device, group: Any = None
) -> Sharding | None:
    """Return how ``params`` are distributed, or None for a single-process model.

    Args:
        model: the module (a ``DistributedDataParallel`` wrapper gives its group).
        params: the trainable parameters, in layout order.
        device: the device of the statistics.
        group: an explicit process group or 1-D device mesh; otherwise detected.
    """
    if not available():
        return None
    sharded = any(is_dtensor(p) for p in params)
    from torch.nn.parallel import DistributedDataParallel

    ddp = isinstance(model, DistributedDataParallel)
    if not (sharded or ddp or group is not None):
        return None
    if group is None and ddp:
        group = model.process_group  # type: ignore[attr-defined]
    if group is None and sharded:
        mesh: Any = next(p for p in params if is_dtensor(p)).device_mesh  # type: ignore[attr-defined]
        group = mesh.get_group() if mesh.ndim == 1 else None
    if hasattr(group, "get_group"):  # a 1-D DeviceMesh was given
        group = group.get_group()
    counts = [replicas(p) for p in params]
    replica_tensor = (
        torch.tensor(counts, dtype=torch.float64, device=device) if max(counts) > 1 else None
    )
    world = torch.distributed.get_world_size(group)
    return Sharding(sharded=sharded, group=group, world=world, replicas=replica_tensor)


def all_reduce_(tensor: Tensor, sharding: Sharding, op: str = "sum") -> Tensor:
    """All-reduce ``tensor`` in place over the sharding's group (counted); return it."""
    reduce_op = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}
    ALL_REDUCE_CALLS[0] += 1
    torch.distributed.all_reduce(tensor, op=reduce_op[op], group=sharding.group)
    return tensor


def reduce_squares_and_loss(
    local_squares: Tensor, loss: Tensor | None, sharding: Sharding
) -> tuple[Tensor, Tensor | None]:
    """Sum the squared norms across ranks (if sharded) and average the loss, in ONE call."""
    parts = [local_squares] if sharding.sharded else []
    if loss is not None:
        parts.append(loss.detach().reshape(1).to(local_squares.device, local_squares.dtype))
    if not parts:
        return local_squares, loss
    payload = all_reduce_(torch.cat(parts), sharding)
    squares = payload[: local_squares.numel()] if sharding.sharded else local_squares
    mean_loss = None if loss is None else (payload[-1] / sharding.world).float()
    return squares, mean_loss
