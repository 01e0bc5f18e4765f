"""An opt-in flat gradient buffer: every ``.grad`` a view into one tensor per (device, dtype).

As with DDP's ``gradient_as_bucket_view`` and Megatron's contiguous gradient buffer, each
trainable parameter's ``.grad`` becomes a view into one contiguous buffer per
(device, dtype) group, in parameter order. Autograd accumulates into an existing ``.grad``
in place (``grad += new``), so backward, gradient accumulation and autocast keep the views.
``backward(create_graph=True)`` does not: it replaces each ``.grad`` by a new tensor.

What the buffer buys: one kernel where a fused foreach op costs a fraction of a µs per
tensor on the CPU. :func:`gradguard.grad_stats` notices that the gradients are exactly the
views (one identity comparison per tensor, no kernel) and then measures the per-tensor
norms with a few strided reductions over the buffer (one per run of equally long segments
at a fixed stride: the layers of a deep model repeat), and hands the clip policies the
buffers themselves, so a scale or a clamp is one kernel per group.

On the CPU the strided reduction runs the very kernel ``torch._foreach_norm`` runs per
tensor (``linalg.vector_norm`` reduces each row of the strided view as it reduces a
contiguous tensor), so the norms are bitwise those of the per-tensor path. On other
devices the per-tensor norms keep the fused ``_foreach_norm`` over the views (bitwise the
per-tensor path; the kernel is already one launch per few hundred tensors there), and the
buffers still make clipping one kernel.

This module sits below ``stats``: :func:`gradguard.flatten_grads_` (in ``stats``) builds a
:class:`FlatGrads` from the parameter layout; ``grad_stats`` finds it with :func:`find`.
"""

from __future__ import annotations

import operator
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gradguard import _foreach
from gradguard.errors import ConfigError

#: Candidate strides tried per run when planning the strided reductions (setup time only).
_STRIDE_CANDIDATES = 16


@dataclass(frozen=True, eq=False)
class _Run:
    """Equally long segments at a fixed stride: one strided reduction of ``rows`` rows."""

    offset: int
    rows: int
    length: int
    stride: int


def _plan_runs(offsets: Sequence[int], lengths: Sequence[int]) -> tuple[list[_Run], list[int]]:
    """Cover the segments with runs; return them and each segment's row in their outputs.

    Segments of one length are chained greedily: from the first one left, the stride (to
    one of the next few of that length) that chains the most segments wins. A model of
    repeated blocks gives one run per parameter of a block.
    """
    by_length: dict[int, list[int]] = {}
    for i, length in enumerate(lengths):
        by_length.setdefault(length, []).append(i)
    runs: list[_Run] = []
    row_of = [0] * len(offsets)
    done = 0
    for length, members in by_length.items():
        left = sorted(members, key=offsets.__getitem__)
        while left:
            at = {offsets[i]: i for i in left}
            first = left[0]
            best = [first]
            for candidate in left[1 : 1 + _STRIDE_CANDIDATES]:
                stride = offsets[candidate] - offsets[first]
                chain = [first]
                while (nxt := at.get(offsets[chain[-1]] + stride)) is not None:
                    chain.append(nxt)
                if len(chain) > len(best):
                    best = chain
            stride = offsets[best[1]] - offsets[first] if len(best) > 1 else max(length, 1)
            runs.append(_Run(offsets[first], len(best), length, stride))
            for row, i in enumerate(best):
                row_of[i] = done + row
            done += len(best)
            taken = set(best)
            left = [i for i in left if i not in taken]
    return runs, row_of


