"""Which activation follows each weight layer: shared by :mod:`gradguard.init` and diagnosis.

An initialization scheme is chosen for the nonlinearity after a layer (He before the ReLU
family, Xavier before tanh, sigmoid or none, LeCun before SELU), and a diagnosis annotates
each layer with it and counts dead or saturated units by it. The activation is found by
tracing the model with ``torch.fx`` (which also sees ``torch.relu`` and
``F.leaky_relu(x, 0.2)`` called in ``forward``); where the model does not trace, from the
order in which modules run (one forward pass on a sample, or a diagnosis's own hooks), or
else from the order in which they are registered.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name
from torch import nn

WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Bilinear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
"""Modules whose ``weight`` maps a fan-in to a fan-out: the layers schemes apply to."""

NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
)
"""Normalization layers; :func:`initialize` resets them to weight 1, bias 0."""


@dataclass(frozen=True)
class Activation:
    """A nonlinearity as far as initialization cares: its kind and a leaky slope.

    Attributes:
        kind: ``"linear"`` (none), ``"sigmoid"``, ``"tanh"``, ``"hardtanh"``,
            ``"softsign"``, ``"hardsigmoid"``, ``"relu"``, ``"leaky_relu"``, ``"elu"``,
            ``"gelu"``, ``"silu"``, ``"mish"``, ``"selu"``, ``"softplus"``.
        slope: the negative slope of a leaky ReLU (0 otherwise).
    """

    kind: str
    slope: float = 0.0

    @property
    def family(self) -> str:
        """``"relu"``, ``"saturating"``, ``"selu"`` or ``"linear"``."""
        if self.kind in _RELU_FAMILY:
            return "relu"
        if self.kind in _SATURATING:
            return "saturating"
        return "selu" if self.kind == "selu" else "linear"

    @property
    def scheme(self) -> str:
        """The scheme made for this activation: ``"he"``, ``"lecun"`` or ``"xavier"``."""
        return {"relu": "he", "selu": "lecun"}.get(self.family, "xavier")

    def __str__(self) -> str:
        return f"{self.kind}({self.slope:g})" if self.kind == "leaky_relu" else self.kind


LINEAR = Activation("linear")
_RELU_FAMILY = {"relu", "leaky_relu", "elu", "gelu", "silu", "mish", "softplus", "relu6", "celu"}
_SATURATING = {"sigmoid", "tanh", "hardtanh", "softsign", "hardsigmoid", "logsigmoid"}

_MODULE_KINDS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.ReLU6, "relu6"),  # before Hardtanh: ReLU6 subclasses it
    (nn.ReLU, "relu"),
    (nn.ELU, "elu"),
    (nn.CELU, "celu"),
    (nn.GELU, "gelu"),
    (nn.SiLU, "silu"),
    (nn.Mish, "mish"),
    (nn.Softplus, "softplus"),
    (nn.SELU, "selu"),
    (nn.Sigmoid, "sigmoid"),
    (nn.Tanh, "tanh"),
    (nn.Hardtanh, "hardtanh"),
    (nn.Softsign, "softsign"),
    (nn.Hardsigmoid, "hardsigmoid"),
    (nn.LogSigmoid, "logsigmoid"),
)

_FUNCTION_KINDS: dict[Any, str] = {
    torch.relu: "relu",
    F.relu: "relu",
    F.relu6: "relu6",
    F.elu: "elu",
    F.gelu: "gelu",
    F.silu: "silu",
    F.mish: "mish",
    F.softplus: "softplus",
    torch.selu: "selu",
    F.selu: "selu",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    torch.tanh: "tanh",
    F.tanh: "tanh",
    F.hardtanh: "hardtanh",
    F.softsign: "softsign",
    F.hardsigmoid: "hardsigmoid",
}
_METHOD_KINDS = {"relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}

# Ops an activation search walks through: they reshape, regularize or normalize a signal
# without being its nonlinearity (a residual sum counts: relu(x + f(x)) follows f).
_TRANSPARENT_MODULES: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    *NORM_LAYERS,
)
_TRANSPARENT_FUNCTIONS: set[Any] = {
    operator.add,
    operator.iadd,
    torch.add,
    torch.flatten,
    torch.reshape,
    F.dropout,
    operator.getitem,
}
_TRANSPARENT_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "add"}
_SEARCH_LIMIT = 8  # nodes walked after a layer before giving up ("linear")


def activation_of(module: nn.Module) -> Activation | None:
    """The activation a module applies, or None when it is not an activation module."""
    for cls, kind in _MODULE_KINDS:
        if isinstance(module, cls):
            return Activation(kind)
    if isinstance(module, nn.LeakyReLU):
        return Activation("leaky_relu", float(module.negative_slope))
    if isinstance(module, nn.PReLU):
        return Activation("leaky_relu", float(module.weight.detach().float().mean()))
    if isinstance(module, nn.RReLU):
        return Activation("leaky_relu", (module.lower + module.upper) / 2)
    return None


def is_weight_layer(module: nn.Module) -> bool:
    """Whether ``module`` is one of :data:`WEIGHT_LAYERS` (a scheme applies to its weight)."""
    return isinstance(module, WEIGHT_LAYERS)


def followers(sequence: Iterable[tuple[str, nn.Module]]) -> dict[str, Activation]:
    """Map each weight layer to the first activation module after it in ``sequence``.

    ``sequence`` is modules in the order they run (or are registered); the search for a
    layer stops at the next weight layer, which means no activation (``LINEAR``).
    """
    found: dict[str, Activation] = {}
    pending: list[str] = []
    for name, module in sequence:
        act = activation_of(module)
        if act is not None:
            for layer in pending:
                found.setdefault(layer, act)
            pending = []
        elif is_weight_layer(module) or isinstance(module, nn.RNNBase | nn.RNNCellBase):
            for layer in pending:
                found.setdefault(layer, LINEAR)
            pending = [name] if is_weight_layer(module) else []
    for layer in pending:
        found.setdefault(layer, LINEAR)
    return found


def _fx_activation(node: torch.fx.Node, modules: Mapping[str, nn.Module]) -> Activation | None:
    """The activation ``node`` applies, or None; raises LookupError for a transparent op."""
    if node.op == "call_module":
        module = modules[str(node.target)]
        act = activation_of(module)
        if act is None and isinstance(module, _TRANSPARENT_MODULES):
            raise LookupError
        return act
    if node.op == "call_function":
        if node.target is F.leaky_relu:
            slope = node.kwargs.get("negative_slope", node.args[1] if len(node.args) > 1 else 0.01)
            return Activation("leaky_relu", float(slope) if isinstance(slope, float) else 0.01)
        if node.target in _FUNCTION_KINDS:
            return Activation(_FUNCTION_KINDS[node.target])
        if node.target in _TRANSPARENT_FUNCTIONS:
            raise LookupError
        return None
    if node.op == "call_method":
        if node.target in _METHOD_KINDS:
            return Activation(_METHOD_KINDS[str(node.target)])
        if node.target in _TRANSPARENT_METHODS:
            raise LookupError
    return None


def _fx_follower(start: torch.fx.Node, modules: Mapping[str, nn.Module]) -> Activation:
    frontier = list(start.users)
    for _ in range(_SEARCH_LIMIT):
        if not frontier:
            break
        node = frontier.pop(0)
        try:
            act = _fx_activation(node, modules)
        except LookupError:
            frontier.extend(node.users)
            continue
        if act is not None:
            return act
        if node.op == "call_module" or node.op == "output":
            return LINEAR
    return LINEAR


def _fx_followers(model: nn.Module) -> dict[str, Activation]:
    """Activations after weight layers from a ``torch.fx`` trace; {} if it does not trace."""
    try:
        with warnings.catch_warnings():  # a probe: the model's tracing warnings are noise
            warnings.simplefilter("ignore")
            graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - data-dependent control flow: fall back to hooks
        return {}
    modules = dict(model.named_modules())
    return {
        str(node.target): _fx_follower(node, modules)
        for node in graph.nodes
        if node.op == "call_module" and is_weight_layer(modules[str(node.target)])
    }


def call_order(model: nn.Module, sample: Any) -> list[tuple[str, nn.Module]]:
    """Leaf and weight modules in the order they run on ``sample`` (one no-grad forward).

    ``sample`` is a tensor, a tuple of positional arguments or a dict of keyword arguments.
    Buffers (BatchNorm statistics), modes and the random state are left as they were.
    """
    order: list[tuple[str, nn.Module]] = []
    names = {id(m): n for n, m in model.named_modules()}

    def record(module: nn.Module, _args: Any) -> None:
        order.append((names[id(module)], module))

    handles = [
        m.register_forward_pre_hook(record)
        for m in model.modules()
        if not list(m.children()) or is_weight_layer(m)
    ]
    try:
        with preserved_buffers(model), torch.random.fork_rng(), torch.no_grad():
            call(model, sample)
    finally:
        for handle in handles:
            handle.remove()
    return order


def call(model: nn.Module, inputs: Any) -> Any:
    """``model(x)``, ``model(*args)`` or ``model(**kwargs)`` by the type of ``inputs``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple | list):
        return model(*inputs)
    return model(inputs)


