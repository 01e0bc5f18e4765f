"""ValueClip on the CPU: read every gradient once, write only where an element lies beyond.

torch's ``clip_grad_value_`` clamps every gradient, two fused passes that read and write
every byte. Here the gradients are read first, in few calls whatever the model: the
small ones of a dtype land in one scratch buffer (those of a shape shared by several by
one stack each, the others by one fused copy), whose extremes are one reduction, and
each large one is reduced alone. Only when an element lies beyond the bound are the
gradients of that scratch buffer (or that large gradient) clamped, exactly as torch
clamps them; the scale reported is the clipped global norm over the original, from fp64
sums of squares. Reading a value costs no device sync on the CPU;
other devices clamp every gradient in fused calls (:meth:`gradguard.ValueClip.clip_`).
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from gradguard import _batched, _foreach


def _values(grad: Tensor) -> Tensor:
    """A gradient's stored values: the coalesced values of a sparse one."""
    return grad.coalesce()._values() if grad.is_sparse else grad


def _squares(t: Tensor) -> Tensor:
    """The squared 2-norm of ``t`` as 0-d fp64, accumulated in fp32 (fp64 for fp64)."""
    accumulate = torch.float64 if t.dtype == torch.float64 else torch.float32
    return _foreach.norm_of(t, dtype=accumulate).double().square()


def _within(t: Tensor, bound: float) -> bool:
    """Whether every element of ``t`` lies in ``[-bound, bound]`` (False for a NaN): one pass."""
    if not t.numel():
        return True
    low, high = torch.aminmax(t)
    return -bound <= float(low) and float(high) <= bound


def _taker(positions: Sequence[int]) -> Callable[[Sequence[Any]], list[Any]]:
    """``f(items)``: the items at ``positions`` as a list, without a Python step per item."""
    if len(positions) == 1:
        only = positions[0]
        return lambda items: [items[only]]
    take = operator.itemgetter(*positions)
    return lambda items: list(take(items))


class _Scratch:
    """The small gradients of one dtype, copied into one persistent buffer each step.

    A shape shared by several gradients is stacked into its region by one call; the
    others are copied by one fused call. Positions are in buffer order.
    """

    def __init__(self, params: Sequence[Tensor], positions: Sequence[int]) -> None:
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i in positions:
            by_shape.setdefault(tuple(params[i].shape), []).append(i)
        stacked = [group for group in by_shape.values() if len(group) > 1]
        copied = [group[0] for group in by_shape.values() if len(group) == 1]
        self.positions = tuple(itertools.chain(*stacked, copied))
        first = params[positions[0]]
        self.buffer = torch.empty(
            sum(params[i].numel() for i in self.positions), dtype=first.dtype, device=first.device
        )
        self.stacks: list[tuple[Callable[[Sequence[Any]], list[Any]], Tensor]] = []
        at = 0
        for group in stacked:
            size = params[group[0]].numel() * len(group)
            region = self.buffer[at : at + size].view(len(group), *params[group[0]].shape)
            self.stacks.append((_taker(group), region))
            at += size
        self.copy_views = _batched.views_into(self.buffer[at:], params, copied)
        self.take_copied = _taker(copied) if copied else None

    def fill(self, grads: Sequence[Tensor | None]) -> Tensor | None:
        """Copy the gradients into the buffer; None when one is missing or sparse."""
        try:
            for take, region in self.stacks:
                torch.stack(take(grads), out=region)
            if self.take_copied is not None:
                torch._foreach_copy_(self.copy_views, self.take_copied(grads))
        except (RuntimeError, TypeError, NotImplementedError):
            return None
        return self.buffer


