"""Adaptive gradient clipping (AGC), unit by unit; :mod:`gradguard.clip` exports it.

The unit norms of small gradients are measured together, whatever their shapes: vectors
by one fused norm call, matrices (and higher) of one row length as the rows of one copy.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gradguard import _batched, _foreach
from gradguard._clip_state import NORM_EPS, _check_keys, _positive
from gradguard._repr import arguments_repr
from gradguard.errors import ConfigError

if TYPE_CHECKING:
    from gradguard.stats import GradStats


def unitwise_norm(t: Tensor) -> Tensor:
    """Norm per unit: per output row/channel (dim 0) for ndim > 1, whole tensor otherwise.

    Assumes the output dimension comes first, as in ``nn.Linear`` and ``nn.ConvNd``.
    Accumulated and returned in fp32, or fp64 for an fp64 tensor.
    """
    dtype = None if t.dtype == torch.float64 else torch.float32
    if t.ndim <= 1:
        return _foreach.vector_norm(t, dtype=dtype)
    dims = tuple(range(1, t.ndim))
    return _foreach.vector_norm(t, dim=dims, keepdim=True, dtype=dtype)


@dataclass
class _Units:
    """Gradients whose units were measured together, and how to shape their factors.

    ``grad`` and ``weight`` hold the unit norms of every member, in order, as 1-d
    tensors; ``apply(factors, marks)`` multiplies the marked members by their factors
    (a 1-d slice, one per unit), in a few calls whatever the number of members.
    """

    present: list[int]
    members: list[Tensor]
    weight: Tensor
    grad: Tensor
    units: list[int]  # per member
    apply: Callable[[Tensor, list[bool]], None]


def _row_length(t: Tensor) -> int:
    """The elements of one unit of a matrix or higher (a row over dims 1..n)."""
    return t.numel() // t.shape[0] if t.shape[0] else 0


def _kind(param: Tensor, shared: bool) -> tuple[Any, ...] | None:
    """What a small parameter's units are measured with; None: measured alone.

    A shape ``shared`` with other small parameters: stacked with them, one stack per
    shape. Otherwise small vectors (one unit each) together by fused whole-tensor norms,
    and small matrices and higher together by row length, as the rows of one copy.
    """
    if param.numel() == 0 or param.numel() > _batched.SMALL or param.ndim == 0:
        return None
    if shared:
        return (param.device, param.dtype, "shape", tuple(param.shape))
    if param.ndim == 1:
        return (param.device, param.dtype, "vector")
    return (param.device, param.dtype, "rows", _row_length(param), param.ndim)


class _Rows:
    """Persistent copies of the gradients and weights of one row length, filled by fused copies.

    Their views are made once per parameter tuple, so a step costs two copy calls
    whatever the number of tensors.
    """

    def __init__(self, params: Sequence[Tensor], positions: Sequence[int], length: int) -> None:
        self.positions = list(positions)
        self.length = length
        first = params[positions[0]]
        total = sum(params[i].numel() for i in positions)
        self.grads = torch.empty(total, dtype=first.dtype, device=first.device)
        self.weights = torch.empty(total, dtype=first.dtype, device=first.device)
        self.grad_views = _batched.views_into(self.grads, params, positions)
        self.weight_views = _batched.views_into(self.weights, params, positions)

    def fill(self, members: list[Tensor], weights: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Copy ``members`` and ``weights`` in; return both as ``[rows, length]``."""
        torch._foreach_copy_(self.grad_views, members)
        with torch.no_grad():
            torch._foreach_copy_(self.weight_views, weights)
        return self.grads.view(-1, self.length), self.weights.view(-1, self.length)


