"""Initialization matched to the activation that follows each layer, and LSUV.

The variance of a signal crossing a layer is multiplied by ``fan · Var[w] · E[φ'(h)²]``
(forward) and the back-propagated gradient by the same factor with the other fan: keeping
it at 1 in every layer is what lets a deep network train (Glorot & Bengio 2010; He et al.
2015). The factor depends on the activation, so the right scale does too:

=================  ==========================================  =========================
activation after   scheme                                      weight std
=================  ==========================================  =========================
none, sigmoid,     Xavier/Glorot uniform, gain 1               √(2 / (fan_in + fan_out))
tanh, softsign
ReLU family        He/Kaiming normal, fan-in, slope ``a`` of   √(2 / ((1 + a²) fan_in))
                   a leaky ReLU (GELU, SiLU, ELU: as ReLU)
SELU               LeCun normal                                √(1 / fan_in)
(recurrent)        orthogonal, one block per gate              singular values 1
=================  ==========================================  =========================

Biases are set to zero. ``initialize(model, "auto")`` finds the activation after each
layer by tracing the model with ``torch.fx`` (which also sees ``torch.relu`` and
``F.leaky_relu(x, 0.2)`` called in ``forward``); where the model does not trace, from the
order in which modules run on a sample input (``sample=``), or else from the order in
which they are registered. :func:`lsuv` then rescales each layer on a real batch.

References:
    Glorot & Bengio (2010), "Understanding the difficulty of training deep feedforward
    neural networks", AISTATS.
    He, Zhang, Ren, Sun (2015), "Delving deep into rectifiers", arXiv 1502.01852.
    LeCun, Bottou, Orr, Müller (1998), "Efficient BackProp"; Klambauer et al. (2017),
    "Self-normalizing neural networks", arXiv 1706.02515.
    Saxe, McClelland, Ganguli (2014), "Exact solutions to the nonlinear dynamics of
    learning in deep linear neural networks", arXiv 1312.6120.
    Mishkin & Matas (2016), "All you need is a good init", arXiv 1511.06422.
    Jozefowicz, Zaremba, Sutskever (2015), "An empirical exploration of recurrent network
    architectures", ICML.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from gradguard._activations import (
    LINEAR,
    NORM_LAYERS,
    Activation,
    activation_of,
    call,
    call_order,
    is_weight_layer,
    preserved_buffers,
    trace_followers,
)
from gradguard.errors import ConfigError, UnsupportedModelError

SCHEMES = ("auto", "xavier", "he", "lecun", "orthogonal")
"""The schemes :func:`initialize` accepts."""

_GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "LSTM": 4, "GRU": 3}


def _weight(module: nn.Module) -> Tensor:
    """The ``weight`` parameter of a Linear/Conv layer."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor):
        raise UnsupportedModelError(f"{type(module).__name__} has no weight tensor")
    return weight


@dataclass(frozen=True)
class InitRecord:
    """What :func:`initialize` did to one weight tensor.

    Attributes:
        layer: the module's name in the model.
        parameter: the parameter's name in the module (``weight``, ``weight_hh_l0``).
        module: the module's class name.
        scheme: ``xavier``, ``he``, ``lecun``, ``orthogonal`` or ``reset`` (norm layers).
        activation: the activation the scale was chosen for.
        gain: the gain used.
        std: the standard deviation of the new tensor.
        bias: what was done to the bias: ``"zeros"``, ``"forget=1"`` or None (no bias).
    """

    layer: str
    parameter: str
    module: str
    scheme: str
    activation: str
    gain: float
    std: float
    bias: str | None

    def __str__(self) -> str:
        where = f"{self.layer}.{self.parameter}" if self.layer else self.parameter
        return f"{where}: {self.scheme} for {self.activation} (gain {self.gain:.3g})"


def _fans(weight: Tensor) -> tuple[int, int]:
    receptive = math.prod(weight.shape[2:]) if weight.dim() > 2 else 1
    return weight.shape[1] * receptive, weight.shape[0] * receptive


def gain_for(scheme: str, act: Activation) -> float:
    """The gain of ``scheme`` before ``act``.

    He is √(2 / (1 + a²)) by definition (the rectifier's gain, ``a`` a leaky slope);
    orthogonal takes that gain before the ReLU family and 1 otherwise. Xavier keeps gain 1
    whatever the activation, as Glorot & Bengio's normalized init
    (``torch.nn.init.calculate_gain("tanh")`` = 5/3 is another choice); LeCun is 1.
    """
    rectifier = math.sqrt(2.0 / (1.0 + act.slope**2))
    if scheme == "he" or (scheme == "orthogonal" and act.family == "relu"):
        return rectifier
    return 1.0