class _FlatGroup:
    """One (device, dtype) buffer, its views and how to reduce it per segment."""

    def __init__(self, buffer: Tensor, views: list[Tensor], positions: tuple[int, ...]) -> None:
        self.buffer = buffer
        self.views = views
        self.positions = positions
        self.lengths = tuple(v.numel() for v in views)
        offsets, at = [], 0
        for length in self.lengths:
            offsets.append(at)
            at += length
        self.offsets = tuple(offsets)
        self.runs, row_of = _plan_runs(self.offsets, self.lengths)
        device = buffer.device
        self.on_cpu = device.type == "cpu"
        in_order = row_of == list(range(len(views)))
        self.order = None if in_order else torch.tensor(row_of, dtype=torch.long, device=device)
        self.index: Tensor | None = None  # positions on the stats device, set by FlatGrads
        wide = buffer.dtype == torch.float64
        self.norm_dtype = torch.float64 if wide else torch.float32
        # Run outputs land in one scratch vector; a fresh result is gathered from it.
        self.scratch = torch.empty(len(views), dtype=self.norm_dtype, device=device)
        self.slots: list[tuple[Tensor, Tensor]] = []
        row = 0
        for run in self.runs:
            rows = buffer.as_strided((run.rows, run.length), (run.stride, 1), run.offset)
            self.slots.append((rows, self.scratch[row : row + run.rows]))
            row += run.rows

    def norms(self, wide: bool) -> Tensor:
        """Per-tensor L2 norms in this group's order: fp64 for fp64 when ``wide``, else fp32.

        Bitwise those of ``grad_stats``'s per-tensor path (``group_norms``).
        """
        fp64 = self.buffer.dtype == torch.float64
        if not self.on_cpu:
            if wide and fp64:
                return torch.stack(torch._foreach_norm(self.views, 2.0))
            return _foreach.stacked_norms(self.views)
        dtype = self.norm_dtype
        if len(self.slots) == 1 and self.order is None:
            norms = _foreach.vector_norm(self.slots[0][0], dim=(1,), dtype=dtype)
        else:
            for rows, out in self.slots:
                torch.linalg.vector_norm(rows, 2.0, dim=1, dtype=dtype, out=out)
            norms = (
                self.scratch.index_select(0, self.order)
                if self.order is not None
                else self.scratch.clone()
            )
        return norms if wide and fp64 else norms.float()