class HostValueClip:
    """How :class:`gradguard.ValueClip` reads and clamps one parameter tuple's gradients."""

    def __init__(self, params: Sequence[Tensor]) -> None:
        by_dtype: dict[torch.dtype, list[int]] = {}
        large: list[int] = []
        for i, param in enumerate(params):
            if param.numel() > _batched.SMALL:
                large.append(i)
            elif param.numel():
                by_dtype.setdefault(param.dtype, []).append(i)
        self.scratches = [_Scratch(params, positions) for positions in by_dtype.values()]
        self.large = tuple(large)
        self.on_cpu = all(p.device.type == "cpu" for p in params)

    def clip_(
        self,
        grads: Sequence[Tensor | None],
        bound: float,
        before: Tensor | None,
        total: Tensor | None,
    ) -> Tensor:
        """Clamp to ``[-bound, bound]``; return the clipped global norm over the original.

        ``before`` and ``total`` are the per-tensor and global norms ``grad_stats``
        measured, or None. A large gradient whose known 2-norm is at most half the bound
        (so no element can exceed it, rounding included) is not read.
        """
        known = None if before is None else before.tolist()
        alone = [
            i
            for i in self.large
            if grads[i] is not None and not (known is not None and known[i] <= bound / 2)
        ]
        copies: list[tuple[Tensor, list[int], bool]] = []  # copy, its positions, beyond
        for scratch in self.scratches:
            copy, positions = scratch.fill(grads), list(scratch.positions)
            if copy is None:  # some missing: the present ones, flattened in one call
                positions = [i for i in positions if grads[i] is not None]
                copy = _batched.flat_copy([_present(grads, i) for i in positions])
            if copy is None:  # a sparse one among them: each is read alone
                alone += positions
            else:
                copies.append((copy, positions, not _within(copy, bound)))
        singles = [(i, not _within(_values(_present(grads, i)), bound)) for i in alone]
        if not any(c[2] for c in copies) and not any(over for _, over in singles):
            return torch.ones(())  # nothing to clamp: the clipped norm is the norm
        return _clamp_and_scale(grads, bound, before, total, copies, singles)


def _present(grads: Sequence[Tensor | None], i: int) -> Tensor:
    grad = grads[i]
    assert grad is not None  # positions are only ever taken of present gradients
    return grad


def _clamp_and_scale(
    grads: Sequence[Tensor | None],
    bound: float,
    before: Tensor | None,
    total: Tensor | None,
    copies: list[tuple[Tensor, list[int], bool]],
    singles: list[tuple[int, bool]],
) -> Tensor:
    """Clamp what holds an element beyond the bound; the scale from fp64 sums of squares.

    With ``before`` known, the gradients neither copied nor clamped keep their measured
    norms; without, every norm is measured here, before and after.
    """
    alone = {i: _present(grads, i) for i, _ in singles}
    unchanged = [i for i, over in singles if not over]
    squares_alone = [_squares(alone[i]) for i in unchanged] if before is None else []
    clamped = [i for i, over in singles if over]
    if total is None:
        squares = [_squares(copy) for copy, _, _ in copies]
        squares += [_squares(alone[i]) for i in clamped]
        total = torch.stack(squares + squares_alone).sum().sqrt()
    to_clamp: dict[torch.dtype, list[Tensor]] = {}
    for copy, positions, over in copies:
        if over:
            copy.clamp_(-bound, bound)
            to_clamp.setdefault(copy.dtype, []).extend(_present(grads, i) for i in positions)
    _foreach.clamp_(list(to_clamp.values()), -bound, bound)
    for i in clamped:  # large: one clamp pass each rather than the fused two
        grad = alone[i]
        (grad._values() if grad.is_sparse else grad).clamp_(-bound, bound)
    after = [_squares(copy) for copy, _, _ in copies]
    after += [_squares(alone[i]) for i in clamped] + squares_alone
    squares_after = torch.stack(after).sum()
    if before is not None:  # the gradients not measured here keep their known norms
        known = torch.ones(len(grads), dtype=torch.bool)
        known[[i for _, positions, _ in copies for i in positions]] = False
        known[clamped] = False
        squares_after += before.double()[known].square().sum()
    return _batched.ratio(squares_after.sqrt().to(total.dtype), total)
