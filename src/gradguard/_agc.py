"""Adaptive gradient clipping (AGC), unit by unit; :mod:`gradguard.clip` exports it.

Small gradients of one shape are measured and clipped together (:mod:`gradguard._batched`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
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
    """One shape batch (stacked) or one tensor: its members and their unit norms."""

    present: list[int]
    members: list[Tensor]
    weight: Tensor
    grad: Tensor
    stacked: bool


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
        self._batches = _batched.BatchPlan()
        self._owners: dict[tuple[tuple[tuple[int, int], ...], torch.device], Tensor] = {}
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

        Unit norms are measured per shape batch (small tensors stacked) or per tensor; the
        factors, the multiply and the norms are then computed for all units of one
        (device, dtype) at once, so a step costs a few operators per batch and a fixed
        number beyond. Returns the positions measured and, in that order, their norms
        before and after (1-d tensors, one per group; fp32, fp64 for fp64 gradients) and
        whether each changed (on the CPU; elsewhere all True, as nothing is read there).
        """
        included = [not e for e in self._excluded_for(names, params)]
        groups: dict[tuple[torch.device, torch.dtype], list[_Units]] = {}
        for present, members in self._batches.gradients(params, grads, included):
            stacked = _batched.stack_dense(members) if len(members) > 1 else None
            if stacked is not None:
                with torch.no_grad():  # a stack of parameters would otherwise record a graph
                    weights = torch.stack([params[i] for i in present])
                units = _Units(
                    present,
                    members,
                    _batched.stacked_unit_norms(weights),
                    _batched.stacked_unit_norms(stacked),
                    stacked=True,
                )
                groups.setdefault((units.grad.device, units.grad.dtype), []).append(units)
                continue
            for i, grad in zip(present, members, strict=True):  # alone: large, unique or sparse
                if grad.is_sparse:
                    continue
                units = _Units(
                    [i], [grad], unitwise_norm(params[i].detach()), unitwise_norm(grad), False
                )
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
        targets: list[Tensor] = []
        factors: list[Tensor] = []
        at = 0
        for units, part in zip(batches, torch.split(factor, sizes), strict=True):
            marks, at = flags[at : at + len(units.members)], at + len(units.members)
            if not any(marks):
                continue
            shaped = part.reshape(units.grad.shape)
            parts = shaped.unbind(0) if units.stacked else [shaped]
            for member, unit_factor, mark in zip(units.members, parts, marks, strict=True):
                if mark:
                    if unit_factor.ndim < member.ndim and unit_factor.dtype != member.dtype:
                        unit_factor = unit_factor.reshape((1,) * member.ndim)
                    targets.append(member)
                    factors.append(unit_factor)
        if targets:
            torch._foreach_mul_(targets, factors)
        wide = grad_norm.to(torch.float32 if grad_norm.device.type == "mps" else torch.float64)
        squares = wide.square(), (wide * factor).square()
        before, after = (
            torch.zeros(tensors, dtype=wide.dtype, device=wide.device).index_add_(0, owner, sq)
            for sq in squares
        )
        return before.sqrt(), after.sqrt(), flags

    def _owner(self, batches: list[_Units], device: torch.device) -> Tensor:
        """For each unit of ``batches``, in order, the index of its tensor (kept per layout)."""
        key = (tuple((units.grad.numel(), len(units.members)) for units in batches), device)
        owner = self._owners.get(key)
        if owner is None:
            if len(self._owners) > 16:  # another model, or other gradients missing
                self._owners.clear()
            counts = torch.tensor([n // k for n, k in key[0] for _ in range(k)])
            owner = torch.repeat_interleave(torch.arange(len(counts)), counts)
            owner = self._owners[key] = owner.to(device)
        return owner

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
