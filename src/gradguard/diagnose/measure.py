"""Measurements of one forward and one backward pass: per layer, and the Jacobian.

Forward hooks on every layer record its output's moments (mean, std, gain, saturated and
dead units, non-finite values) and keep the outputs that require grad; one
``torch.autograd.grad`` call then gives the gradients of the loss for the parameters and
those outputs, without writing any ``.grad``. :func:`build_layers` turns both into
:class:`~gradguard.diagnose.LayerDiagnosis` records; :func:`measure_jacobian` estimates
the per-example input-output Jacobian with ``torch.func``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name
from torch import Tensor, nn

from gradguard import _jacobian
from gradguard._activations import Activation, activation_of
from gradguard.diagnose.records import JacobianDiagnosis, LayerDiagnosis
from gradguard.diagnose.thresholds import EXACT_SVD_MAX, POWER_ITERATIONS, SATURATION_DERIVATIVE
from gradguard.diagnose.verdict import layer_flags
from gradguard.errors import ConfigError, GradGuardError, UnsupportedModelError
from gradguard.stats import ROOT_LAYER, grad_stats

_NAN = float("nan")

# --------------------------------------------------------------------------- recording


@dataclass(frozen=True)
class Call:
    """The arguments of one ``model(*args, **kwargs)``."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass
class Record:
    """What the hooks saw of one layer, accumulated over its calls."""

    name: str
    module: nn.Module
    index: int
    calls: int = 0
    moments: list[Tensor] = field(default_factory=list)  # per call: see _moments
    outputs: list[Tensor] = field(default_factory=list)  # outputs that require grad
    note: str | None = None
    rnn_call: Call | None = None  # the first call of an RNN/LSTM/GRU module


def first_float(value: Any) -> Tensor | None:
    """The first floating-point tensor in a (nested) output, depth first."""
    if isinstance(value, Tensor):
        return value if value.is_floating_point() else None
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, list | tuple):
        for item in value:
            found = first_float(item)
            if found is not None:
                return found
    return None


def _saturated(kind: str, y: Tensor) -> Tensor | None:
    """Count of outputs where the derivative is below SATURATION_DERIVATIVE of its peak."""
    if kind == "sigmoid":
        deriv = y * (1 - y) / 0.25
    elif kind == "tanh":
        deriv = 1 - y.square()
    elif kind == "softsign":
        deriv = (1 - y.abs()).square()
    elif kind in ("hardtanh", "hardsigmoid"):
        lo, hi = (0.0, 1.0) if kind == "hardsigmoid" else (-1.0, 1.0)
        return ((y <= lo) | (y >= hi)).sum()
    else:
        return None
    return (deriv < SATURATION_DERIVATIVE).sum()


def _dead(y: Tensor, batch_dim: int) -> Tensor | None:
    if y.dim() <= batch_dim or y.shape[batch_dim] == 0:
        return None
    rows = y.movedim(batch_dim, 0).reshape(y.shape[batch_dim], -1)
    return (rows <= 0).all(dim=0).double().mean()


def _zero_below(act: Activation) -> bool:
    """Whether the activation passes no gradient below zero, so a unit can die (ReLU, ReLU6).

    A leaky ReLU, ELU, GELU or SiLU passes some gradient there: its units never die.
    """
    return act.kind in ("relu", "relu6") or (act.kind == "leaky_relu" and act.slope == 0)


def _moments(module: nn.Module, x: Tensor | None, y: Tensor, batch_dim: int) -> Tensor:
    """[n, Σy, Σy², n_x, Σx, Σx², saturated, dead, non-finite] of one call, fp64.

    One tensor per call, kept on the device: a layer's calls are summed and copied to the
    host once (:func:`_activity`).
    """
    y64 = y.detach().double()
    act = activation_of(module)
    kind = act.kind if act is not None else ""
    sat = _saturated(kind, y64)
    dead = _dead(y64, batch_dim) if act is not None and _zero_below(act) else None
    values = [
        torch.tensor(float(y64.numel()), dtype=torch.float64, device=y.device),
        y64.sum(),
        y64.square().sum(),
    ]
    if x is not None:
        x64 = x.detach().double()
        values += [torch.tensor(float(x64.numel()), dtype=torch.float64, device=y.device)]
        values += [x64.sum(), x64.square().sum()]
    else:
        values += [torch.tensor(_NAN, dtype=torch.float64, device=y.device)] * 3
    nan = torch.tensor(_NAN, dtype=torch.float64, device=y.device)
    values += [sat.double() if sat is not None else nan, dead if dead is not None else nan]
    values += [(~torch.isfinite(y64)).sum().double()]
    return torch.stack(values)


