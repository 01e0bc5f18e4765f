"""Grouping by (device, dtype) and the fused foreach kernels gradguard runs over gradients.

Every pass over gradients goes through here: one ``torch._foreach_*`` call per
(device, dtype) group, with an honest per-tensor fallback for layouts foreach does not
support (sparse gradients).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

GroupKey = tuple[torch.device, torch.dtype]


def group_indices(tensors: Sequence[Tensor]) -> dict[GroupKey, list[int]]:
    """Return the positions of ``tensors`` grouped by (device, dtype), in first-seen order."""
    groups: dict[GroupKey, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return groups


def vector_norm(
    t: Tensor,
    ord: float = 2.0,
    dim: tuple[int, ...] | None = None,
    keepdim: bool = False,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``torch.linalg.vector_norm`` with a typed result."""
    out: Tensor = torch.linalg.vector_norm(t, ord, dim=dim, keepdim=keepdim, dtype=dtype)
    return out


def norm_of(t: Tensor, ord: float = 2.0, dtype: torch.dtype | None = None) -> Tensor:
    """The ``ord``-norm of one tensor; of a sparse one, the norm of its coalesced values."""
    return vector_norm(t.coalesce()._values() if t.is_sparse else t, ord, dtype=dtype)


def stacked_norms(tensors: list[Tensor], ord: float = 2.0) -> Tensor:
    """Per-tensor ``ord``-norms of one (device, dtype) group as one fp32 vector, fused.

    fp16/bf16 accumulate in fp32 (their own norm overflows at 65504 for fp16); fp64
    accumulates in fp64 and is rounded once. Falls back to one kernel per tensor when the
    fused kernel rejects the list, e.g. for sparse gradients (norm of the coalesced values).
    """
    out_dtype = None if tensors[0].dtype == torch.float64 else torch.float32
    try:
        norms = list(torch._foreach_norm(tensors, ord, dtype=out_dtype))
    except (RuntimeError, NotImplementedError):
        norms = [norm_of(t, ord, out_dtype) for t in tensors]
    return torch.stack(norms).float()


def scale_(groups: Sequence[list[Tensor]], scale: Tensor) -> None:
    """Multiply every tensor of every group in place by the 0-d tensor ``scale``.

    The multiply happens on the device whatever the value of ``scale``: deciding on the host
    whether it differs from 1 would cost a sync (torch's ``clip_grad.py`` makes the same choice).
    Works for sparse gradients too (their stored values are scaled). On the CPU, where
    reading a value costs no device sync, a scale of exactly 1 skips the pass.
    """
    if scale.device.type == "cpu" and scale.item() == 1.0:
        return
    for group in groups:
        if group:
            factor = scale.to(device=group[0].device, dtype=torch.float32, non_blocking=True)
            torch._foreach_mul_(group, factor)


def clamp_(groups: Sequence[list[Tensor]], low: float, high: float) -> None:
    """Clamp every element of every group to ``[low, high]`` in place (value clipping).

    Sparse gradients are clamped entry by entry on their stored values.
    """
    for group in groups:
        if not group:
            continue
        try:
            torch._foreach_clamp_min_(group, low)
            torch._foreach_clamp_max_(group, high)
        except (RuntimeError, NotImplementedError):
            for t in group:
                (t._values() if t.is_sparse else t).clamp_(low, high)