def expected_std(weight: Tensor, scheme: str, act: Activation) -> float:
    """The weight std ``scheme`` gives a tensor shaped like ``weight`` before ``act``."""
    fan_in, fan_out = _fans(weight)
    gain = gain_for(scheme, act)
    if scheme == "xavier":
        return gain * math.sqrt(2.0 / (fan_in + fan_out))
    if scheme == "orthogonal":
        return gain / math.sqrt(max(fan_in, weight.shape[0]))
    if scheme == "he":
        return gain / math.sqrt(fan_in)
    return 1.0 / math.sqrt(fan_in)  # lecun


def _apply(weight: Tensor, scheme: str, act: Activation) -> float:
    gain = gain_for(scheme, act)
    if scheme == "xavier":
        nn.init.xavier_uniform_(weight, gain=gain)
    elif scheme == "he":
        nn.init.kaiming_normal_(weight, a=act.slope, mode="fan_in", nonlinearity="leaky_relu")
    elif scheme == "lecun":
        nn.init.normal_(weight, std=1.0 / math.sqrt(_fans(weight)[0]))
    else:
        nn.init.orthogonal_(weight, gain=gain)
    return gain


def _record(
    layer: str, parameter: str, module: nn.Module, scheme: str, act: str, gain: float
) -> InitRecord:
    weight = getattr(module, parameter)
    bias_name = parameter.replace("weight", "bias")
    has_bias = getattr(module, bias_name, None) is not None
    return InitRecord(
        layer,
        parameter,
        type(module).__name__,
        scheme,
        act,
        gain,
        float(weight.detach().float().std()) if weight.numel() > 1 else 0.0,
        "zeros" if has_bias else None,
    )


def _zero_biases(module: nn.Module) -> None:
    for name, param in module.named_parameters(recurse=False):
        if name.startswith("bias") or name.endswith("_bias"):
            nn.init.zeros_(param)


def _init_weight_layer(name: str, module: nn.Module, scheme: str, act: Activation) -> InitRecord:
    chosen = act.scheme if scheme == "auto" else scheme
    gain = _apply(_weight(module), chosen, act)
    _zero_biases(module)
    return _record(name, "weight", module, chosen, str(act), gain)


def _init_recurrent(
    name: str, module: nn.RNNBase | nn.RNNCellBase, scheme: str, forget_bias: float
) -> list[InitRecord]:
    """Input weights as Xavier (their gates are sigmoid/tanh), recurrent ones orthogonal."""
    mode = getattr(module, "mode", None) or _cell_mode(module)
    gates = _GATES[mode]
    act = Activation("relu") if mode == "RNN_RELU" else Activation("tanh")
    records = []
    for pname, param in module.named_parameters(recurse=False):
        if not pname.startswith("weight"):
            continue
        recurrent = pname.startswith("weight_hh")
        chosen = ("orthogonal" if recurrent else act.scheme) if scheme == "auto" else scheme
        gain = 1.0
        blocks = (param,) if pname.startswith("weight_hr") else param.detach().chunk(gates)
        for block in blocks:
            gain = _apply(block, chosen, act if not recurrent else LINEAR)
        records.append(_record(name, pname, module, chosen, str(act), gain))
    _zero_biases(module)
    if isinstance(module, nn.LSTM | nn.LSTMCell) and forget_bias:
        set_forget_bias(module, forget_bias)
        records = [
            r if r.bias is None else replace(r, bias=f"forget={forget_bias:g}") for r in records
        ]
    return records


def _cell_mode(module: nn.Module) -> str:
    if isinstance(module, nn.LSTMCell):
        return "LSTM"
    if isinstance(module, nn.GRUCell):
        return "GRU"
    return "RNN_RELU" if getattr(module, "nonlinearity", "tanh") == "relu" else "RNN_TANH"


