"""Small tensors of one (device, dtype, shape) measured together: one kernel per shape.

On the CPU a fused ``torch._foreach_*`` kernel still runs tensor by tensor, about 1.5 µs
each, and has no per-row form at all. Stacking the small tensors that share a shape turns
a thousand of them into a copy and one reduction: per-tensor norms of the 500-layer
benchmark MLP's 1,000 gradients take 0.27 ms stacked against 1.54 ms with
``torch._foreach_norm`` (1 thread). Large tensors are measured alone: their kernel
launch is cheap beside their bytes, and a stacked copy would cost a pass over them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

#: Tensors with at most this many elements are stacked with their shape's others. Below
#: it the copy costs less than a kernel call; above it one thread reduces a tensor whole
#: (torch splits reductions across threads from 32,768 elements), so a stacked row is
#: summed in the same order as the tensor alone.
SMALL = 16_384


def shape_batches(tensors: Sequence[Tensor]) -> tuple[tuple[int, ...], ...]:
    """Positions of ``tensors`` in batches: small dense ones by (device, dtype, shape).

    Every position appears once, in first-seen order of its batch. A batch of one is a
    tensor measured alone: a large, sparse or 0-d one, or the only one of its shape.
    """
    batches: dict[object, list[int]] = {}
    for i, t in enumerate(tensors):
        small = t.ndim >= 1 and t.numel() <= SMALL and not t.is_sparse
        key = (t.device, t.dtype, tuple(t.shape)) if small else i
        batches.setdefault(key, []).append(i)
    return tuple(tuple(positions) for positions in batches.values())


def cpu_plan(params: Sequence[Tensor]) -> tuple[tuple[tuple[int, ...], Tensor], ...] | None:
    """For ``grad_stats`` on the CPU: the shape batches of ``params`` with their index tensors.

    The last entry holds the tensors measured alone. None when no two share a shape, or
    off the CPU, where one fused kernel already measures a group in a few launches.
    """
    if any(p.device.type != "cpu" for p in params):
        return None
    batches = shape_batches(params)
    if all(len(b) == 1 for b in batches):
        return None
    alone = tuple(b[0] for b in batches if len(b) == 1)
    stacks = [(b, torch.tensor(b, dtype=torch.long)) for b in batches if len(b) > 1]
    return (*stacks, (alone, torch.tensor(alone, dtype=torch.long)))


def fill_stacked_norms(
    stacks: Sequence[tuple[tuple[int, ...], Tensor]], grads: Sequence[Tensor], norms: Tensor
) -> bool:
    """Write the 2-norm of each stacked gradient into ``norms``; False if one is sparse.

    Accumulated in fp32 (fp64 for fp64): bitwise ``torch._foreach_norm`` tensor by tensor.
    """
    dtype = None if norms.dtype == torch.float64 else torch.float32
    for positions, index in stacks:
        stacked = stack_dense([grads[i] for i in positions])
        if stacked is None:
            return False
        dims = tuple(range(1, stacked.ndim))
        measured: Tensor = torch.linalg.vector_norm(stacked, 2.0, dim=dims, dtype=dtype)
        norms.index_copy_(0, index, measured)
    return True


def stack_dense(tensors: list[Tensor]) -> Tensor | None:
    """One shape batch stacked on a new dim 0; None when a sparse gradient is among them."""
    try:
        stacked = torch.stack(tensors)
    except (RuntimeError, NotImplementedError):
        return None
    return None if stacked.is_sparse else stacked


def views_into(buffer: Tensor, params: Sequence[Tensor], positions: Sequence[int]) -> list[Tensor]:
    """Views into ``buffer`` shaped as ``params[i]`` for each of ``positions``, end to end."""
    views, at = [], 0
    for i in positions:
        size = params[i].numel()
        views.append(buffer[at : at + size].view(params[i].shape))
        at += size
    return views


def flat_copy(tensors: list[Tensor]) -> Tensor | None:
    """``tensors`` (one dtype, any shapes) copied end to end into one 1-d tensor, one call.

    None when there are none, or a sparse one among them.
    """
    if not tensors:
        return None
    try:
        return torch._C._nn.flatten_dense_tensors(tensors)
    except RuntimeError:  # a sparse tensor
        return None


def ratio(after: Tensor, total: Tensor) -> Tensor:
    """``after / total`` in [0, 1] as fp32; 1 when ``total`` is 0 or not finite."""
    ratio = torch.clamp(after / total, 0.0, 1.0)
    good = torch.isfinite(total) & (total > 0)
    return torch.where(good, ratio, torch.ones_like(ratio)).float()
