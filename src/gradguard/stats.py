"""Gradient statistics in one fused pass: per-tensor, per-layer and global norms, finiteness.

Everything downstream (clipping, detection, logging) reads these numbers, so they are
computed once per step, on the device, with fp32 accumulation whatever the gradient dtype
and without a host sync: ``torch._foreach_norm`` once per (device, dtype) group, then a
handful of small kernels over the per-tensor norms.
"""

from __future__ import annotations

import math
import operator
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, TypeAlias

import torch
from torch import Tensor, nn

from gradguard import _distributed, _foreach
from gradguard.errors import UnsupportedModelError

NamedParameters: TypeAlias = Iterable[tuple[str, Tensor]]
ROOT_LAYER = "(root)"

_get_grad = operator.attrgetter("grad")
_get_requires_grad = operator.attrgetter("requires_grad")


@dataclass(frozen=True, eq=False)
class _Group:
    """Trainable parameters sharing one (device, dtype): the unit of one fused kernel."""

    positions: tuple[int, ...]
    index: Tensor  # ``positions`` as an int64 tensor on the primary device


@dataclass(frozen=True, eq=False)
class Layout:
    """What grad_stats needs to know about a model, computed once and cached per module.

    ``names`` are the trainable parameters, ``layer_names`` the modules owning them, in
    ``named_parameters()`` order (depth); ``layer_index[i]`` is the layer of tensor ``i``.
    """

    params: tuple[Tensor, ...]
    names: tuple[str, ...]
    layer_names: tuple[str, ...]
    layer_index: Tensor
    device: torch.device
    groups: tuple[_Group, ...]
    all_params: tuple[Tensor, ...]
    trainable_mask: tuple[bool, ...]
    sharding: _distributed.Sharding | None = None
    false: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.bool))
    true: Tensor = field(default_factory=lambda: torch.ones((), dtype=torch.bool))

    @property
    def accumulate_dtype(self) -> torch.dtype:
        """fp64 for sums of squared norms, except on MPS, which has no fp64."""
        return _accumulate_dtype(self.device)

    @property
    def in_order(self) -> bool:
        """True when one group holds every parameter in order: no scatter needed."""
        return len(self.groups) == 1


def _accumulate_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


_LAYOUTS: weakref.WeakKeyDictionary[nn.Module, Layout] = weakref.WeakKeyDictionary()


def layer_of(param_name: str) -> str:
    """Return the name of the module owning ``param_name`` (``"a.b.weight"`` -> ``"a.b"``)."""
    owner, dot, _ = param_name.rpartition(".")
    return owner if dot else ROOT_LAYER


def _named_parameters(source: nn.Module | NamedParameters) -> list[tuple[str, Tensor]]:
    if isinstance(source, nn.Module):
        return list(source.named_parameters())
    if isinstance(source, Tensor) or not isinstance(source, Iterable):
        raise UnsupportedModelError(
            f"grad_stats expects an nn.Module or model.named_parameters(), got "
            f"{type(source).__name__}. Pass the model itself (grad_stats(model)) or its "
            "named_parameters()."
        )
    pairs = list(source)
    for item in pairs:
        if not (
            isinstance(item, tuple)
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], Tensor)
        ):
            raise UnsupportedModelError(
                "grad_stats expects (name, parameter) pairs but got an item of type "
                f"{type(item).__name__}. Pass model.named_parameters() rather than "
                "model.parameters(), so per-layer norms can be named."
            )
    return pairs


def _build_layout(
    pairs: list[tuple[str, Tensor]], model: object = None, group: Any = None
) -> Layout:
    trainable = [(n, p) for n, p in pairs if p.requires_grad]
    if not trainable:
        detail = f"{len(pairs)} parameters, all frozen" if pairs else "no parameters"
        raise UnsupportedModelError(
            f"grad_stats found no trainable parameter ({detail}). Measure a model with at "
            "least one parameter that has requires_grad=True (unfreeze it with "
            "p.requires_grad_(True))."
        )
    names = tuple(n for n, _ in trainable)
    params = tuple(p for _, p in trainable)
    device = _distributed.local(params[0]).device
    layer_names: list[str] = []
    layer_pos: dict[str, int] = {}
    layer_of_tensor: list[int] = []
    for name in names:
        layer = layer_of(name)
        if layer not in layer_pos:
            layer_pos[layer] = len(layer_names)
            layer_names.append(layer)
        layer_of_tensor.append(layer_pos[layer])
    locals_ = [_distributed.local(p) for p in params]
    groups = tuple(
        _Group(tuple(pos), torch.tensor(pos, dtype=torch.long, device=device))
        for pos in _foreach.group_indices(locals_).values()
    )
    return Layout(
        params=params,
        names=names,
        layer_names=tuple(layer_names),
        layer_index=torch.tensor(layer_of_tensor, dtype=torch.long, device=device),
        device=device,
        groups=groups,
        all_params=tuple(p for _, p in pairs),
        trainable_mask=tuple(p.requires_grad for _, p in pairs),
        sharding=_distributed.detect(model, params, device, group),
        false=torch.zeros((), dtype=torch.bool, device=device),
        true=torch.ones((), dtype=torch.bool, device=device),
    )