def set_forget_bias(module: nn.LSTM | nn.LSTMCell, value: float) -> None:
    """Set an LSTM's forget-gate bias so that ``b_if + b_hf = value`` (Jozefowicz et al. 2015).

    PyTorch orders the gates (input, forget, cell, output) in ``bias_ih``/``bias_hh``; the
    value is split evenly between the two biases.
    """
    if not isinstance(module, nn.LSTM | nn.LSTMCell):
        raise UnsupportedModelError(
            f"set_forget_bias needs an nn.LSTM or nn.LSTMCell, got {type(module).__name__}"
        )
    hidden = module.hidden_size
    with torch.no_grad():
        for pname, param in module.named_parameters(recurse=False):
            if pname.startswith("bias"):
                param[hidden : 2 * hidden] = value / 2


def _init_attention(name: str, module: nn.MultiheadAttention) -> list[InitRecord]:
    records = []
    for pname in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
        weight = getattr(module, pname, None)
        if isinstance(weight, Tensor):
            nn.init.xavier_uniform_(weight)
            records.append(_record(name, pname, module, "xavier", "linear", 1.0))
    _zero_biases(module)
    for pname in ("bias_k", "bias_v"):
        if getattr(module, pname, None) is not None:
            nn.init.zeros_(getattr(module, pname))
    return records


def _init_norm(name: str, module: nn.Module) -> list[InitRecord]:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor):
        return []
    nn.init.ones_(weight)
    _zero_biases(module)
    return [_record(name, "weight", module, "reset", "linear", 1.0)]


def _init_module(
    name: str, module: nn.Module, scheme: str, acts: Mapping[str, Activation], forget_bias: float
) -> list[InitRecord]:
    if is_weight_layer(module):
        return [_init_weight_layer(name, module, scheme, acts.get(name, LINEAR))]
    if isinstance(module, nn.RNNBase | nn.RNNCellBase):
        return _init_recurrent(name, module, scheme, forget_bias)
    if isinstance(module, nn.MultiheadAttention):
        return _init_attention(name, module)
    if isinstance(module, NORM_LAYERS):
        return _init_norm(name, module)
    return []


def initialize(
    model: nn.Module, scheme: str = "auto", *, sample: Any = None, forget_bias: float = 0.0
) -> list[InitRecord]:
    """Initialize every weight of ``model`` for the activation that follows it.

    ``"auto"`` chooses per layer (see the module docstring): Xavier before sigmoid, tanh
    or nothing, He before the ReLU family (with a leaky ReLU's slope), LeCun before SELU;
    recurrent weights orthogonal per gate, input weights of RNN/LSTM/GRU Xavier; attention
    projections Xavier; normalization layers reset to weight 1, bias 0. A named scheme
    applies to every weight, still with the activation's gain. Biases become zero.
    Embeddings and modules of unknown types keep their parameters (no record).
    Random draws use the global generator: seed with ``torch.manual_seed``.

    Args:
        model: the network, changed in place.
        scheme: ``"auto"``, ``"xavier"``, ``"he"``, ``"lecun"`` or ``"orthogonal"``.
        sample: an input (tensor, tuple of arguments or dict of keyword arguments) used to
            find activations by running the model, where ``torch.fx`` cannot trace it.
        forget_bias: an LSTM's forget-gate bias (``b_if + b_hf``); 1.0 is the value
            Jozefowicz et al. (2015) recommend, 0 keeps every bias at zero.

    Returns:
        One record per weight tensor initialized, in module order.

    Raises:
        ConfigError: an unknown scheme.
        UnsupportedModelError: not a module, or a module with nothing to initialize.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> [str(r) for r in initialize(net)]
        ['0.weight: he for relu (gain 1.41)', '2.weight: xavier for linear (gain 1)']
    """
    if scheme not in SCHEMES:
        raise ConfigError(f"scheme must be one of {', '.join(SCHEMES)}; got {scheme!r}")
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"initialize expects an nn.Module, got {type(model).__name__}")
    acts = trace_followers(model, sample)
    records: list[InitRecord] = []
    with torch.no_grad():
        for name, module in model.named_modules():
            records.extend(_init_module(name, module, scheme, acts, forget_bias))
    if not records:
        raise UnsupportedModelError(
            f"initialize found no layer it knows in {type(model).__name__} (Linear, Conv, "
            "RNN/LSTM/GRU, MultiheadAttention, norm layers); initialize custom modules "
            "with torch.nn.init directly."
        )
    return records