class _Vectors:
    """Persistent slots for the norms and factors of one dtype's small vectors.

    Fused norm calls return one 0-d tensor per vector; copying them into the slots of one
    vector (views made once per parameter tuple) costs one call, where stacking them
    costs one per vector. Each factor slot has shape ``(1,)``: a 0-d factor would take
    a bf16 vector's dtype.
    """

    def __init__(self, params: Sequence[Tensor], positions: Sequence[int]) -> None:
        self.positions = list(positions)
        first = params[positions[0]]
        self.accumulate = None if first.dtype == torch.float64 else torch.float32
        dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        count = len(positions)
        self.grad_norms = torch.empty(count, dtype=dtype, device=first.device)
        self.weight_norms = torch.empty(count, dtype=dtype, device=first.device)
        self.factors = torch.empty(count, dtype=dtype, device=first.device)
        self.grad_slots = list(self.grad_norms.unbind(0))
        self.weight_slots = list(self.weight_norms.unbind(0))
        self.factor_slots = list(torch.split(self.factors, 1))

    def norms(self, members: list[Tensor], weights: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Each member's and each weight's 2-norm, bitwise ``linalg.vector_norm`` each."""
        torch._foreach_copy_(
            self.grad_slots, torch._foreach_norm(members, 2.0, dtype=self.accumulate)
        )
        with torch.no_grad():
            norms = torch._foreach_norm(weights, 2.0, dtype=self.accumulate)
            torch._foreach_copy_(self.weight_slots, norms)
        return self.grad_norms, self.weight_norms

    def applier(self, members: list[Tensor]) -> Callable[[Tensor, list[bool]], None]:
        def apply(factors: Tensor, marks: list[bool]) -> None:
            self.factors.copy_(factors)
            torch._foreach_mul_(_marked(members, marks), _marked(self.factor_slots, marks))

        return apply


def _units_together(
    kind: tuple[Any, ...],
    present: list[int],
    members: list[Tensor],
    weights: list[Tensor],
    slots: _Rows | _Vectors | None,
) -> _Units | None:
    """Unit norms of gradients of one kind, in a few calls; None when one is sparse.

    ``slots`` holds the kind's persistent copies, used when every gradient is present.
    """
    dtype = None if kind[1] == torch.float64 else torch.float32
    try:
        if kind[2] == "shape":
            return _units_stacked(present, members, weights)
        if kind[2] == "vector":
            if isinstance(slots, _Vectors) and slots.positions == present:
                grad, weight = slots.norms(members, weights)
                apply = slots.applier(members)
            else:  # some missing
                grad = torch.stack(torch._foreach_norm(members, 2.0, dtype=dtype))
                with torch.no_grad():
                    weight = torch.stack(torch._foreach_norm(weights, 2.0, dtype=dtype))
                apply = _rows_in_place(members, [1] * len(members), (-1,))
            return _Units(present, members, weight, grad, [1] * len(members), apply)
        length, ndim = kind[3], kind[4]
        rows_copy = slots if isinstance(slots, _Rows) and slots.positions == present else None
        with torch.no_grad():  # a view of one parameter would otherwise record a graph
            if rows_copy is not None:
                grad_rows, weight_rows = rows_copy.fill(members, weights)
            else:  # some missing: the present ones, flattened in one call
                grad_flat, weight_flat = _batched.flat_copy(members), _batched.flat_copy(weights)
                if grad_flat is None or weight_flat is None:  # a sparse gradient
                    return None
                grad_rows, weight_rows = grad_flat.view(-1, length), weight_flat.view(-1, length)
            weight = _foreach.vector_norm(weight_rows, dim=(1,), dtype=dtype)
    except (RuntimeError, NotImplementedError):  # a sparse gradient
        return None
    grad = _foreach.vector_norm(grad_rows, dim=(1,), dtype=dtype)
    rows = [m.shape[0] for m in members]
    if rows_copy is not None:
        apply = _rows_copied_back(grad_rows, members, rows_copy.grad_views)
    else:
        apply = _rows_in_place(members, rows, (-1,) + (1,) * (ndim - 1))
    return _Units(present, members, weight, grad, rows, apply)


def _units_stacked(present: list[int], members: list[Tensor], weights: list[Tensor]) -> _Units:
    """Unit norms of gradients of one shape, stacked: one copy and one reduction each."""
    grad = _stacked_unit_norms(torch.stack(members))
    with torch.no_grad():  # a stack of parameters would otherwise record a graph
        weight = _stacked_unit_norms(torch.stack(weights))
    per_member = grad.numel() // len(members)
    shape = grad.shape

    def apply(factors: Tensor, marks: list[bool]) -> None:
        parts = list(factors.reshape(shape).unbind(0))  # each with its member's dimensions
        torch._foreach_mul_(_marked(members, marks), _marked(parts, marks))

    return _Units(
        present, members, weight.reshape(-1), grad.reshape(-1), [per_member] * len(members), apply
    )


def _stacked_unit_norms(stacked: Tensor) -> Tensor:
    """Unit norms of each tensor stacked on dim 0, with kept dims, in fp32 (fp64 for fp64).

    A stacked matrix ``[k, o, i]`` gives ``[k, o, 1]`` (a norm per row), a stacked vector
    ``[k, n]`` gives ``[k, 1]`` (one per tensor).
    """
    dims = tuple(range(2, stacked.ndim)) if stacked.ndim > 2 else (1,)
    dtype = None if stacked.dtype == torch.float64 else torch.float32
    return _foreach.vector_norm(stacked, dim=dims, keepdim=True, dtype=dtype)


def _marked(items: list[Any], marks: list[bool]) -> list[Any]:
    return items if all(marks) else [x for x, mark in zip(items, marks, strict=True) if mark]


def _rows_copied_back(
    rows: Tensor, members: list[Tensor], views: list[Tensor]
) -> Callable[[Tensor, list[bool]], None]:
    """Multiply the rows of the copy, then copy the marked members back: two calls."""

    def apply(factors: Tensor, marks: list[bool]) -> None:
        rows.mul_(factors.view(-1, 1))  # fp16/bf16: formed in fp32, rounded once
        torch._foreach_copy_(_marked(members, marks), _marked(views, marks))

    return apply


def _rows_in_place(
    members: list[Tensor], rows: list[int], broadcast: tuple[int, ...]
) -> Callable[[Tensor, list[bool]], None]:
    """Multiply each marked member by its rows' factors, views shaped to broadcast.

    For when some gradients were missing; a vector is one row, its factor a ``(1,)``
    view (a 0-d one would take a bf16 vector's dtype).
    """

    def apply(factors: Tensor, marks: list[bool]) -> None:
        parts = list(torch.split(factors.view(broadcast), rows))
        torch._foreach_mul_(_marked(members, marks), _marked(parts, marks))

    return apply


def _units_alone(i: int, grad: Tensor, param: Tensor) -> _Units:
    """One large (or 0-d) gradient's unit norms, measured on its own."""
    grad_units = unitwise_norm(grad)
    # the whole tensor one unit (a vector): keep its dimensions, or bf16 would take the factor
    shape = tuple(grad_units.shape) if grad_units.ndim == grad.ndim else (1,) * grad.ndim
    return _Units(
        [i],
        [grad],
        unitwise_norm(param.detach()).reshape(-1),
        grad_units.reshape(-1),
        [grad_units.numel()],
        lambda factors, marks: _multiply(grad, factors.reshape(shape), marks[0]),
    )


def _multiply(grad: Tensor, factors: Tensor, marked: bool) -> None:
    if marked:
        grad.mul_(factors)


class AGC:
    """Adaptive gradient clipping, unit by unit, relative to the weight's norm.

    Brock, De, Smith, Simonyan 2021, "High-performance large-scale image recognition
    without normalization" (NFNets): for each unit i (a row of a linear weight, an output
    channel of a conv; a whole vector for biases and gains),
    ``G_i <- clipping * max(||W_i||, eps) / ||G_i|| * G_i`` when
    ``||G_i|| / max(||W_i||, eps) > clipping``. The final classifier is excluded by
    default, as in the paper. Choose it for normalizer-free or very deep networks and
    large batches; the paper's best ``clipping`` falls as batch size grows
    (0.01 suits batches of a few thousand).

    Args:
        clipping: the largest ratio of gradient to weight norm a unit may keep.
        eps: floor on the weight norm, so zero-initialised weights can still move.
        exclude: ``None`` excludes the last layer (in registration order) that owns a
            matrix; otherwise fnmatch patterns over parameter or layer names, e.g.
            ``("head.*",)``, and ``()`` clips everything.
    """

    def __init__(
        self, clipping: float = 0.01, eps: float = 1e-3, exclude: Sequence[str] | None = None
    ) -> None:
        self.clipping = _positive("clipping", clipping)
        self.eps = _positive("eps", eps)
        if isinstance(exclude, str):
            raise ConfigError(
                f"exclude must be a sequence of name patterns, got the string {exclude!r}; "
                f"write exclude=({exclude!r},)."
            )
        self.exclude = None if exclude is None else tuple(exclude)
        self._excluded_key: tuple[str, ...] | None = None
        self._excluded: tuple[bool, ...] = ()
        self._kinds_key: tuple[Tensor, ...] | None = None
        self._kinds: tuple[tuple[Any, ...] | None, ...] = ()
        self._kinds_excluded: tuple[bool, ...] = ()
        self._slots: dict[tuple[Any, ...], _Rows | _Vectors] = {}
        self._owners: dict[tuple[tuple[int, ...], torch.device], Tensor] = {}
        self._index_cache: dict[tuple[tuple[int, ...], torch.device], Tensor] = {}

    __repr__ = arguments_repr

    def _excluded_for(self, names: tuple[str, ...], params: tuple[Tensor, ...]) -> tuple[bool, ...]:
        if self._excluded_key is names:
            return self._excluded
        if self.exclude is None:
            matrix_layers = [
                layer
                for layer, param in zip((n.rpartition(".")[0] for n in names), params, strict=True)
                if param.ndim > 1
            ]
            last = matrix_layers[-1] if matrix_layers else None
            plan = tuple(n.rpartition(".")[0] == last for n in names)
        else:
            patterns = self.exclude
            plan = tuple(
                any(
                    fnmatch.fnmatchcase(n, p) or fnmatch.fnmatchcase(n.rpartition(".")[0], p)
                    for p in patterns
                )
                for n in names
            )
        self._excluded_key, self._excluded = names, plan
        return plan

    def _index(self, positions: tuple[int, ...], device: torch.device) -> Tensor:
        """Positions of the clipped tensors, uploaded once (an upload per step would sync)."""
        key = (positions, device)
        index = self._index_cache.get(key)
        if index is None:
            index = torch.tensor(positions, dtype=torch.long).to(device)
            self._index_cache = {key: index}
        return index

    def clip_(self, stats: GradStats) -> Tensor:
        """Clip unit by unit in place; return the clipped global norm over the original."""
        device = stats.total.device
        wide = stats.per_tensor_fp64 is not None
        positions, _, after_norms, changed = self._clip_units(
            stats.params, stats.grads, stats.names
        )
        if not any(changed):  # nothing clipped (known on the CPU): the norm is unchanged
            return torch.ones((), device=device)
        new = torch.cat(after_norms).to(device, torch.float64 if wide else torch.float32)
        if device.type == "cpu":  # the unchanged keep the measured norms, bit for bit
            keep = [j for j, c in enumerate(changed) if c]
            positions, new = [positions[j] for j in keep], new[torch.tensor(keep)]
        before = stats.per_tensor if stats.per_tensor_fp64 is None else stats.per_tensor_fp64
        after = before.clone()
        after.index_copy_(0, self._index(tuple(positions), device), new)
        return _batched.ratio(
            _foreach.vector_norm(after),
            (stats.total if stats.total_fp64 is None else stats.total_fp64),
        )

    def _clip_units(
        self, params: tuple[Tensor, ...], grads: Sequence[Tensor | None], names: tuple[str, ...]
    ) -> tuple[list[int], list[Tensor], list[Tensor], list[bool]]:
        """Clip every unit of the included gradients in place.

        Unit norms of small tensors are measured together whatever their shapes (vectors
        by one fused whole-tensor norm, matrices and higher as the rows of one copy per
        row length), of large ones tensor by tensor; the factors, the multiply and the
        norms are then computed for all units of one (device, dtype) at once, so a step
        costs a few operators per row length and a fixed number beyond. Returns the
        positions measured and, in that order, their norms before and after (1-d tensors,
        one per group; fp32, fp64 for fp64 gradients) and whether each changed (on the
        CPU; elsewhere all True, as nothing is read there).
        """
        excluded_flags = self._excluded_for(names, params)
        kinds = self._kinds_for(params, excluded_flags)
        together: dict[tuple[Any, ...], list[int]] = {}
        alone: list[int] = []
        for i, (grad, excluded, kind) in enumerate(zip(grads, excluded_flags, kinds, strict=True)):
            if grad is None or excluded or grad.is_sparse:
                continue
            if kind is None:
                alone.append(i)
            else:
                together.setdefault(kind, []).append(i)
        groups: dict[tuple[torch.device, torch.dtype], list[_Units]] = {}
        for kind, present in together.items():
            members = [g for i in present if (g := grads[i]) is not None]
            weights = [params[i] for i in present]
            units = _units_together(kind, present, members, weights, self._slots.get(kind))
            if units is None:
                alone += present
                continue
            groups.setdefault((units.grad.device, units.grad.dtype), []).append(units)
        for i in alone:
            grad = grads[i]
            assert grad is not None  # only present gradients were chosen
            units = _units_alone(i, grad, params[i])
            groups.setdefault((units.grad.device, units.grad.dtype), []).append(units)
        positions: list[int] = []
        before: list[Tensor] = []
        after: list[Tensor] = []
        changed: list[bool] = []
        for batches in groups.values():
            positions += [i for units in batches for i in units.present]
            norms = self._clip_group(batches)
            before.append(norms[0])
            after.append(norms[1])
            changed += norms[2]
        return positions, before, after, changed

    def _clip_group(self, batches: list[_Units]) -> tuple[Tensor, Tensor, list[bool]]:
        """Factors for every unit of one (device, dtype), the multiply, per-tensor norms.

        The factor stays fp32 (fp64 for fp64 gradients), so fp16/bf16 products are formed
        in fp32 and rounded once. Cast to fp16 first, a factor below fp16's normal range
        (6.1e-5) would become a subnormal and lose up to a third of its value; a 0-d factor
        beside a dimensioned gradient would take the gradient's dtype by type promotion,
        so it is given the gradient's number of dimensions.
        """
        grad_norm = torch.cat([units.grad.reshape(-1) for units in batches])
        max_norm = torch.cat([units.weight.reshape(-1) for units in batches])
        max_norm = max_norm.clamp(min=self.eps) * self.clipping
        factor = torch.where(grad_norm > max_norm, max_norm / grad_norm.clamp(min=NORM_EPS), 1.0)
        sizes = [units.grad.numel() for units in batches]
        owner = self._owner(batches, grad_norm.device)
        tensors = sum(len(units.members) for units in batches)
        if grad_norm.device.type == "cpu":
            # A multiply by exactly 1 changes no bit; on the CPU, where reading costs no
            # sync, the gradients whose every factor is 1 keep their bytes.
            ones = torch.zeros(tensors).index_add_(0, owner, (factor != 1).float())
            flags = (ones > 0).tolist()
        else:
            flags = [True] * tensors
        at = 0
        for units, part in zip(batches, torch.split(factor, sizes), strict=True):
            marks, at = flags[at : at + len(units.members)], at + len(units.members)
            if any(marks):
                units.apply(part, marks)
        wide = grad_norm.to(torch.float32 if grad_norm.device.type == "mps" else torch.float64)
        squares = wide.square(), (wide * factor).square()
        before, after = (
            torch.zeros(tensors, dtype=wide.dtype, device=wide.device).index_add_(0, owner, sq)
            for sq in squares
        )
        return before.sqrt(), after.sqrt(), flags

    def _owner(self, batches: list[_Units], device: torch.device) -> Tensor:
        """For each unit of ``batches``, in order, the index of its tensor (kept per layout)."""
        key = (tuple(n for units in batches for n in units.units), device)
        owner = self._owners.get(key)
        if owner is None:
            if len(self._owners) > 16:  # another model, or other gradients missing
                self._owners.clear()
            counts = torch.tensor(key[0])
            owner = torch.repeat_interleave(torch.arange(len(counts)), counts)
            owner = self._owners[key] = owner.to(device)
        return owner

    def _kinds_for(
        self, params: tuple[Tensor, ...], excluded: tuple[bool, ...]
    ) -> tuple[tuple[Any, ...] | None, ...]:
        """Each included parameter's :func:`_kind`, and each kind's slots, per parameter tuple."""
        if self._kinds_key is not params or self._kinds_excluded is not excluded:
            shapes = Counter(
                (p.device, p.dtype, tuple(p.shape))
                for p, out in zip(params, excluded, strict=True)
                if not out
            )
            self._kinds = tuple(
                None if out else _kind(p, shapes[(p.device, p.dtype, tuple(p.shape))] > 1)
                for p, out in zip(params, excluded, strict=True)
            )
            self._kinds_excluded = excluded
            by_kind: dict[tuple[Any, ...], list[int]] = {}
            for i, kind in enumerate(self._kinds):
                if kind is not None:
                    by_kind.setdefault(kind, []).append(i)
            self._slots = {
                k: _Rows(params, v, k[3]) if k[2] == "rows" else _Vectors(params, v)
                for k, v in by_kind.items()
                if k[2] != "shape"
            }
            self._kinds_key = params
        return self._kinds

    def _clip_direct(
        self,
        params: tuple[Tensor, ...],
        grads: Sequence[Tensor | None],
        names: tuple[str, ...],
        device: torch.device,
    ) -> Tensor:
        """``gg.clip_`` without statistics: the global norms come from the unit norms."""
        positions, before, after, _ = self._clip_units(params, grads, names)
        if not positions:
            return torch.ones((), device=device)
        clipped = set(positions)
        rest = [g for i, g in enumerate(grads) if g is not None and i not in clipped]
        untouched = (
            _foreach.stacked_norms(rest).to(device, torch.float64).square().sum()
            if rest
            else torch.zeros((), dtype=torch.float64, device=device)
        )

        def total(norms: list[Tensor]) -> Tensor:
            squares = torch.cat([n.to(device, torch.float64) for n in norms]).square().sum()
            return (squares + untouched).sqrt()

        return _batched.ratio(total(after), total(before))

    def state_dict(self) -> dict[str, Any]:
        """Return the policy's state: AGC keeps none."""
        return {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore state; only an empty mapping fits."""
        _check_keys(self, state_dict, set())