def infer_batch_dim(model: nn.Module) -> int:
    """1 when the first module with a ``batch_first`` attribute has it False, else 0.

    ``nn.RNN``/``LSTM``/``GRU``, ``nn.MultiheadAttention`` and the Transformer layers take
    (sequence, batch, feature) inputs by default; the first one registered decides.
    """
    for module in model.modules():
        flag = getattr(module, "batch_first", None)
        if isinstance(flag, bool):
            return 0 if flag else 1
    return 0


def owns_params(module: nn.Module) -> bool:
    """Whether ``module`` has parameters of its own (not only in its children)."""
    return any(True for _ in module.parameters(recurse=False))


class Recorder:
    """Forward hooks on every layer: statistics and outputs (for gradients), in order."""

    def __init__(self, model: nn.Module, batch_dim: int) -> None:
        self.model = model
        self.batch_dim = batch_dim
        self.records: dict[int, Record] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._names = {id(m): (n or ROOT_LAYER) for n, m in model.named_modules()}

    def __enter__(self) -> Recorder:
        for module in self.model.modules():
            if not list(module.children()) or owns_params(module):
                self._handles.append(module.register_forward_hook(self._post, with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()

    def _post(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        record = self.records.get(id(module))
        if record is None:
            record = Record(self._names[id(module)], module, len(self.records))
            self.records[id(module)] = record
        record.calls += 1
        if isinstance(module, nn.RNNBase) and record.rnn_call is None:
            record.rnn_call = Call(tuple(args), dict(kwargs))
        y = first_float(output)
        if y is None:
            record.note = "output is not a floating-point tensor: no activation statistics"
            return
        record.moments.append(_moments(module, first_float(args), y, self.batch_dim))
        if y.requires_grad:
            record.outputs.append(y)


# --------------------------------------------------------------------------- forward/backward


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters that require grad, by name; raises when there are none to diagnose."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(
            f"diagnose expects an nn.Module, got {type(model).__name__}; pass the model."
        )
    named = list(model.named_parameters())
    if not named:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no parameters, so there are no gradients to "
            "diagnose; pass the network itself (with its layers), not a parameter-free "
            "wrapper or function."
        )
    found = [(n, p) for n, p in named if p.requires_grad]
    if not found:
        raise UnsupportedModelError(
            f"all {len(named)} parameters of {type(model).__name__} are frozen; unfreeze "
            "the ones to diagnose with p.requires_grad_(True)."
        )
    return found


def as_call(inputs: Any) -> Call:
    """A tensor, a tuple/list of positional arguments or a dict of keyword arguments."""
    if isinstance(inputs, Tensor):
        return Call((inputs,), {})
    if isinstance(inputs, Mapping) and all(isinstance(k, str) for k in inputs):
        return Call((), dict(inputs))
    if isinstance(inputs, tuple | list) and inputs:
        return Call(tuple(inputs), {})
    raise ConfigError(
        f"inputs must be a tensor, a non-empty tuple/list of positional arguments or a "
        f"dict of keyword arguments for model(...); got {type(inputs).__name__}."
    )


def forward(model: nn.Module, call: Call) -> Any:
    """``model(*call.args, **call.kwargs)``; a failure is the caller's inputs: ConfigError."""
    try:
        return model(*call.args, **call.kwargs)
    except GradGuardError:
        raise
    except Exception as error:
        values = (*call.args, *call.kwargs.values())
        shapes = [tuple(a.shape) for a in values if isinstance(a, Tensor)]
        raise ConfigError(
            f"the model failed on the inputs given (tensor shapes {shapes}): "
            f"{type(error).__name__}: {error}. Pass inputs the model accepts: a tensor, a "
            "tuple of positional arguments or a dict of keyword arguments."
        ) from error


def _supervised_loss(primary: Tensor | None, targets: Tensor) -> Tensor:
    """Cross-entropy for integer targets, MSE for float targets of the output's shape."""
    if primary is not None and not targets.is_floating_point() and primary.dim() >= 2:
        if targets.shape == primary.shape[:1] + primary.shape[2:]:
            return F.cross_entropy(primary, targets)
        if targets.shape == primary.shape[:-1]:
            return F.cross_entropy(primary.reshape(-1, primary.shape[-1]), targets.reshape(-1))
    if primary is not None and targets.is_floating_point() and targets.shape == primary.shape:
        return F.mse_loss(primary, targets)
    shape = None if primary is None else tuple(primary.shape)
    raise ConfigError(
        f"no default loss for targets of shape {tuple(targets.shape)} and dtype "
        f"{targets.dtype} with an output of shape {shape}; pass loss_fn=(output, targets) "
        "-> scalar tensor."
    )


def loss_of(
    output: Any,
    targets: Any,
    loss_fn: Callable[..., Tensor] | None,
    *,
    seed: int,
) -> Tensor:
    """The loss to differentiate; without loss_fn and targets, a random linear readout.

    The readout ``mean(y * r)``, r ~ N(0, 1) fixed by ``seed``, of the output's first
    floating-point tensor ``y`` sends back the same gradient whatever the output's scale:
    the gradients measure the network, not the loss (a squared output would turn a 1e22
    activation into an overflowed 1e44 loss).
    """
    primary = first_float(output)
    if loss_fn is not None:
        try:
            loss = loss_fn(output, targets) if targets is not None else loss_fn(output)
        except Exception as error:
            raise ConfigError(f"loss_fn failed: {type(error).__name__}: {error}") from error
    elif targets is not None:
        if not isinstance(targets, Tensor):
            raise ConfigError(f"targets must be a tensor, got {type(targets).__name__}")
        loss = _supervised_loss(primary, targets)
    else:
        if primary is None:
            raise ConfigError(
                "the model's output holds no floating-point tensor to build a default loss "
                "from; pass loss_fn=(output) -> scalar tensor."
            )
        generator = torch.Generator().manual_seed(seed)
        readout = torch.randn(primary.shape, generator=generator, dtype=torch.float32)
        loss = (primary * readout.to(primary.device, primary.dtype)).mean()
    if not isinstance(loss, Tensor) or loss.numel() != 1 or loss.grad_fn is None:
        raise ConfigError(
            "the loss must be a scalar tensor that depends on the parameters; got "
            f"{type(loss).__name__}"
            + (f" of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else "")
        )
    return loss


def backward(
    loss: Tensor, params: Sequence[Tensor], outputs: Sequence[Tensor]
) -> tuple[list[Tensor | None], list[Tensor | None]]:
    """Gradients of the loss for the parameters and the recorded outputs; no ``.grad``."""
    grads = torch.autograd.grad(loss, [*params, *outputs], allow_unused=True)
    return list(grads[: len(params)]), list(grads[len(params) :])


def param_grad_norms(
    named: Sequence[tuple[str, Tensor]], grads: Sequence[Tensor | None]
) -> tuple[dict[str, float], float]:
    """Per-layer and global gradient norms via grad_stats, on aliases of the parameters.

    The aliases share storage with the parameters but own the ``.grad``: the model's
    own ``.grad`` fields are never written.
    """
    pairs = []
    used: set[str] = set()
    for (name, param), grad in zip(named, grads, strict=True):
        alias = param.detach().requires_grad_(True)
        if grad is not None:
            alias.grad = grad.detach()
            used.add(name.rpartition(".")[0] or ROOT_LAYER)
        pairs.append((name, alias))
    stats = grad_stats(pairs, resolve=True)
    per_layer = dict(zip(stats.layer_names, stats.per_layer.tolist(), strict=True))
    return {k: v for k, v in per_layer.items() if k in used}, float(stats.total)


# --------------------------------------------------------------------------- per layer


def _weight_of(module: nn.Module) -> Tensor | None:
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor) and weight.dim() >= 1:
        return weight
    for _, param in module.named_parameters(recurse=False):
        if param.dim() >= 2:
            return param
    return None


def largest_singular_value(matrix: Tensor, seed: int = 0) -> float:
    """σ_max of a 2-D tensor: exact up to EXACT_SVD_MAX on a side, else power iteration."""
    w = matrix.detach().double()
    if min(w.shape) <= EXACT_SVD_MAX:
        return float(torch.linalg.svdvals(w)[0])
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(w.shape[1], generator=generator, dtype=torch.float64).to(w.device)
    sigma = 0.0
    for _ in range(POWER_ITERATIONS):
        u = w @ v
        sigma = float(u.norm())
        if sigma == 0.0 or not math.isfinite(sigma):
            return sigma
        v = w.T @ (u / sigma)
        v = v / v.norm()
    return float((w @ v).norm())


def _weight_stats(module: nn.Module) -> tuple[float | None, float | None]:
    """The weight's Frobenius norm and largest singular value (None where there is none)."""
    weight = _weight_of(module)
    if weight is None:
        return None, None
    norm = float(weight.detach().double().norm())
    if weight.dim() < 2 or weight.numel() == 0:
        return norm, None
    return norm, largest_singular_value(weight.reshape(weight.shape[0], -1))


@dataclass(frozen=True)
class _Activity:
    """A layer's output over all its calls; None where not measured (no float output)."""

    mean: float | None = None
    std: float | None = None
    gain: float | None = None  # output std over input std
    saturated: float | None = None  # share of outputs; None: not a sigmoid/tanh-like layer
    dead: float | None = None  # share of units; None: not a ReLU-like layer
    nonfinite: float = 0.0  # count of inf/NaN outputs


def _activity(moments: list[Tensor]) -> _Activity:
    if not moments:
        return _Activity()
    m = torch.stack(moments).cpu()  # sync: one copy per layer, once per diagnosis
    n, s, ss, nx, sx, ssx = (float(v) for v in m[:, :6].nansum(dim=0))
    mean = s / n if n else _NAN
    std = math.sqrt(max(ss / n - mean * mean, 0.0)) if n else _NAN
    x_std = None
    if nx and not math.isnan(float(m[0, 3])):
        x_mean = sx / nx
        x_std = math.sqrt(max(ssx / nx - x_mean * x_mean, 0.0))
    sat = m[:, 6]
    dead = m[:, 7]
    return _Activity(
        mean=mean,
        std=std,
        gain=std / x_std if x_std else None,
        saturated=None if bool(sat.isnan().all()) else float(sat.nansum()) / n,
        dead=None if bool(dead.isnan().all()) else float(dead.nanmean()),
        nonfinite=float(m[:, 8].sum()),
    )


def out_grad_norms(
    records: Sequence[Record], grads: Sequence[Tensor | None]
) -> dict[str, float | None]:
    """‖∂loss/∂output‖ per layer, over all its calls (grads in the order of the outputs)."""
    norms: dict[str, float | None] = {}
    start = 0
    for record in records:
        mine = grads[start : start + len(record.outputs)]
        start += len(record.outputs)
        squares = [g.detach().double().square().sum() for g in mine if g is not None]
        norms[record.name] = float(torch.stack(squares).sum().sqrt()) if squares else None
    return norms


def _reference(records: Sequence[Record], out_norms: Mapping[str, float | None]) -> float | None:
    """The output gradient of the last parametrized layer: the yardstick of depth."""
    for record in reversed(records):
        norm = out_norms.get(record.name)
        if owns_params(record.module) and norm is not None and norm > 0 and math.isfinite(norm):
            return norm
    return None


def build_layers(
    records: Sequence[Record],
    param_norms: Mapping[str, float],
    out_norms: Mapping[str, float | None],
    followers: Mapping[str, Activation],
) -> list[LayerDiagnosis]:
    """One record per layer, in run order, with its flags."""
    reference = _reference(records, out_norms)
    layers = []
    for record in records:
        activity = _activity(record.moments)
        out_norm = out_norms.get(record.name)
        relative = out_norm / reference if out_norm is not None and reference else None
        weight_norm, sv_max = _weight_stats(record.module)
        follower = followers.get(record.name)
        layers.append(
            LayerDiagnosis(
                name=record.name,
                kind=type(record.module).__name__,
                index=record.index,
                calls=record.calls,
                parameters=sum(p.numel() for p in record.module.parameters(recurse=False)),
                activation_mean=activity.mean,
                activation_std=activity.std,
                saturated_fraction=activity.saturated,
                dead_fraction=activity.dead,
                grad_norm=param_norms.get(record.name),
                output_grad_norm=out_norm,
                relative_grad=relative,
                weight_norm=weight_norm,
                weight_sv_max=sv_max,
                gain=activity.gain,
                followed_by=str(follower) if follower is not None else None,
                flags=layer_flags(
                    relative,
                    saturated=activity.saturated,
                    dead=activity.dead,
                    nonfinite=activity.nonfinite,
                ),
                note=record.note,
            )
        )
    return layers


def unrun_owners(model: nn.Module, records: Sequence[Record]) -> list[Record]:
    """Add parameter owners never called as modules, after their closest recorded ancestor.

    ``MultiheadAttention.out_proj`` is one: attention uses its weight directly.
    """
    ordered = list(records)
    seen = {id(r.module) for r in records}
    for name, module in model.named_modules():
        if id(module) in seen or not owns_params(module):
            continue
        record = Record(name or ROOT_LAYER, module, -1, note="not called as a module")
        position = len(ordered)
        for i, existing in enumerate(ordered):
            if name.startswith(existing.name + "."):
                position = i + 1
        ordered.insert(position, record)
    for i, record in enumerate(ordered):
        record.index = i
    return ordered


# --------------------------------------------------------------------------- Jacobian


@contextmanager
def _transformable(model: nn.Module) -> Iterator[None]:
    """Let ``torch.func`` transform the forward pass.

    BatchNorm in training mode updates its running statistics in place, which
    ``torch.func`` refuses for captured tensors; with ``track_running_stats`` off for the
    duration it normalizes with the same batch statistics and updates nothing. The CPU
    flash-attention kernel has no forward-mode derivative: use the math kernel.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    norms = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    for module in norms:
        module.track_running_stats = False
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        for module in norms:
            module.track_running_stats = True


def measure_jacobian(
    model: nn.Module, call: Call, *, batch_dim: int, samples: int, seed: int
) -> tuple[JacobianDiagnosis | None, str | None]:
    """The per-example input-output Jacobian, or None and a note saying why not."""
    args, kwargs = call.args, call.kwargs
    positions = [i for i, a in enumerate(args) if _is_float_tensor(a)]
    keys = [k for k, v in kwargs.items() if _is_float_tensor(v)]
    if not positions and not keys:
        return None, "no floating-point input (e.g. token ids): no input-output Jacobian"

    # Detached parameters: torch.func differentiates the inputs only, and no autograd graph
    # to the parameters is built along the way.
    params = {name: p.detach() for name, p in model.named_parameters()}

    def fn(*xs: Tensor) -> Tensor:
        new_args = list(args)
        for i, x in zip(positions, xs, strict=False):
            new_args[i] = x
        new_kwargs = {**kwargs, **dict(zip(keys, xs[len(positions) :], strict=True))}
        output = torch.func.functional_call(model, params, tuple(new_args), new_kwargs)
        y = first_float(output)
        if y is None:
            raise ConfigError("the output holds no floating-point tensor")
        return y

    inputs = [args[i] for i in positions] + [kwargs[k] for k in keys]
    try:
        with _transformable(model):
            spectrum = _jacobian.estimate(
                fn, inputs, batch_dim=batch_dim, samples=samples, seed=seed
            )
    except Exception as error:  # noqa: BLE001 - an operator torch.func cannot transform
        return None, f"Jacobian not measured: {type(error).__name__}: {error}"
    return (
        JacobianDiagnosis(
            top_singular_values=spectrum.top,
            mean_squared_singular_value=spectrum.mean_sq,
            in_features=spectrum.in_features,
            out_features=spectrum.out_features,
            samples=spectrum.samples,
            products=spectrum.products,
            exact=spectrum.exact,
            mode=spectrum.mode,
            matvec=spectrum.matvec,
        ),
        None,
    )


def _is_float_tensor(value: Any) -> bool:
    return isinstance(value, Tensor) and value.is_floating_point()
