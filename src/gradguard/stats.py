"""Gradient statistics in one fused pass: per-tensor, per-layer and global norms, finiteness.

Everything downstream (clipping, detection, logging) reads these numbers, so they are
computed once per step, on the device, with fp32 accumulation (fp64 for fp64 gradients)
and without a host sync: ``torch._foreach_norm`` once per (device, dtype) group, then a
handful of small kernels over the per-tensor norms.
"""

from __future__ import annotations

import math
import operator
import sys
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeAlias

import torch
from torch import Tensor, nn

from gradguard import _batched, _distributed, _flat, _foreach
from gradguard.errors import ConfigError, UnsupportedModelError

NamedParameters: TypeAlias = Iterable[tuple[str, Tensor]]
ROOT_LAYER = "(root)"

_get_grad = operator.attrgetter("grad")
_get_requires_grad = operator.attrgetter("requires_grad")
_get_version = operator.attrgetter("_version")


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
    wide: bool = False  # some gradient is fp64: its norms are kept in fp64 (not on MPS)
    first_dtype: torch.dtype = torch.float32  # of params[0], to notice model.to(dtype)
    # On the CPU: small tensors of one shape, measured stacked (see _stacked_norms).
    shape_batches: tuple[tuple[tuple[int, ...], Tensor], ...] | None = None

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


#: The attribute ``torch.compile`` keeps the compiled module under (``OptimizedModule``).
_COMPILED_ATTRIBUTE = "_orig_mod"


def uncompiled(model: nn.Module) -> nn.Module:
    """The module ``torch.compile(model)`` wrapped, or ``model`` itself when not compiled.

    A compiled module shares its parameters with the original, so measuring either is
    the same; the original carries the model's own names.
    """
    dynamo = sys.modules.get("torch._dynamo.eval_frame")  # imported by any torch.compile
    compiled_type = getattr(dynamo, "OptimizedModule", None)
    while compiled_type is not None and isinstance(model, compiled_type):
        model = getattr(model, _COMPILED_ATTRIBUTE)
    return model


def own_name(name: str) -> str:
    """A parameter or module name without the ``_orig_mod`` segments of compiled submodules."""
    if _COMPILED_ATTRIBUTE not in name:
        return name
    return ".".join(part for part in name.split(".") if part != _COMPILED_ATTRIBUTE)


def named_parameters(model: nn.Module) -> list[tuple[str, Tensor]]:
    """``model.named_parameters()`` under the model's own names, compiled parts included."""
    return [(own_name(n), p) for n, p in uncompiled(model).named_parameters()]


def named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``model.named_modules()`` under the model's own names, without compile wrappers."""
    compiled = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", ())
    return [
        (own_name(n), m)
        for n, m in uncompiled(model).named_modules()
        if not isinstance(m, compiled)
    ]


def _named_parameters(source: nn.Module | NamedParameters) -> list[tuple[str, Tensor]]:
    if isinstance(source, nn.Module):
        return named_parameters(source)
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
    wide = _accumulate_dtype(device) == torch.float64 and any(
        p.dtype == torch.float64 for p in locals_
    )
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
        wide=wide,
        first_dtype=locals_[0].dtype,
        shape_batches=_batched.cpu_plan(locals_) if len(groups) == 1 else None,
    )