def layout_for(source: nn.Module | NamedParameters, process_group: Any = None) -> Layout:
    """The parameter layout grad_stats uses for ``source`` (cached for modules)."""
    if not isinstance(source, nn.Module):
        return _build_layout(_named_parameters(source), None, process_group)
    layout = _LAYOUTS.get(source)
    if layout is not None and (
        tuple(map(_get_requires_grad, layout.all_params)) == layout.trainable_mask
        and _distributed.local(layout.params[0]).device == layout.device
        and (process_group is None or _reduces_over(layout, process_group))
    ):
        return layout
    layout = _build_layout(_named_parameters(source), source, process_group)
    _LAYOUTS[source] = layout
    return layout


def _reduces_over(layout: Layout, process_group: Any) -> bool:
    """Whether a cached layout already reduces over ``process_group`` (a group or 1-D mesh)."""
    if layout.sharding is None:
        return not _distributed.available()  # single process: there is nothing to reduce
    wanted = process_group.get_group() if hasattr(process_group, "get_group") else process_group
    return wanted is layout.sharding.group


def forget(model: nn.Module) -> None:
    """Drop the cached parameter layout of ``model``.

    The layout is rebuilt by itself when a parameter is frozen or unfrozen, or the model
    moves device; call this after registering new parameters on a model already measured.
    """
    _LAYOUTS.pop(model, None)


@dataclass(frozen=True, eq=False)
class GradStats:
    """One step's gradient measurements, all as tensors on the model's device.

    Reading any tensor field (``float(stats.total)``) is the caller's choice to sync.

    Attributes:
        per_tensor: fp32 L2 norm of each trainable parameter's gradient (0 where the grad
            is None), in ``names`` order.
        per_layer: fp32 L2 norm over each layer's parameters, in ``layer_names`` order; a
            layer is the module owning the parameters, ordered by registration (depth).
        total: fp32 global L2 norm over every gradient.
        finite: bool, every gradient element is finite.
        overflow: bool, every element is finite but a norm overflowed fp32 accumulation;
            the norms were then recomputed robustly (scaled by the max-abs).
        names: parameter names.
        layer_names: layer names, e.g. ``encoder.layers.3.attn``.
        resolved: whether non-finite norms have been told apart into ``finite=False``
            (a NaN/Inf element) and ``overflow=True``; see :meth:`resolve`.
    """

    per_tensor: Tensor
    total: Tensor
    finite: Tensor
    overflow: Tensor
    names: tuple[str, ...]
    layer_names: tuple[str, ...]
    resolved: bool
    grads: tuple[Tensor | None, ...] = field(repr=False)
    params: tuple[Tensor, ...] = field(repr=False)
    grad_groups: tuple[list[Tensor], ...] = field(repr=False)
    layer_index: Tensor = field(repr=False)
    finite_on_host: bool | None = field(default=None, repr=False)
    loss: Tensor | None = None
    local_squares: Tensor | None = field(default=None, repr=False)
    sharding: _distributed.Sharding | None = field(default=None, repr=False)
    squares: Tensor | None = field(default=None, repr=False)
    _per_layer: Tensor | None = field(default=None, repr=False)

    @property
    def per_layer(self) -> Tensor:
        """fp32 L2 norm over each layer's parameters, in ``layer_names`` order.

        Computed from the global squared norms on first use (a few small kernels, no
        communication), so a clip that needs only the global norm does not pay for it.
        """
        if self._per_layer is None:
            norms = layer_norms(self.global_squares(), self.layer_index, len(self.layer_names))
            object.__setattr__(self, "_per_layer", norms)  # a cache on a frozen record
            return norms
        return self._per_layer

    def global_squares(self) -> Tensor:
        """Per-tensor squared norms over every rank, in fp64 (fp32 on MPS).

        fp32 squares of norms under 1e-19 or over 1.8e19 would leave the fp32 range: a
        vanishing layer's 1e-25 norm must not read 0, a 1e20 norm must not read inf.
        """
        if self.squares is None:
            dtype = _accumulate_dtype(self.per_tensor.device)
            object.__setattr__(self, "squares", self.per_tensor.to(dtype).square())
        assert self.squares is not None
        return self.squares

    def all_reduce_(self, tensor: Tensor, op: str = "sum") -> Tensor:
        """Reduce a per-rank partial result across ranks when the gradients are sharded.

        A no-op for single-process and DDP models (their gradients are whole on every
        rank). Policies that measure more than ``grad_stats`` does use it.
        """
        if self.sharding is None or not self.sharding.sharded:
            return tensor
        return _distributed.all_reduce_(tensor, self.sharding, op)

    def resolve(self) -> GradStats:
        """Tell a NaN/Inf element apart from an overflowed norm; one host read.

        The fused pass cannot tell, without a host sync, a gradient holding an Inf from a
        finite gradient whose fp32 sum of squares overflowed (a 1e25 gradient). When the
        global norm is finite (the common case) this is one host read and nothing else.
        Otherwise each tensor with a non-finite norm is checked element-wise and, if
        finite, its norm is recomputed as ``max|g| * ||g / max|g|||`` in fp64.
        """
        if self.resolved:
            return self
        if bool(self.finite):  # sync: one read, the documented cost of resolving
            return replace(self, resolved=True, finite_on_host=True)
        return _resolve_nonfinite(self)