@dataclass(frozen=True)
class LsuvRecord:
    """The outcome of LSUV for one layer.

    Attributes:
        layer: the module's name.
        iterations: rescalings applied (0 when the output std was already within ``tol``).
        std: the output standard deviation after the last rescaling.
        converged: ``|std² / target² - 1| < tol`` was reached within ``max_iter``.
    """

    layer: str
    iterations: int
    std: float
    converged: bool


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has run."""


def _output_std(model: nn.Module, module: nn.Module, batch: Any) -> float:
    """The std of ``module``'s output on ``batch``; the forward stops right after it."""
    seen: list[float] = []

    def hook(_m: nn.Module, _args: Any, output: Any) -> None:
        out = output[0] if isinstance(output, tuple) else output
        seen.append(float(out.detach().double().std()))
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        call(model, batch)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise UnsupportedModelError(f"lsuv: a layer did not run on the batch ({module})")
    return seen[0]


def _lsuv_layer(
    model: nn.Module,
    name: str,
    module: nn.Module,
    batch: Any,
    *,
    target: float,
    tol: float,
    max_iter: int,
) -> LsuvRecord:
    std = _output_std(model, module, batch)
    for iteration in range(max_iter + 1):
        if abs(std**2 / target**2 - 1.0) < tol:
            return LsuvRecord(name, iteration, std, True)
        if iteration == max_iter or not math.isfinite(std) or std == 0.0:
            break
        _weight(module).mul_(target / std)
        std = _output_std(model, module, batch)
    return LsuvRecord(name, iteration, std, False)


def _validate_lsuv(target_std: float, tol: float, max_iter: int) -> None:
    if not target_std > 0 or not math.isfinite(target_std):
        raise ConfigError(f"lsuv: target_std must be a positive number, got {target_std}")
    if not 0 < tol < 1:
        raise ConfigError(f"lsuv: tol must be in (0, 1), got {tol} (the paper uses 0.1)")
    if max_iter < 1:
        raise ConfigError(f"lsuv: max_iter must be at least 1, got {max_iter} (the paper: 10)")


def lsuv(
    model: nn.Module,
    batch: Any,
    target_std: float = 1.0,
    tol: float = 0.1,
    max_iter: int = 10,
    *,
    orthogonal: bool = True,
) -> list[LsuvRecord]:
    """Layer-sequential unit-variance initialization (Mishkin & Matas 2016).

    Pre-initializes every Linear/Conv weight orthogonally (``orthogonal=True``, as in the
    paper) with zero biases, then, layer by layer in the order they run, divides the
    weight by the standard deviation of the layer's output on ``batch`` until
    ``|Var / target_std² - 1| < tol`` or ``max_iter`` rescalings. Each step is one forward
    pass stopped right after the layer. Buffers (BatchNorm statistics) are restored and
    the forward passes leave the random state alone (dropout draws are undone); the
    weights are changed in place, the orthogonal pre-initialization drawing from the
    global generator.

    Args:
        model: the network.
        batch: a representative input: a tensor, a tuple of arguments or a dict of
            keyword arguments (the paper uses one mini-batch).
        target_std: the output std wanted for every layer.
        tol: the tolerance on the variance ratio (the paper's ``Tol_var``).
        max_iter: the most rescalings per layer (the paper's ``T_max``).
        orthogonal: pre-initialize orthogonally first.

    Returns:
        One record per layer, in the order the layers ran.

    Raises:
        ConfigError: a bad setting.
        UnsupportedModelError: no Linear/Conv layer ran on ``batch``.
    """
    _validate_lsuv(target_std, tol, max_iter)
    layers: list[tuple[str, nn.Module]] = []
    for name, module in call_order(model, batch):
        if is_weight_layer(module) and all(module is not m for _, m in layers):
            layers.append((name, module))
    if not layers:
        raise UnsupportedModelError(
            f"lsuv found no Linear/Conv layer that runs on the batch in {type(model).__name__}"
        )
    if orthogonal:  # draws from the global generator, like every initializer
        with torch.no_grad():
            for _, module in layers:
                nn.init.orthogonal_(_weight(module))
                _zero_biases(module)
    with preserved_buffers(model), torch.random.fork_rng(), torch.no_grad():
        return [
            _lsuv_layer(model, name, module, batch, target=target_std, tol=tol, max_iter=max_iter)
            for name, module in layers
        ]


__all__ = [
    "LINEAR",
    "SCHEMES",
    "Activation",
    "InitRecord",
    "LsuvRecord",
    "activation_of",
    "expected_std",
    "initialize",
    "lsuv",
    "set_forget_bias",
    "trace_followers",
]