class FlatGrads:
    """The flat gradient buffers of a model, made by :func:`gradguard.flatten_grads_`.

    Each trainable parameter's ``.grad`` is a view into the buffer of its (device, dtype),
    in parameter order, without padding. Zero the gradients with :meth:`zero_` (or
    ``guard.zero_grad()``, or ``optimizer.zero_grad(set_to_none=False)``): setting them to
    None (``set_to_none=True``, torch's default, or ``model.zero_grad()``) drops the views,
    and the next backward allocates new tensors; gradguard then warns once and measures
    the gradients per tensor, correctly but without the buffer's speed.

    Attributes:
        names: the parameters' names, in order.
        buffers: one contiguous 1-D buffer per (device, dtype), in first-seen order.
        views: each parameter's view (its ``.grad`` while attached), in parameter order.
        buffer_index: per parameter, the buffer its view lies in.
        offsets: per parameter, the view's first element in its buffer.
        lengths: per parameter, the view's number of elements.
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        names: Sequence[str],
        groups: Sequence[tuple[int, ...]],
        device: torch.device,
    ) -> None:
        self._params = tuple(weakref.ref(p) for p in params)
        self.names = tuple(names)
        self.device = device
        views: list[Tensor | None] = [None] * len(params)
        buffer_index = [0] * len(params)
        offsets = [0] * len(params)
        self._groups: list[_FlatGroup] = []
        for g, positions in enumerate(groups):
            first = params[positions[0]]
            total = sum(params[i].numel() for i in positions)
            buffer = torch.zeros(total, dtype=first.dtype, device=first.device)
            group_views, at = [], 0
            for i in positions:
                param = params[i]
                view = buffer[at : at + param.numel()].view(param.shape)
                if param.grad is not None:
                    view.copy_(param.grad)  # keep a gradient already there
                group_views.append(view)
                views[i], buffer_index[i], offsets[i] = view, g, at
                at += param.numel()
            group = _FlatGroup(buffer, group_views, positions)
            group.index = torch.tensor(positions, dtype=torch.long, device=device)
            self._groups.append(group)
        self.views: tuple[Tensor, ...] = tuple(v for v in views if v is not None)
        self.buffers = tuple(g.buffer for g in self._groups)
        self.buffer_index = tuple(buffer_index)
        self.offsets = tuple(offsets)
        self.lengths = tuple(v.numel() for v in self.views)
        self._in_order = len(self._groups) == 1
        self._grad_groups_template = tuple(g.buffer for g in self._groups)
        self.warned = False
        self._attach()

    def __repr__(self) -> str:
        sizes = ", ".join(f"{b.numel():,} {b.dtype} on {b.device}" for b in self.buffers)
        return f"FlatGrads({len(self.views)} tensors in {len(self.buffers)} buffers: {sizes})"

    def __len__(self) -> int:
        return len(self.views)

    @property
    def params(self) -> tuple[Tensor, ...]:
        """The parameters whose gradients the buffers hold (while they are alive)."""
        alive = tuple(p for ref in self._params if (p := ref()) is not None)
        if len(alive) != len(self._params):
            raise ConfigError("a parameter of these FlatGrads no longer exists")
        return alive

    def _attach(self) -> None:
        for param, view in zip(self.params, self.views, strict=True):
            if param.grad is not view:
                param.grad = view

    def attached(self) -> bool:
        """Whether every parameter's ``.grad`` is still its view into the buffers."""
        grads = [p.grad for p in self.params]
        return all(map(operator.is_, grads, self.views))

    @torch.no_grad()
    def zero_(self) -> FlatGrads:
        """Zero every buffer (one kernel each) and re-attach any view that was dropped.

        Re-attaching only ever follows zeroing, so a buffer left stale while the views were
        detached is never read as a gradient.
        """
        for buffer in self.buffers:
            buffer.zero_()
        self._attach()
        return self

    # --- for grad_stats ----------------------------------------------------------------

    def holds(self, grads: Sequence[Tensor | None]) -> bool:
        """Whether ``grads`` are exactly the views, in order: identity checks, no kernel."""
        return len(grads) == len(self.views) and all(map(operator.is_, grads, self.views))

    def norms(self, wide: bool) -> tuple[Tensor, tuple[list[Tensor], ...]]:
        """Per-tensor norms in parameter order, bitwise as the per-tensor path makes them.

        Also returns the buffers, as the gradient groups clip policies act on.
        """
        grad_groups = tuple([b] for b in self._grad_groups_template)
        if self._in_order:
            return self._groups[0].norms(wide), grad_groups
        dtype = torch.float64 if wide else torch.float32
        per_tensor = torch.zeros(len(self.views), dtype=dtype, device=self.device)
        for group in self._groups:
            norms = group.norms(wide).to(self.device, dtype)
            assert group.index is not None
            per_tensor.index_copy_(0, group.index, norms)
        return per_tensor, grad_groups

    def versions(self) -> tuple[int, ...]:
        """Each view's version counter: a view shares its buffer's, so no per-tensor read."""
        if self._in_order:
            return (self.buffers[0]._version,) * len(self.views)
        counters = [b._version for b in self.buffers]
        return tuple(counters[i] for i in self.buffer_index)

    def warn_detached(self, grads: Sequence[Tensor | None]) -> None:
        """Warn, once per FlatGrads, that the gradients are no longer the views."""
        if self.warned:
            return
        self.warned = True
        if len(grads) != len(self.views):
            what = (
                f"the model now has {len(grads)} trainable tensors, not the {len(self.views)} "
                "flattened (parameters frozen, unfrozen or added since flatten_grads_)"
            )
            fix = "call gradguard.flatten_grads_(model) again"
        else:
            i = next(
                i for i, (g, v) in enumerate(zip(grads, self.views, strict=True)) if g is not v
            )
            how = "is None" if grads[i] is None else "is a new tensor, not its view into the buffer"
            what = (
                f"the .grad of {self.names[i]!r} {how} (zero_grad() with set_to_none=True, "
                "torch's default, and model.zero_grad() set gradients to None, and the next "
                "backward() allocates new tensors; backward(create_graph=True) and DDP's "
                "gradient_as_bucket_view replace them too)"
            )
            fix = (
                "zero gradients with guard.zero_grad() or flat_grads.zero_(), which re-attach "
                "the views, or with optimizer.zero_grad(set_to_none=False)"
            )
        warnings.warn(
            f"gradguard: the flat gradient buffer is no longer in use: {what}. Statistics and "
            f"clipping measure the gradients tensor by tensor (correct, but slower); {fix}.",
            UserWarning,
            stacklevel=4,
        )


#: id(parameter) -> (a weak reference to it, the latest FlatGrads that covered it). Keyed by
#: id: a WeakKeyDictionary would compare tensors with ``==``, elementwise.
_REGISTRY: dict[int, tuple[weakref.ref[Tensor], FlatGrads]] = {}


def _forget(key: int, ref: weakref.ref[Tensor]) -> None:
    entry = _REGISTRY.get(key)
    if entry is not None and entry[0] is ref:
        del _REGISTRY[key]


def _forgetter(key: int) -> Callable[[weakref.ref[Tensor]], None]:
    return lambda ref: _forget(key, ref)


def register(flat: FlatGrads) -> None:
    """Let :func:`find` return ``flat`` for any of its parameters, while they live."""
    for param in flat.params:
        key = id(param)
        _REGISTRY[key] = (weakref.ref(param, _forgetter(key)), flat)


def find(param: Tensor) -> FlatGrads | None:
    """The FlatGrads that holds ``param``'s gradient, or None (one dict lookup)."""
    entry = _REGISTRY.get(id(param))
    if entry is None or entry[0]() is not param:
        return None
    return entry[1]