def _resolve_nonfinite(stats: GradStats) -> GradStats:
    """Recompute non-finite norms robustly; collective (same calls on every rank) if sharded."""
    local = (
        stats.local_squares if stats.local_squares is not None else stats.global_squares()
    ).clone()
    for i in torch.nonzero(~torch.isfinite(stats.per_tensor)).flatten().tolist():
        grad = stats.grads[i]
        if grad is None:  # a missing grad has norm 0: never here, kept for the type checker
            continue
        values = grad.coalesce()._values() if grad.is_sparse else grad
        if values.numel() == 0:  # an empty FSDP2 shard: it adds nothing, its norm is 0
            continue
        if not bool(torch.isfinite(values).all()):
            local[i] = math.nan
            continue
        max_abs = values.abs().max().double().clamp(min=torch.finfo(torch.float64).tiny)
        robust = _foreach.vector_norm(values.double() / max_abs) * max_abs
        divisor = (
            1.0
            if stats.sharding is None or stats.sharding.replicas is None
            else float(stats.sharding.replicas[i])
        )
        local[i] = robust.square().to(local.device) / divisor
    squares = stats.all_reduce_(local)
    all_finite = bool(torch.isfinite(squares).all())  # sync: the rare path only
    device = stats.total.device
    return replace(
        stats,
        per_tensor=squares.sqrt().float(),
        squares=squares,
        _per_layer=None,
        total=squares.sum().sqrt().float(),
        finite=torch.tensor(all_finite, device=device),
        overflow=torch.tensor(all_finite, device=device),
        resolved=True,
        finite_on_host=all_finite,
    )


def layer_norms(squares: Tensor, layer_index: Tensor, n_layers: int) -> Tensor:
    """Per-layer fp32 norms from per-tensor squared norms (summed in their own dtype)."""
    return (
        torch.zeros(n_layers, dtype=squares.dtype, device=squares.device)
        .index_add_(0, layer_index, squares)
        .sqrt_()
        .float()
    )


def _per_tensor_norms(
    layout: Layout, grads: list[Tensor | None]
) -> tuple[Tensor, tuple[list[Tensor], ...]]:
    """Fused per-tensor fp32 norms in parameter order, and the present grads per group."""
    if layout.in_order:
        present = [g for g in grads if g is not None]
        if len(present) == len(grads):
            return _foreach.stacked_norms(present), (present,)
    per_tensor = torch.zeros(len(grads), dtype=torch.float32, device=layout.device)
    grad_groups: list[list[Tensor]] = []
    for group in layout.groups:
        present_pairs = [(i, g) for i in group.positions if (g := grads[i]) is not None]
        positions = [i for i, _ in present_pairs]
        group_grads = [g for _, g in present_pairs]
        grad_groups.append(group_grads)
        if not group_grads:
            continue
        norms = _foreach.stacked_norms(group_grads).to(layout.device)
        index = (
            group.index
            if len(positions) == len(group.positions)
            else torch.tensor(positions, dtype=torch.long).to(layout.device, non_blocking=True)
        )
        per_tensor.index_copy_(0, index, norms)
    return per_tensor, tuple(grad_groups)