@contextmanager
def preserved_buffers(model: nn.Module) -> Iterator[None]:
    """Restore every buffer (BatchNorm running statistics, counters) in place on exit."""
    saved = [(b, b.clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, copy in saved:
                buffer.copy_(copy)


def trace_followers(
    model: nn.Module, sample: Any = None, *, order: Sequence[tuple[str, nn.Module]] | None = None
) -> dict[str, Activation]:
    """The activation after each weight layer of ``model`` (keys: module names).

    Tries ``torch.fx`` first; then the run order (``order``, or one run on ``sample``);
    then registration order. Layers inside modules that fx treats as leaves (e.g.
    ``nn.TransformerEncoderLayer``) fall back to the run or registration order.
    """
    found = _fx_followers(model)
    if order is None:
        order = call_order(model, sample) if sample is not None else list(model.named_modules())
    for name, act in (followers(order) | _transformer_followers(model)).items():
        found.setdefault(name, act)
    return found


def _transformer_followers(model: nn.Module) -> dict[str, Activation]:
    """``linear1`` of a Transformer layer is followed by its ``activation`` attribute."""
    found = {}
    for name, module in model.named_modules():
        act = getattr(module, "activation", None)
        if isinstance(getattr(module, "linear1", None), nn.Linear) and act is not None:
            kind = activation_of(act) if isinstance(act, nn.Module) else None
            if kind is None and act in _FUNCTION_KINDS:
                kind = Activation(_FUNCTION_KINDS[act])
            found[f"{name}.linear1" if name else "linear1"] = kind or LINEAR
    return found


__all__ = [
    "LINEAR",
    "NORM_LAYERS",
    "WEIGHT_LAYERS",
    "Activation",
    "activation_of",
    "call",
    "call_order",
    "followers",
    "is_weight_layer",
    "preserved_buffers",
    "trace_followers",
]
