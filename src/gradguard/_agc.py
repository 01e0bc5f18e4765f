"""Adaptive gradient clipping (AGC), unit by unit; :mod:`gradguard.clip` exports it.

Small gradients of one shape are measured and clipped together (:mod:`gradguard._batched`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gradguard import _batched, _foreach
from gradguard._clip_state import NORM_EPS, _check_keys, _positive
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
        self._index_cache: dict[tuple[tuple[int, ...], torch.device], Tensor] = {}

    def __repr__(self) -> str:
        return f"AGC(clipping={self.clipping}, eps={self.eps}, exclude={self.exclude})"

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
        positions, _, after_norms = self._clip_units(stats.params, stats.grads, stats.names)
        if not positions:
            return torch.ones((), device=device)
        before = stats.per_tensor if stats.per_tensor_fp64 is None else stats.per_tensor_fp64
        after = before.clone()
        index = self._index(tuple(positions), device)
        new = torch.cat(after_norms).to(device, torch.float64 if wide else torch.float32)
        after.index_copy_(0, index, new)
        return _batched.ratio(
            _foreach.vector_norm(after),
            (stats.total if stats.total_fp64 is None else stats.total_fp64),
        )

    def _clip_units(
        self, params: tuple[Tensor, ...], grads: Sequence[Tensor | None], names: tuple[str, ...]
    ) -> tuple[list[int], list[Tensor], list[Tensor]]:
        """Clip every unit of the included gradients in place, small tensors by shape.

        Returns the clipped positions and, in that order, their norms before and after
        (1-d tensors, one per batch; fp32, fp64 for fp64 gradients).
        """
        included = [not e for e in self._excluded_for(names, params)]
        positions: list[int] = []
        before: list[Tensor] = []
        after: list[Tensor] = []
        for present, members in self._batches.gradients(params, grads, included):
            grad = _batched.stack_dense(members) if len(members) > 1 else None
            if grad is None:  # measured alone: a single tensor, or sparse gradients among them
                for i in present:
                    self._clip_batch(params, grads, [i], None, positions, before, after)
                continue
            self._clip_batch(params, grads, present, grad, positions, before, after)
        return positions, before, after

    def _clip_batch(
        self,
        params: tuple[Tensor, ...],
        grads: Sequence[Tensor | None],
        present: list[int],
        stacked: Tensor | None,
        positions: list[int],
        before: list[Tensor],
        after: list[Tensor],
    ) -> None:
        """Clip one shape batch (``stacked`` gradients), or one tensor alone (None)."""
        norms: Callable[[Tensor], Tensor]
        if stacked is None:
            grad = grads[present[0]]
            assert grad is not None
            if grad.is_sparse:
                return
            param, norms = params[present[0]].detach(), unitwise_norm
        else:
            grad, norms = stacked, _batched.stacked_unit_norms
            with torch.no_grad():  # a stack of parameters would otherwise record a graph
                param = torch.stack([params[i] for i in present])
        max_norm = norms(param).clamp(min=self.eps) * self.clipping
        grad_norm = norms(grad)
        factor = torch.where(grad_norm > max_norm, max_norm / grad_norm.clamp(min=NORM_EPS), 1.0)
        self._multiply_([grads[i] for i in present], factor, stacked is not None)  # type: ignore[misc]
        dims = tuple(range(1, grad_norm.ndim)) if stacked is not None else None
        positions += present
        before.append(grad_norm.square().sum(dim=dims).sqrt().reshape(-1))
        after.append((grad_norm * factor).square().sum(dim=dims).sqrt().reshape(-1))

    def _clip_direct(
        self,
        params: tuple[Tensor, ...],
        grads: Sequence[Tensor | None],
        names: tuple[str, ...],
        device: torch.device,
    ) -> Tensor:
        """``gg.clip_`` without statistics: the global norms come from the unit norms."""
        positions, before, after = self._clip_units(params, grads, names)
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

    @staticmethod
    def _multiply_(targets: list[Tensor], factor: Tensor, stacked: bool) -> None:
        """Multiply each gradient by its units' factors (skipping, on the CPU, those of 1).

        The factor stays fp32 (fp64 for fp64 gradients), so fp16/bf16 products are formed
        in fp32 and rounded once. Cast to fp16 first, a factor below fp16's normal range
        (6.1e-5) would become a subnormal and lose up to a third of its value; a 0-d factor
        beside a dimensioned gradient would take the gradient's dtype by type promotion,
        so it is given the gradient's number of dimensions.
        """
        if factor.device.type == "cpu":
            # A multiply by exactly 1 changes no bit; on the CPU, where reading costs no
            # sync, the gradients whose every factor is 1 keep their bytes (and a stacked
            # batch is not split into views).
            changed = (factor != 1).reshape(len(targets), -1).any(dim=1).tolist()
            if not any(changed):
                return
        else:
            changed = [True] * len(targets)
        factors = list(factor.unbind(0)) if stacked else [factor]
        if factors[0].ndim < targets[0].ndim and factors[0].dtype != targets[0].dtype:
            factors = [f.reshape((1,) * targets[0].ndim) for f in factors]
        pairs = [(t, f) for t, f, c in zip(targets, factors, changed, strict=True) if c]
        torch._foreach_mul_([t for t, _ in pairs], [f for _, f in pairs])

    def state_dict(self) -> dict[str, Any]:
        """Return the policy's state: AGC keeps none."""
        return {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore state; only an empty mapping fits."""
        _check_keys(self, state_dict, set())