def grad_stats(
    model_or_named_parameters: nn.Module | NamedParameters,
    *,
    resolve: bool | None = None,
    loss: Tensor | None = None,
    process_group: Any = None,
) -> GradStats:
    """Measure the gradients of a model in one fused pass, without a host sync.

    Args:
        model_or_named_parameters: a module (its parameter layout is cached, so repeated
            calls do no per-call work beyond collecting the ``.grad`` tensors and the fused
            kernels) or an iterable of ``(name, parameter)`` pairs. DDP-wrapped and FSDP2
            (``fully_shard``) modules work: see ``docs/distributed.md``.
        resolve: tell NaN/Inf elements apart from an overflowed norm (:meth:`GradStats.resolve`).
            ``None`` (default) resolves when the gradients live on the CPU, where reading a
            flag costs no device sync; on an accelerator the statistics stay sync-free and
            ``finite`` is False for an overflowed norm until resolved. On the CPU the
            global norm is always read, so a finite one comes back resolved whatever
            ``resolve`` says.
        loss: this step's loss, carried in the same reduction and averaged across ranks
            when the model is distributed (``stats.loss``).
        process_group: the group (or 1-D device mesh) to reduce over; detected otherwise.

    Returns:
        The statistics, as tensors on the device of the first trainable parameter. Under
        FSDP2 they are global (reduced over the ranks), identical on every rank.

    Raises:
        UnsupportedModelError: no trainable parameter, or an argument that is neither a
            module nor named parameters.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1, bias=False)
        >>> model.weight.grad = torch.tensor([[3.0, 0.0, 4.0]])
        >>> grad_stats(model).total
        tensor(5.)
    """
    layout = layout_for(model_or_named_parameters, process_group)
    grads: list[Tensor | None] = list(map(_get_grad, layout.params))
    sharding = layout.sharding
    if sharding is not None and sharding.sharded:
        grads = [None if g is None else _distributed.local(g) for g in grads]
    per_tensor, grad_groups = _per_tensor_norms(layout, grads)
    # Norms are summed in fp64 (GradStats.global_squares says why). One process: the global
    # norm in one kernel; squared norms only if per-layer norms or a resolve want them.
    local_squares: Tensor | None = None
    squares: Tensor | None = None
    if sharding is None:
        total = _foreach.vector_norm(per_tensor, dtype=layout.accumulate_dtype).float()
        loss = None if loss is None else loss.detach().reshape(()).float()
    else:
        local_squares = per_tensor.to(layout.accumulate_dtype).square()
        if sharding.replicas is not None:
            local_squares = local_squares / sharding.replicas
        squares, loss = _distributed.reduce_squares_and_loss(local_squares, loss, sharding)
        if sharding.sharded:
            per_tensor = squares.sqrt().float()
        loss = None if loss is None else loss.reshape(())
        total = squares.sum().sqrt_().float()
    on_cpu = layout.device.type == "cpu"
    if on_cpu:
        # Reading a CPU tensor is no device sync: one float read instead of isfinite kernels.
        clean_norm = math.isfinite(total.item())
        finite = layout.true if clean_norm else layout.false
    else:
        finite = torch.isfinite(total)
    resolving = resolve or (resolve is None and on_cpu)
    # The common resolved case costs one read and no second record (see GradStats.resolve);
    # on the CPU a finite global norm, already read, leaves nothing to resolve.
    clean = clean_norm if on_cpu else (resolving and bool(finite))  # sync: when resolving
    stats = GradStats(
        per_tensor=per_tensor,
        total=total,
        finite=finite,
        overflow=layout.false,
        names=layout.names,
        layer_names=layout.layer_names,
        resolved=clean,
        finite_on_host=True if clean else None,
        grads=tuple(grads),
        params=layout.params,
        grad_groups=grad_groups,
        layer_index=layout.layer_index,
        loss=loss,
        local_squares=local_squares,
        sharding=sharding,
        squares=squares,
    )
    return _resolve_nonfinite(stats) if resolving and not clean else stats


def iter_grads(stats: GradStats) -> Iterator[tuple[str, Tensor, Tensor]]:
    """Yield ``(name, parameter, grad)`` for every parameter that has a gradient."""
    for name, param, grad in zip(stats.names, stats.params, stats.grads, strict=True):
        if grad is not None:
            yield name, param, grad