def layout_for(source: nn.Module | NamedParameters, process_group: Any = None) -> Layout:
    """The parameter layout grad_stats uses for ``source`` (cached for modules)."""
    if not isinstance(source, nn.Module):
        return _build_layout(_named_parameters(source), None, process_group)
    layout = _LAYOUTS.get(source)
    if layout is None and (original := uncompiled(source)) is not source:
        source = original  # torch.compile(model): measured as the module it wraps
        layout = _LAYOUTS.get(source)
    if layout is not None and (
        tuple(map(_get_requires_grad, layout.all_params)) == layout.trainable_mask
        and (first := _distributed.local(layout.params[0])).device == layout.device
        and first.dtype == layout.first_dtype  # model.double() after a first measurement
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
    moves device or changes dtype; call this after registering new parameters on a model
    already measured.
    """
    _LAYOUTS.pop(uncompiled(model), None)


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
        finite: bool. Once resolved: every element of every gradient is finite (no NaN, no
            Inf). Unresolved: the global norm is finite, so a finite gradient whose fp32
            norm overflowed reads False until :meth:`resolve`.
        overflow: bool, every element is finite but a norm overflowed fp32: the fused fp32
            sum of squares (elements from about 1.8e19), or the fp32 range itself (a true
            norm above 3.4e38, which reads inf in the fp32 fields). Resolving recomputes
            overflowed norms robustly, scaled by the max-abs. False until resolved, except
            with fp64 gradients, whose fp64 norm tells it without a read.
        total_fp64: the global norm in fp64 when some gradient is fp64, else None. ``total``
            is this norm rounded to fp32 (inf above 3.4e38); policies clip by this one, so
            fp64 gradients whose norm exceeds the fp32 range are clipped like torch's
            ``clip_grad_norm_`` clips them.
        per_tensor_fp64: the per-tensor norms in fp64 when ``total_fp64`` is set, else None.
        grad_groups: the present gradients per (device, dtype) group, the tensors clip
            policies scale or clamp in place: with a flat buffer (:func:`flatten_grads_`)
            in use, each group is the one buffer. Per-tensor gradients are ``grads``.
        versions: each measured gradient's version counter (-1 where None), or None when
            measured with ``fingerprint=False``; see :meth:`check_source`.
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
    total_fp64: Tensor | None = None
    per_tensor_fp64: Tensor | None = field(default=None, repr=False)
    versions: tuple[int, ...] | None = field(default=None, repr=False)

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
            if self.per_tensor_fp64 is not None:
                squares = self.per_tensor_fp64.square()
            else:
                squares = self.per_tensor.to(_accumulate_dtype(self.per_tensor.device)).square()
            object.__setattr__(self, "squares", squares)
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

    def check_source(self, model: nn.Module | NamedParameters | None = None) -> None:
        """Raise unless these statistics describe ``model``'s gradients as they are now.

        Host-only (no device sync): compares the trainable parameters with those measured
        (skipped when ``model`` is None), each parameter's ``.grad`` with the tensor
        measured (a ``zero_grad()`` then ``backward()`` replaces it), and, unless measured
        with ``grad_stats(..., fingerprint=False)``, each gradient's version counter with
        the one recorded (``zero_grad(set_to_none=False)``, a backward accumulating into it
        or a clip writes it in place). :func:`gradguard.clip_` calls it on the statistics
        it is given.

        Raises:
            ConfigError: naming the mismatch and the fix (measure again).
        """
        if model is not None:
            self._check_parameters(model)
        fix = (
            "Statistics describe the gradients at the moment grad_stats measured them: "
            "measure again after the last backward (stats = gradguard.grad_stats(model)), "
            "or call gradguard.clip_(model, policy) without stats to measure and clip at once."
        )
        current = list(map(_get_grad, self.params))
        if self.sharding is not None and self.sharding.sharded:
            current = [None if g is None else _distributed.local(g) for g in current]
        if not all(map(operator.is_, current, self.grads)):
            pairs = enumerate(zip(current, self.grads, strict=True))
            i = next(i for i, (a, b) in pairs if a is not b)
            if self.grads[i] is None:
                change = "had no gradient when measured and has one now"
            elif current[i] is None:
                change = "has had its .grad set to None since"
            else:
                change = "holds a new .grad tensor (zero_grad() and another backward() replaced it)"
            raise ConfigError(f"stale GradStats: {self.names[i]!r} {change}. {fix}")
        if self.versions is not None and _versions(self.grads) != self.versions:
            now = _versions(self.grads)
            i = next(i for i, (a, b) in enumerate(zip(now, self.versions, strict=True)) if a != b)
            raise ConfigError(
                f"stale GradStats: the .grad of {self.names[i]!r} was written in place since "
                "it was measured (zero_grad(set_to_none=False), another backward() "
                f"accumulating into it, or a clip). {fix}"
            )

    def _check_parameters(self, model: nn.Module | NamedParameters) -> None:
        if isinstance(model, nn.Module):
            layout = _LAYOUTS.get(model)
            if layout is not None and layout.params is self.params:
                return  # the cached layout these statistics were measured with
        trainable = [p for _, p in _named_parameters(model) if p.requires_grad]
        if len(trainable) == len(self.params) and all(map(operator.is_, trainable, self.params)):
            return
        raise ConfigError(
            f"these GradStats were measured on other parameters: {len(self.params)} tensors "
            f"({', '.join(self.names[:3])}{', ...' if len(self.names) > 3 else ''}), not "
            f"this model's {len(trainable)} trainable ones (another model, or parameters "
            "frozen, unfrozen or replaced since). Pass the statistics of this model "
            "(stats = gradguard.grad_stats(model) after its backward), or call "
            "gradguard.clip_(model, policy) without stats to measure it."
        )


def _versions(grads: Sequence[Tensor | None]) -> tuple[int, ...]:
    """Each gradient's version counter (-1 for a missing one): attribute reads, no sync."""
    try:
        return tuple(map(_get_version, grads))
    except AttributeError:  # a None among them
        return tuple(-1 if g is None else g._version for g in grads)


def _scaled_norm(norms: Tensor) -> Tensor:
    """The L2 norm of non-negative ``norms`` without overflow: ``max * ||norms / max||``.

    NaN if one is NaN, inf if one is inf; a host read (the rare, resolving path only).
    """
    peak = float(norms.max()) if norms.numel() else 0.0  # sync: rare path
    if not 0.0 < peak < math.inf:
        return torch.full((), peak, dtype=norms.dtype, device=norms.device)
    return _foreach.vector_norm(norms / peak) * peak


def _resolve_nonfinite(stats: GradStats) -> GradStats:
    """Recompute non-finite norms robustly; collective (same calls on every rank) if sharded."""
    wide = stats.per_tensor_fp64 is not None
    norms_before = stats.per_tensor_fp64 if stats.per_tensor_fp64 is not None else stats.per_tensor
    reduce = stats.sharding is not None
    if reduce:  # per-rank squared norms, to be summed across ranks
        local = (
            stats.local_squares if stats.local_squares is not None else stats.global_squares()
        ).clone()
    else:  # norms, kept as norms: an fp64 norm above 1e154 has no fp64 square
        dtype = _accumulate_dtype(stats.per_tensor.device)
        local = norms_before.to(dtype, copy=True)
    for i in torch.nonzero(~torch.isfinite(norms_before)).flatten().tolist():
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
        if not reduce:
            local[i] = robust.to(local.device)
            continue
        divisor = (
            1.0
            if stats.sharding is None or stats.sharding.replicas is None
            else float(stats.sharding.replicas[i])
        )
        local[i] = robust.square().to(local.device) / divisor
    if reduce:
        # fp64 norms above 1e154 leave the fp64 range when squared: under FSDP2 such a
        # norm reads inf (a NaN still marks a NaN/Inf element).
        squares = stats.all_reduce_(local)
        norms = squares.sqrt()
        total = squares.sum().sqrt()
    else:
        norms, total = local, _scaled_norm(local)
        squares = local.square()
    all_finite = not bool(torch.isnan(total))  # sync: the rare path only; NaN marks a bad element
    device = stats.total.device
    return replace(
        stats,
        per_tensor=norms.float(),
        per_tensor_fp64=norms if wide else None,
        squares=squares,
        _per_layer=None,
        total=total.float(),
        total_fp64=total if wide else None,
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


def group_norms(tensors: list[Tensor], ord: float = 2.0, wide: bool = False) -> Tensor:
    """Per-tensor ``ord``-norms of one (device, dtype) group, fused.

    fp32 (accumulated in fp32, see :func:`gradguard._foreach.stacked_norms`), except for an
    fp64 group when ``wide``: fp64, so a norm beyond the fp32 range stays finite.
    """
    if not (wide and tensors[0].dtype == torch.float64):
        return _foreach.stacked_norms(tensors, ord)
    try:
        norms = list(torch._foreach_norm(tensors, ord))
    except (RuntimeError, NotImplementedError):  # sparse: the norm of the coalesced values
        norms = [_foreach.norm_of(t, ord) for t in tensors]
    return torch.stack(norms)


def _stacked_norms(
    batches: tuple[tuple[tuple[int, ...], Tensor], ...], grads: list[Tensor], wide: bool
) -> Tensor | None:
    """Per-tensor norms of one CPU group: small tensors of one shape stacked, the rest fused.

    Bitwise :func:`group_norms`, in one kernel per shape instead of one per tensor (the
    1,000 gradients of the 500-layer benchmark MLP: 0.3 ms instead of 1.5 ms). None when
    a stacked gradient is sparse: the caller then measures as usual.
    """
    fp64 = grads[0].dtype == torch.float64
    norms = torch.empty(len(grads), dtype=torch.float64 if fp64 else torch.float32)
    alone, alone_index = batches[-1]
    if not _batched.fill_stacked_norms(batches[:-1], grads, norms):
        return None
    if alone:
        singles = group_norms([grads[i] for i in alone], wide=wide)
        norms.index_copy_(0, alone_index, singles.to(norms.dtype))
    return norms if wide and fp64 else norms.float()


def _per_tensor_norms(
    layout: Layout, grads: list[Tensor | None]
) -> tuple[Tensor, tuple[list[Tensor], ...]]:
    """Fused per-tensor norms in parameter order, and the present grads per group.

    fp32, or fp64 when the layout is wide (some gradient is fp64).
    """
    wide = layout.wide
    if layout.in_order:
        present = [g for g in grads if g is not None]
        if len(present) == len(grads):
            if layout.shape_batches is not None:
                stacked = _stacked_norms(layout.shape_batches, present, wide)
                if stacked is not None:
                    return stacked, (present,)
            return group_norms(present, wide=wide), (present,)
    dtype = torch.float64 if wide else torch.float32
    per_tensor = torch.zeros(len(grads), dtype=dtype, device=layout.device)
    grad_groups: list[list[Tensor]] = []
    for group in layout.groups:
        present_pairs = [(i, g) for i in group.positions if (g := grads[i]) is not None]
        positions = [i for i, _ in present_pairs]
        group_grads = [g for _, g in present_pairs]
        grad_groups.append(group_grads)
        if not group_grads:
            continue
        norms = group_norms(group_grads, wide=wide).to(layout.device, dtype)
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
    fingerprint: bool = True,
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
        fingerprint: record each gradient's version counter (one attribute read per
            tensor, on the host), so that :func:`gradguard.clip_` can refuse these
            statistics once a gradient was written in place. ``False`` saves those reads
            for a caller that clips at once; a replaced gradient or another model is still
            refused.

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
    # A flat buffer (flatten_grads_) is used only while the grads are exactly its views.
    flat = _flat.find(layout.params[0])
    if flat is not None and flat.holds(grads):
        per_tensor, grad_groups = flat.norms(layout.wide)
    else:
        if flat is not None:
            flat.warn_detached(grads)
            flat = None
        per_tensor, grad_groups = _per_tensor_norms(layout, grads)
    # fp64 gradients keep fp64 norms beside the fp32 ones: a 1e31 norm is finite in fp64.
    per_tensor_fp64 = per_tensor if layout.wide else None
    # Norms are summed in fp64 (GradStats.global_squares says why). One process: the global
    # norm in one kernel; squared norms only if per-layer norms or a resolve want them.
    local_squares: Tensor | None = None
    squares: Tensor | None = None
    if sharding is None:
        norm = _foreach.vector_norm(per_tensor, dtype=layout.accumulate_dtype)
        loss = None if loss is None else loss.detach().reshape(()).float()
    else:
        local_squares = per_tensor.to(layout.accumulate_dtype).square()
        if sharding.replicas is not None:
            local_squares = local_squares / sharding.replicas
        squares, loss = _distributed.reduce_squares_and_loss(local_squares, loss, sharding)
        if sharding.sharded:
            per_tensor = squares.sqrt()
            per_tensor_fp64 = per_tensor if layout.wide else None
        loss = None if loss is None else loss.reshape(())
        norm = squares.sum().sqrt_()
    total = norm.float()
    per_tensor = per_tensor.float()  # no kernel when already fp32
    # Which norm decides ``finite``: the fp32 one, or the fp64 one for fp64 gradients (then
    # ``overflow`` is known without a read: finite in fp64, beyond the fp32 range).
    total_fp64 = norm if layout.wide else None
    on_cpu = layout.device.type == "cpu"
    overflow = layout.false
    if on_cpu:
        # Reading a CPU tensor is no device sync: one float read instead of isfinite kernels.
        clean_norm = math.isfinite((norm if layout.wide else total).item())
        finite = layout.true if clean_norm else layout.false
        if layout.wide and clean_norm and not math.isfinite(total.item()):
            overflow = layout.true
    elif layout.wide:
        finite = torch.isfinite(norm)
        overflow = finite & torch.isinf(total)
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
        overflow=overflow,
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
        total_fp64=total_fp64,
        per_tensor_fp64=per_tensor_fp64,
        versions=None if not fingerprint else _versions(grads) if flat is None else flat.versions(),
    )
    return _resolve_nonfinite(stats) if resolving and not clean else stats


def iter_grads(stats: GradStats) -> Iterator[tuple[str, Tensor, Tensor]]:
    """Yield ``(name, parameter, grad)`` for every parameter that has a gradient."""
    for name, param, grad in zip(stats.names, stats.params, stats.grads, strict=True):
        if grad is not None:
            yield name, param, grad
