"""Find vanishing and exploding gradients before training, say why, and name the remedy.

:func:`diagnose` runs a model once on a sample batch and measures what the chain rule
multiplies together:

* per layer, in the order the layers run: the mean and std of its output, the fraction
  of saturated units after sigmoid/tanh-like activations and of dead units after ReLU
  and ReLU6 (leaky, ELU, GELU or SiLU units pass gradient below zero and cannot die),
  the gradient norm of its parameters (gradient flow, through
  :func:`gradguard.stats.grad_stats`), the gradient norm at its output, its weight norm
  and largest singular value, and its gain (output std / input std);
* the per-example input-output Jacobian: its largest singular values and its mean
  squared singular value (1 at dynamical isometry), estimated with ``torch.func``;
* for RNN/LSTM/GRU modules: the gradient reaching each time step of the input from the
  last output, the spectral radius of the recurrent weights and, for LSTMs, the
  forget-gate statistics;

then gives a verdict (``"healthy"``, ``"vanishing"``, ``"exploding"``) by the thresholds
below, flags layers, and recommends remedies with their sources (:func:`diagnose` gives
the rule for the clipping threshold, and what is left out because the model has it).

Thresholds. One number decides all three signals: a factor of :data:`RATIO` = 10³
between where the gradient enters and where it leaves.

* Depth: the gradient at the output of the first parametrized layer over the gradient at
  the output of the last one. Below 1/RATIO the early layers learn a thousand times
  slower than the late ones under one learning rate: "vanishing". Above RATIO a step
  that suits the late layers is a thousand times too large for the early ones:
  "exploding". Measured on the canonical networks of the tests (width 64, seeds 0-2):
  20-layer sigmoid 7e-17 to 9e-17, 20-layer tanh (PyTorch init) 2e-5, 30-layer ReLU
  with N(0, 1) weights 4e21 to 8e21, 30-layer ReLU with He init 0.56 to 1.2, 50
  residual blocks with BatchNorm 40 to 55, 28 plain blocks with BatchNorm 7e4 to 9e4
  (exploding toward the input, as Yang et al. 2019 predict and the lab's E6 measures),
  4-layer Transformer encoder 0.84 to 1.1. Healthy networks sit within a factor 100 of
  1, broken ones beyond 10⁴: the threshold is the geometric middle.
* Jacobian: the root mean squared singular value of the per-example Jacobian, below
  1/RATIO or above RATIO. It is the same product of layer Jacobians seen end to end
  (Pennington et al. 2017), and it is the only signal for a model whose layers cannot be
  hooked. It depends on the units of the input and output, which the wide band absorbs.
* Time: for each recurrent module, the gradient reaching the first input step over the
  gradient reaching the last one (Bengio et al. 1994; Pascanu et al. 2013).

Any exploding signal makes the verdict "exploding" (the first step can then overflow),
otherwise any vanishing signal makes it "vanishing". A non-finite activation, loss or
gradient is "exploding".

The model is left exactly as found: parameters, buffers (BatchNorm running statistics
and counters), the train/eval mode of every module, every ``.grad`` (the gradients are
taken with ``torch.autograd.grad``), ``requires_grad`` flags and the global random state.
The forward passes run in the mode the model is in: a freshly built network is in train
mode, so BatchNorm normalizes with batch statistics, as in the first training steps.
"""

from __future__ import annotations

import decimal
import html
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name
from torch import Tensor, nn

from gradguard import _jacobian, init
from gradguard._files import write_text_atomic
from gradguard.errors import ConfigError, GradGuardError, UnsupportedModelError
from gradguard.stats import ROOT_LAYER, grad_stats, uncompiled

if TYPE_CHECKING:
    from rich.console import Console, ConsoleOptions, RenderResult

VERDICTS = ("healthy", "vanishing", "exploding")

RATIO = 1e3
"""Factor between first and last layer (or time step) gradients beyond which gradients
vanish (below 1/RATIO) or explode (above RATIO); also the band for the Jacobian's root
mean squared singular value. See the module docstring for the measurements behind it."""

SATURATION_DERIVATIVE = 0.05
"""A unit is saturated where its activation's derivative is below this fraction of the
derivative's peak: tanh |y| > 0.975, sigmoid y < 0.013 or y > 0.987."""

SATURATED_FRACTION = 0.5
"""A layer is flagged "saturated" when more than this fraction of its outputs are."""

DEAD_FRACTION = 0.5
"""A ReLU-family layer is flagged "dead" when more than this fraction of its units output
zero (or less) for every example of the batch."""

INIT_TOLERANCE = 1.25
"""A weight's std further than this factor from the std its activation's scheme gives
counts as mis-initialized in the recommendations; an input std further than this factor
from 1 counts as not unit-scaled."""

EXACT_SVD_MAX = 64
"""Largest singular values of weights with a side up to this are exact (``svdvals``);
larger ones come from :data:`POWER_ITERATIONS` power iterations (a lower bound, within
about 1 % on random matrices, where the top two singular values are close)."""

POWER_ITERATIONS = 50

CLIP_FRACTION = 0.5
"""A suggested clipping threshold is at most this fraction of the global gradient norm
measured: a threshold at or above that norm would not clip the batch it came from."""

SOURCES: Mapping[str, str] = {
    "init": "Glorot & Bengio 2010; He et al. 2015; Klambauer et al. 2017",
    "activation": "Glorot & Bengio 2010; Nair & Hinton 2010",
    "normalization": "Ioffe & Szegedy 2015; Ba et al. 2016",
    "residual": "He et al. 2016",
    "clip": "Pascanu et al. 2013; Kumar et al. 2025 (ZClip)",
    "lower-lr": "Pascanu et al. 2013; Goyal et al. 2017 (warm-up)",
    "gated-rnn": "Hochreiter & Schmidhuber 1997; Cho et al. 2014",
    "lstm-forget-bias": "Jozefowicz et al. 2015; Gers et al. 2000",
    "long-memory": "Tallec & Ollivier 2018 (chrono initialization)",
    "recurrent-init": "Saxe et al. 2014; Le et al. 2015",
    "dead-units": "He et al. 2015; Maas et al. 2013",
    "saturation": "Glorot & Bengio 2010",
}
"""Where each recommendation comes from, by code."""

_GATE_NAMES = {"LSTM": "ifgo", "GRU": "rzn", "RNN_TANH": "h", "RNN_RELU": "h"}


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class LayerDiagnosis:
    """Measurements of one module, in the order modules first ran.

    A layer is a module with no children, or one that owns parameters directly (e.g.
    ``nn.MultiheadAttention``). Measurements that do not apply are None: a module whose
    output is not a floating-point tensor has no activation statistics, one without a
    2-D weight no singular value.

    Attributes:
        name: the module's name in the model (``"(root)"`` for the model itself).
        kind: the module's class name.
        index: position in the order the layers' outputs were computed.
        calls: how many times it ran (a shared activation module runs once per use).
        parameters: number of parameter elements it owns directly.
        activation_mean: mean of its output.
        activation_std: std of its output.
        saturated_fraction: share of outputs where a sigmoid/tanh-like activation's
            derivative is below :data:`SATURATION_DERIVATIVE` of its peak.
        dead_fraction: share of units of a ReLU (ReLU6, leaky ReLU of slope 0) that are
            <= 0 for every example of the batch (a unit: one element of an example's
            output); None after activations that pass gradient below zero.
        grad_norm: L2 norm of the gradient of its parameters.
        output_grad_norm: L2 norm of the gradient of the loss at its output.
        relative_grad: ``output_grad_norm`` over that of the last parametrized layer.
        weight_norm: Frobenius norm of its weight.
        weight_sv_max: largest singular value of its weight (reshaped to output x rest).
        gain: output std over input std.
        followed_by: the activation that follows a weight layer (``"relu"``, ...).
        flags: ``vanishing``/``exploding`` (relative gradient beyond :data:`RATIO`),
            ``saturated``, ``dead``, ``nonfinite``.
        note: why a measurement is missing, when it is.
    """

    name: str
    kind: str
    index: int
    calls: int
    parameters: int
    activation_mean: float | None = None
    activation_std: float | None = None
    saturated_fraction: float | None = None
    dead_fraction: float | None = None
    grad_norm: float | None = None
    output_grad_norm: float | None = None
    relative_grad: float | None = None
    weight_norm: float | None = None
    weight_sv_max: float | None = None
    gain: float | None = None
    followed_by: str | None = None
    flags: tuple[str, ...] = ()
    note: str | None = None


@dataclass(frozen=True)
class JacobianDiagnosis:
    """The per-example input-output Jacobian ``J_i = d y_i / d x_i``, averaged over examples.

    ``y_i`` is example i's row of the first floating-point tensor of the output and
    ``x_i`` its rows of every floating-point input (other examples held fixed). See
    :mod:`gradguard._jacobian` for the estimators.

    Attributes:
        top_singular_values: the largest singular values, descending.
        mean_squared_singular_value: ``‖J_i‖_F² / min(m, n)``; 1 at dynamical isometry.
        in_features: ``n``.
        out_features: ``m``.
        samples: examples averaged.
        products: Jacobian-vector products spent.
        exact: formed exactly (small Jacobian) rather than estimated.
        mode: ``replicated``, ``per-sample`` or ``whole``.
        matvec: ``vjp-of-vjp`` (reverse over reverse) or ``jvp`` (forward mode).
    """

    top_singular_values: tuple[float, ...]
    mean_squared_singular_value: float
    in_features: int
    out_features: int
    samples: int
    products: int
    exact: bool
    mode: str
    matvec: str

    @property
    def rms_singular_value(self) -> float:
        """The root mean squared singular value, compared with :data:`RATIO`."""
        return math.sqrt(self.mean_squared_singular_value)


@dataclass(frozen=True)
class ForgetGate:
    """Statistics of an LSTM's forget gate (layer 0, forward direction) on the batch.

    Attributes:
        mean: mean forget-gate activation over examples, steps and units; the share of
            the cell state kept per step (the gradient through the cell decays as its
            product over steps).
        std: its standard deviation.
        bias: mean of ``b_if + b_hf``.
    """

    mean: float
    std: float
    bias: float


@dataclass(frozen=True)
class RecurrentDiagnosis:
    """Gradient through time for one recurrent module.

    Attributes:
        name: the module's name.
        kind: ``RNN``, ``LSTM``, ``GRU`` or a cell class name.
        steps: sequence length seen.
        time_grad_norms: ``‖∂(u · h_T) / ∂x_t‖`` for each input step t (u a fixed random
            direction, h_T the last output step, forward direction), earliest first.
        decay: ``time_grad_norms[0] / time_grad_norms[-1]``: below 1/RATIO the first
            step is forgotten (vanishing), above RATIO it dominates (exploding).
        spectral_radius: largest |eigenvalue| of each recurrent weight block, keyed
            ``l<layer>[r].<gate>`` (``r`` for the reverse direction).
        forget_gate: LSTM forget-gate statistics.
        flags: ``vanishing`` or ``exploding`` through time.
        note: why the decay was not measured, when it was not.
    """

    name: str
    kind: str
    steps: int | None
    time_grad_norms: tuple[float, ...] | None
    decay: float | None
    spectral_radius: dict[str, float]
    forget_gate: ForgetGate | None
    flags: tuple[str, ...] = ()
    note: str | None = None


@dataclass(frozen=True)
class Recommendation:
    """A remedy: a stable ``code``, a message in plain words, the layers, the source.

    A recommendation never names a remedy the model is measured to have already (see
    :func:`diagnose`).
    """

    code: str
    message: str
    layers: tuple[str, ...]
    source: str

    def __str__(self) -> str:
        where = f" [{', '.join(self.layers[:6])}{', ...' if len(self.layers) > 6 else ''}]"
        return f"{self.code}: {self.message}{where if self.layers else ''} ({self.source})"


@dataclass(frozen=True)
class Diagnosis:
    """The result of :func:`diagnose`: a verdict, its reasons, the measurements, remedies.

    Print it for a table (rich in a rich console, plain text otherwise), ``to_dict()``
    for JSON, ``save_html(path)`` for a self-contained page.

    Attributes:
        verdict: ``"healthy"``, ``"vanishing"`` or ``"exploding"``.
        reasons: the signals behind the verdict, in words, with numbers and thresholds.
        layers: one entry per layer in run order.
        jacobian: the input-output Jacobian, or None (``jacobian=False``, no
            floating-point input, or not measurable: see ``notes``).
        recurrent: one entry per RNN/LSTM/GRU module.
        recommendations: remedies, most relevant first.
        loss: the loss the gradients were taken of.
        grad_norm: global L2 norm of the parameter gradients.
        gradient_ratio: first over last parametrized layer's output gradient.
        suggested_clip: a global-norm clipping threshold from the measured gradients,
            always below ``grad_norm`` (see :func:`diagnose` for the rule); None when the
            norms overflow. The ``clip`` recommendation names the same value.
        batch_dim: the batch dimension used for units and examples.
        notes: what could not be measured, and why.
    """

    verdict: str
    reasons: tuple[str, ...]
    layers: tuple[LayerDiagnosis, ...]
    jacobian: JacobianDiagnosis | None
    recurrent: tuple[RecurrentDiagnosis, ...]
    recommendations: tuple[Recommendation, ...]
    loss: float | None
    grad_norm: float | None
    gradient_ratio: float | None
    suggested_clip: float | None
    batch_dim: int
    notes: tuple[str, ...] = field(default=())

    def flagged(self, flag: str) -> tuple[str, ...]:
        """Names of the layers carrying ``flag`` (e.g. ``"vanishing"``), in run order."""
        return tuple(layer.name for layer in self.layers if flag in layer.flags)

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain JSON types; non-finite numbers become "inf", "-inf", "nan"."""
        data = _json_ready(asdict(self))
        data["thresholds"] = {
            "ratio": RATIO,
            "saturation_derivative": SATURATION_DERIVATIVE,
            "saturated_fraction": SATURATED_FRACTION,
            "dead_fraction": DEAD_FRACTION,
        }
        return data  # type: ignore[no-any-return]

    def to_json(self, indent: int | None = 2) -> str:
        """``to_dict()`` as a JSON string (strict: no NaN/Infinity literals)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def to_html(self) -> str:
        """A complete, self-contained HTML page (no script, no network) of the diagnosis."""
        return _html_page(self)

    def save_html(self, path: str | Path) -> Path:
        """Write :meth:`to_html` to ``path`` (UTF-8) and return the path.

        Written to a temporary file and renamed: a failed write (a full disk) leaves any
        previous page whole and no partial file behind.
        """
        return write_text_atomic(Path(path), self.to_html())

    def __str__(self) -> str:
        return _plain_text(self)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        """Render as rich tables (rich calls this when the diagnosis is printed)."""
        yield from _rich_renderables(self, options.max_width)


def _json_ready(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return value


# --------------------------------------------------------------------------- state


@contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    """Restore modes, buffers (objects and values), grads and requires_grad on exit."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = [
        (owner, name, buf, None if buf is None else buf.detach().clone())
        for owner in model.modules()
        for name, buf in owner._buffers.items()
    ]
    params = [(p, p.grad, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode
        with torch.no_grad():
            for owner, name, buf, copy in buffers:
                owner._buffers[name] = buf
                if buf is not None and copy is not None:
                    buf.copy_(copy)
        for param, grad, requires in params:
            param.grad = grad
            param.requires_grad_(requires)


@contextmanager
def _cudnn_disabled() -> Iterator[None]:
    """Use the native RNN kernels: cuDNN's have no backward in eval mode, no double backward."""
    enabled = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = False
    try:
        yield
    finally:
        torch.backends.cudnn.enabled = enabled


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


# --------------------------------------------------------------------------- recording


@dataclass
class _Record:
    """What the hooks saw of one layer, accumulated over its calls."""

    name: str
    module: nn.Module
    index: int
    calls: int = 0
    moments: list[Tensor] = field(default_factory=list)  # per call: see _moments
    outputs: list[Tensor] = field(default_factory=list)  # outputs that require grad
    note: str | None = None
    rnn_call: tuple[tuple[Any, ...], dict[str, Any]] | None = None


def _first_float(value: Any) -> Tensor | None:
    """The first floating-point tensor in a (nested) output, depth first."""
    if isinstance(value, Tensor):
        return value if value.is_floating_point() else None
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, list | tuple):
        for item in value:
            found = _first_float(item)
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


_NAN = float("nan")


def _zero_below(act: init.Activation) -> bool:
    """Whether the activation passes no gradient below zero, so a unit can die (ReLU, ReLU6).

    A leaky ReLU, ELU, GELU or SiLU passes some gradient there: its units never die.
    """
    return act.kind in ("relu", "relu6") or (act.kind == "leaky_relu" and act.slope == 0)


def _moments(module: nn.Module, x: Tensor | None, y: Tensor, batch_dim: int) -> Tensor:
    """[n, Σy, Σy², n_x, Σx, Σx², saturated, dead, non-finite] of one call, fp64."""
    y64 = y.detach().double()
    act = init.activation_of(module)
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


def _infer_batch_dim(model: nn.Module) -> int:
    """1 when the first module with a ``batch_first`` attribute has it False, else 0.

    ``nn.RNN``/``LSTM``/``GRU``, ``nn.MultiheadAttention`` and the Transformer layers take
    (sequence, batch, feature) inputs by default; the first one registered decides.
    """
    for module in model.modules():
        flag = getattr(module, "batch_first", None)
        if isinstance(flag, bool):
            return 0 if flag else 1
    return 0


class _Recorder:
    """Forward hooks on every layer: statistics and outputs (for gradients), in order."""

    def __init__(self, model: nn.Module, batch_dim: int) -> None:
        self.model = model
        self.batch_dim = batch_dim
        self.records: dict[int, _Record] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._names = {id(m): (n or ROOT_LAYER) for n, m in model.named_modules()}

    def __enter__(self) -> _Recorder:
        for module in self.model.modules():
            if not list(module.children()) or _owns_params(module):
                self._handles.append(module.register_forward_hook(self._post, with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()

    def _post(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        record = self.records.get(id(module))
        if record is None:
            record = _Record(self._names[id(module)], module, len(self.records))
            self.records[id(module)] = record
        record.calls += 1
        if isinstance(module, nn.RNNBase) and record.rnn_call is None:
            record.rnn_call = (tuple(args), dict(kwargs))
        y = _first_float(output)
        if y is None:
            record.note = "output is not a floating-point tensor: no activation statistics"
            return
        record.moments.append(_moments(module, _first_float(args), y, self.batch_dim))
        if y.requires_grad:
            record.outputs.append(y)


# --------------------------------------------------------------------------- forward/backward


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
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
    trainable = [(n, p) for n, p in named if p.requires_grad]
    if not trainable:
        raise UnsupportedModelError(
            f"all {len(named)} parameters of {type(model).__name__} are frozen; unfreeze "
            "the ones to diagnose with p.requires_grad_(True)."
        )
    return trainable


def _as_call(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(inputs, Tensor):
        return (inputs,), {}
    if isinstance(inputs, Mapping) and all(isinstance(k, str) for k in inputs):
        return (), dict(inputs)
    if isinstance(inputs, tuple | list) and inputs:
        return tuple(inputs), {}
    raise ConfigError(
        f"inputs must be a tensor, a non-empty tuple/list of positional arguments or a "
        f"dict of keyword arguments for model(...); got {type(inputs).__name__}."
    )


def _forward(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    try:
        return model(*args, **kwargs)
    except GradGuardError:
        raise
    except Exception as error:
        shapes = [tuple(a.shape) for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
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


def _loss(
    output: Any,
    primary: Tensor | None,
    targets: Any,
    loss_fn: Callable[..., Tensor] | None,
    seed: int,
) -> Tensor:
    """The loss to differentiate; without loss_fn and targets, a random linear readout.

    The readout ``mean(y * r)``, r ~ N(0, 1) fixed by ``seed``, sends back the same
    gradient whatever the output's scale: the gradients measure the network, not the
    loss (a squared output would turn a 1e22 activation into an overflowed 1e44 loss).
    """
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


def _backward(
    loss: Tensor, params: Sequence[Tensor], outputs: Sequence[Tensor]
) -> tuple[list[Tensor | None], list[Tensor | None]]:
    """Gradients of the loss for the parameters and the recorded outputs; no ``.grad``."""
    grads = torch.autograd.grad(loss, [*params, *outputs], allow_unused=True)
    return list(grads[: len(params)]), list(grads[len(params) :])


@dataclass(frozen=True)
class _Structure:
    """What the loss's autograd graph shows of the architecture.

    Attributes:
        skip: an identity path around a parametrized branch (``x + f(x)``) ran; None when
            that cannot be settled: none found, but a custom ``autograd.Function`` (a
            reentrant checkpoint, say) hides part of the graph, or the graph was larger
            than :data:`_GRAPH_BUDGET` nodes.
        norm: a batch, layer, group, instance or RMS normalization operator ran (also one
            called as a function, or inside a custom module).
    """

    skip: bool | None
    norm: bool


_JOINS = frozenset({"AddBackward0", "SubBackward0"})
_RESHAPES = frozenset(
    {
        "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "TransposeBackward0",
        "PermuteBackward0", "ExpandBackward0", "UnsqueezeBackward0", "SqueezeBackward0",
        "SqueezeBackward1", "CloneBackward0", "ToCopyBackward0",
    }
)  # fmt: skip
_NORM_OPS = ("BatchNorm", "LayerNorm", "GroupNorm", "InstanceNorm", "RmsNorm")
_GRAPH_BUDGET = 200_000
"""Graph nodes visited (in all) looking for skip connections before giving up."""


def _graph_structure(loss: Tensor) -> _Structure:
    """Skip connections and normalization in the autograd graph of ``loss``.

    The graph records what ran, whatever the model's code looks like (no tracing, no
    data-dependent control flow to trip on): a skip connection is a sum (or difference)
    of two tensors one of which is computed from the other through parameters, the
    ``x + f(x)`` of a residual block. A plain layer's ``x @ w + b`` is not one: ``b`` is a
    parameter, not computed from ``x @ w``.
    """
    nodes: list[Any] = []
    seen: set[int] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        nodes.append(node)
        stack.extend(child for child, _ in node.next_functions)
    norm = any(op in type(node).__name__ for node in nodes for op in _NORM_OPS)
    budget = [_GRAPH_BUDGET]
    for node in nodes:
        if type(node).__name__ in _JOINS and _is_skip(node, budget):
            return _Structure(True, norm)
        if budget[0] <= 0:
            return _Structure(None, norm)
    opaque = any(isinstance(node, torch.autograd.function.BackwardCFunction) for node in nodes)
    return _Structure(None if opaque else False, norm)


def _is_leaf(node: Any) -> bool:
    return not hasattr(node, "_sequence_nr") or type(node).__name__ == "AccumulateGrad"


def _reshaped_from(node: Any) -> tuple[set[int], int]:
    """``node`` and what it reshapes (``x.view(...) + f(x)`` is a skip too), the oldest's number."""
    chain = {id(node)}
    while type(node).__name__ in _RESHAPES:
        inner = [c for c, _ in node.next_functions if c is not None and not _is_leaf(c)]
        if len(inner) != 1:
            break
        node = inner[0]
        chain.add(id(node))
    return chain, node._sequence_nr()


def _is_skip(join: Any, budget: list[int]) -> bool:
    """Whether one operand of ``join`` is computed from the other through parameters.

    Walks back from the later operand; nodes created before the earlier one cannot lead
    to it (autograd numbers nodes in creation order) and are not visited.
    """
    operands = [child for child, _ in join.next_functions if child is not None]
    operands = [child for child in operands if not _is_leaf(child)]
    if len(operands) != 2:
        return False
    early, late = sorted(operands, key=lambda node: node._sequence_nr())
    targets, floor = _reshaped_from(early)
    found = parametrized = False
    seen: set[int] = set()
    stack = [late]
    while stack and budget[0] > 0:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        budget[0] -= 1
        for child, _ in node.next_functions:
            if child is None:
                continue
            if type(child).__name__ == "AccumulateGrad":
                parametrized = True
            elif id(child) in targets:
                found = True
            elif not _is_leaf(child) and child._sequence_nr() > floor:
                stack.append(child)
    return found and parametrized


def _param_grad_norms(
    trainable: Sequence[tuple[str, Tensor]], grads: Sequence[Tensor | None]
) -> tuple[dict[str, float], float]:
    """Per-layer and global gradient norms via grad_stats, on aliases of the parameters.

    The aliases share storage with the parameters but own the ``.grad``: the model's
    own ``.grad`` fields are never written.
    """
    pairs = []
    used: set[str] = set()
    for (name, param), grad in zip(trainable, grads, strict=True):
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
    weight = _weight_of(module)
    if weight is None:
        return None, None
    norm = float(weight.detach().double().norm())
    if weight.dim() < 2 or weight.numel() == 0:
        return norm, None
    return norm, largest_singular_value(weight.reshape(weight.shape[0], -1))


def _reduce(moments: list[Tensor]) -> dict[str, float | None]:
    if not moments:
        return {}
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
    return {
        "mean": mean,
        "std": std,
        "gain": std / x_std if x_std else None,
        "saturated": None if bool(sat.isnan().all()) else float(sat.nansum()) / n,
        "dead": None if bool(dead.isnan().all()) else float(dead.nanmean()),
        "nonfinite": float(m[:, 8].sum()),
    }


def _layer_flags(stats: Mapping[str, float | None], relative: float | None) -> tuple[str, ...]:
    flags = []
    if relative is not None and (relative < 1 / RATIO):
        flags.append("vanishing")
    if relative is not None and (relative > RATIO or not math.isfinite(relative)):
        flags.append("exploding")
    if (stats.get("saturated") or 0.0) > SATURATED_FRACTION:
        flags.append("saturated")
    if (stats.get("dead") or 0.0) > DEAD_FRACTION:
        flags.append("dead")
    if (stats.get("nonfinite") or 0.0) > 0:
        flags.append("nonfinite")
    return tuple(flags)


def _out_grad_norms(
    records: Sequence[_Record], grads: Sequence[Tensor | None]
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


def _reference(records: Sequence[_Record], out_norms: Mapping[str, float | None]) -> float | None:
    """The output gradient of the last parametrized layer: the yardstick of depth."""
    for record in reversed(records):
        norm = out_norms.get(record.name)
        if _owns_params(record.module) and norm is not None and norm > 0 and math.isfinite(norm):
            return norm
    return None


def _owns_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def _build_layers(
    records: Sequence[_Record],
    param_norms: Mapping[str, float],
    out_norms: Mapping[str, float | None],
    followers: Mapping[str, init.Activation],
) -> list[LayerDiagnosis]:
    reference = _reference(records, out_norms)
    layers = []
    for record in records:
        stats = _reduce(record.moments)
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
                activation_mean=stats.get("mean"),
                activation_std=stats.get("std"),
                saturated_fraction=stats.get("saturated"),
                dead_fraction=stats.get("dead"),
                grad_norm=param_norms.get(record.name),
                output_grad_norm=out_norm,
                relative_grad=relative,
                weight_norm=weight_norm,
                weight_sv_max=sv_max,
                gain=stats.get("gain"),
                followed_by=str(follower) if follower is not None else None,
                flags=_layer_flags(stats, relative),
                note=record.note,
            )
        )
    return layers


def _unrun_owners(model: nn.Module, records: Sequence[_Record]) -> list[_Record]:
    """Add parameter owners never called as modules, after their closest recorded ancestor.

    ``MultiheadAttention.out_proj`` is one: attention uses its weight directly.
    """
    ordered = list(records)
    seen = {id(r.module) for r in records}
    for name, module in model.named_modules():
        if id(module) in seen or not _owns_params(module):
            continue
        record = _Record(name or ROOT_LAYER, module, -1, note="not called as a module")
        position = len(ordered)
        for i, existing in enumerate(ordered):
            if name.startswith(existing.name + "."):
                position = i + 1
        ordered.insert(position, record)
    for i, record in enumerate(ordered):
        record.index = i
    return ordered


# --------------------------------------------------------------------------- Jacobian


def _measure_jacobian(
    model: nn.Module,
    call: tuple[tuple[Any, ...], dict[str, Any]],
    batch_dim: int,
    samples: int,
    seed: int,
) -> tuple[JacobianDiagnosis | None, str | None]:
    args, kwargs = call
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
        y = _first_float(output)
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


# --------------------------------------------------------------------------- recurrent


def _rnn_mode(module: nn.Module) -> str:
    mode = getattr(module, "mode", None)
    if isinstance(mode, str):
        return mode
    if isinstance(module, nn.LSTMCell):
        return "LSTM"
    if isinstance(module, nn.GRUCell):
        return "GRU"
    return "RNN_TANH"


def spectral_radii(module: nn.RNNBase | nn.RNNCellBase) -> dict[str, float]:
    """Largest |eigenvalue| of each square recurrent weight block, per layer and gate."""
    gates = _GATE_NAMES[_rnn_mode(module)]
    radii = {}
    for name, param in module.named_parameters(recurse=False):
        if not name.startswith("weight_hh"):
            continue
        suffix = name.removeprefix("weight_hh").removeprefix("_")
        layer = suffix.replace("_reverse", "r") or "l0"
        for gate, block in zip(gates, param.detach().double().chunk(len(gates)), strict=True):
            if block.shape[0] == block.shape[1]:
                radii[f"{layer}.{gate}"] = float(torch.linalg.eigvals(block).abs().max())
    return radii


def _time_grads(
    module: nn.RNNBase, call: tuple[tuple[Any, ...], dict[str, Any]], seed: int
) -> tuple[Tensor, int]:
    """‖∂(u · h_T)/∂x_t‖ for every input step t, and the time dimension of the input."""
    args, kwargs = call
    x = args[0].detach().clone().requires_grad_(True)
    hx = _detached(args[1] if len(args) > 1 else kwargs.get("hx"))
    time_dim = 1 if module.batch_first and x.dim() == 3 else 0
    with torch.enable_grad():
        out = module(x, hx)[0]
        hidden = module.proj_size or module.hidden_size
        last = out.select(time_dim, -1)[..., :hidden]  # the forward direction's last state
        generator = torch.Generator().manual_seed(seed)
        u = torch.randn(last.shape, generator=generator, dtype=torch.float32)
        (grad,) = torch.autograd.grad((last * u.to(last.device, last.dtype)).sum(), x)
    norms = grad.detach().double().movedim(time_dim, 0).reshape(x.shape[time_dim], -1).norm(dim=1)
    return norms.cpu(), time_dim


def _detached(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detached(v) for v in value)
    return value


def _param(module: nn.Module, name: str) -> Tensor:
    value = getattr(module, name)
    if not isinstance(value, Tensor):
        raise UnsupportedModelError(f"{type(module).__name__}.{name} is not a tensor")
    return value.detach()


def forget_gate_stats(module: nn.LSTM, x: Tensor, time_dim: int, hx: Any = None) -> ForgetGate:
    """Unroll layer 0 (forward direction) of an LSTM on ``x`` and collect its forget gate."""
    hidden = module.hidden_size
    w_ih, w_hh = _param(module, "weight_ih_l0"), _param(module, "weight_hh_l0")
    bias = torch.zeros(4 * hidden, dtype=x.dtype, device=x.device)
    if module.bias:
        bias = _param(module, "bias_ih_l0") + _param(module, "bias_hh_l0")
    steps = x.detach().movedim(time_dim, 0)
    shape = (*steps.shape[1:-1], module.proj_size or hidden)
    h = torch.zeros(shape, dtype=x.dtype, device=x.device)
    c = torch.zeros((*steps.shape[1:-1], hidden), dtype=x.dtype, device=x.device)
    if isinstance(hx, tuple) and hx[0] is not None:
        h, c = hx[0][0].detach(), hx[1][0].detach()
    forget = []
    for x_t in steps:
        i, f, g, o = (x_t @ w_ih.T + h @ w_hh.T + bias).chunk(4, dim=-1)
        f = torch.sigmoid(f)
        forget.append(f)
        c = f * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        if module.proj_size:
            h = h @ _param(module, "weight_hr_l0").T
    gates = torch.stack(forget).double()
    bias_f = float(bias[hidden : 2 * hidden].double().mean())
    return ForgetGate(float(gates.mean()), float(gates.std()), bias_f)


def _recurrent_one(record: _Record, seed: int) -> RecurrentDiagnosis:
    module = record.module
    kind = type(module).__name__
    radii = spectral_radii(module) if isinstance(module, nn.RNNBase | nn.RNNCellBase) else {}
    base = RecurrentDiagnosis(record.name, kind, None, None, None, radii, None)
    if not isinstance(module, nn.RNNBase):
        return _with(base, note="a cell run step by step: gradient through time not measured")
    if record.rnn_call is None or not isinstance(record.rnn_call[0][0], Tensor):
        return _with(base, note="packed or non-tensor input: gradient through time not measured")
    norms, time_dim = _time_grads(module, record.rnn_call, seed)
    values = tuple(float(v) for v in norms)
    decay = values[0] / values[-1] if values[-1] > 0 else math.inf
    forget = None
    if isinstance(module, nn.LSTM):
        args, kwargs = record.rnn_call
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        forget = forget_gate_stats(module, args[0], time_dim, hx)
    flags: tuple[str, ...] = ()
    if len(values) > 1 and decay < 1 / RATIO:
        flags = ("vanishing",)
    elif len(values) > 1 and (decay > RATIO or not math.isfinite(decay)):
        flags = ("exploding",)
    return RecurrentDiagnosis(record.name, kind, len(values), values, decay, radii, forget, flags)


def _with(base: RecurrentDiagnosis, *, note: str) -> RecurrentDiagnosis:
    return RecurrentDiagnosis(
        base.name, base.kind, None, None, None, base.spectral_radius, None, (), note
    )


def _recurrent(records: Sequence[_Record], seed: int) -> tuple[list[RecurrentDiagnosis], list[str]]:
    found, notes = [], []
    for record in records:
        if not isinstance(record.module, nn.RNNBase | nn.RNNCellBase):
            continue
        try:
            found.append(_recurrent_one(record, seed))
        except Exception as error:  # noqa: BLE001 - report, never crash the diagnosis
            notes.append(f"{record.name}: gradient through time not measured: {error}")
    return found, notes


# --------------------------------------------------------------------------- verdict


@dataclass(frozen=True)
class _Signal:
    kind: str  # "vanishing" | "exploding"
    source: str  # "nonfinite" | "depth" | "jacobian" | "time"
    reason: str
    factor: float = _NAN  # the measured ratio behind it (nan for "nonfinite")


def _nonfinite_signals(
    layers: Sequence[LayerDiagnosis], loss: float | None, grad_norm: float | None
) -> list[_Signal]:
    signals = []
    overflowed = [layer.name for layer in layers if "nonfinite" in layer.flags]
    if overflowed:
        signals.append(
            _Signal("exploding", "nonfinite", f"activations are inf/NaN from {overflowed[0]!r} on")
        )
    if loss is not None and not math.isfinite(loss):
        signals.append(_Signal("exploding", "nonfinite", f"the loss is {loss}"))
    if grad_norm is not None and not math.isfinite(grad_norm):
        signals.append(_Signal("exploding", "nonfinite", f"the gradient norm is {grad_norm}"))
    return signals


def _depth_signal(layers: Sequence[LayerDiagnosis]) -> _Signal | None:
    owners = [layer for layer in layers if layer.parameters and layer.relative_grad is not None]
    if len(owners) < 2:
        return None
    first, last = owners[0], owners[-1]
    ratio = first.relative_grad if first.relative_grad is not None else _NAN
    if 1 / RATIO <= ratio <= RATIO:
        return None
    kind = "vanishing" if ratio < 1 / RATIO else "exploding"
    flagged = [layer.name for layer in layers if kind in layer.flags][:3]
    return _Signal(
        kind,
        "depth",
        f"the gradient at the output of the first layer, {first.name!r} ({first.kind}), is "
        f"{ratio:.2g} times the gradient at the last, {last.name!r} ({last.kind}); beyond the "
        f"band [1/{RATIO:g}, {RATIO:g}]; {kind} layers include {', '.join(flagged)}",
        ratio,
    )


def _jacobian_signal(jac: JacobianDiagnosis | None) -> _Signal | None:
    if jac is None:
        return None
    rms = jac.rms_singular_value
    if 1 / RATIO <= rms <= RATIO:
        return None
    kind = "vanishing" if rms < 1 / RATIO else "exploding"
    return _Signal(
        kind,
        "jacobian",
        f"the input-output Jacobian's root mean squared singular value is {rms:.2g} "
        f"(largest {jac.top_singular_values[0]:.2g}); isometry is 1, the band "
        f"[1/{RATIO:g}, {RATIO:g}]",
        rms,
    )


def _time_signals(recurrent: Sequence[RecurrentDiagnosis]) -> list[_Signal]:
    signals = []
    for rnn in recurrent:
        for kind in rnn.flags:
            signals.append(
                _Signal(
                    kind,
                    "time",
                    f"in {rnn.name!r} ({rnn.kind}) the gradient reaching the first of "
                    f"{rnn.steps} steps is {rnn.decay:.2g} times the gradient reaching the "
                    f"last (band [1/{RATIO:g}, {RATIO:g}])",
                    rnn.decay if rnn.decay is not None else _NAN,
                )
            )
    return signals


def _verdict(signals: Sequence[_Signal]) -> str:
    kinds = {s.kind for s in signals}
    if "exploding" in kinds:
        return "exploding"
    return "vanishing" if "vanishing" in kinds else "healthy"


def _healthy_reason(
    ratio: float | None, jac: JacobianDiagnosis | None, recurrent: Sequence[RecurrentDiagnosis]
) -> str:
    parts = []
    if ratio is not None:
        parts.append(f"first/last layer gradient {ratio:.2g}")
    if jac is not None:
        parts.append(f"Jacobian rms singular value {jac.rms_singular_value:.2g}")
    parts += [f"{r.name!r} decay through time {r.decay:.2g}" for r in recurrent if r.decay]
    measured = "; ".join(parts) if parts else "no gradient ratio could be measured"
    return f"{measured}: within [1/{RATIO:g}, {RATIO:g}]"


# --------------------------------------------------------------------------- recommendations


@dataclass(frozen=True)
class _Context:
    model: nn.Module
    verdict: str
    signals: tuple[_Signal, ...]
    layers: tuple[LayerDiagnosis, ...]
    recurrent: tuple[RecurrentDiagnosis, ...]
    followers: Mapping[str, init.Activation]
    clip: _Clip
    grad_norm: float
    structure: _Structure

    @property
    def sources(self) -> set[str]:
        return {s.source for s in self.signals}

    @property
    def feedforward(self) -> bool:
        """A signal about depth: the layer-wise remedies apply.

        A Jacobian signal next to a through-time one comes from the recurrence.
        """
        sources = self.sources
        return bool(sources & {"depth", "nonfinite"}) or (
            "jacobian" in sources and "time" not in sources
        )

    @property
    def weight_layers(self) -> list[tuple[str, nn.Module]]:
        return [
            (name, module)
            for name, module in self.model.named_modules()
            if isinstance(module, init.WEIGHT_LAYERS)
        ]


def _mis_initialized(ctx: _Context) -> list[tuple[str, float, str]]:
    """(layer, actual std / expected std, scheme) for weights off their activation's scheme."""
    found = []
    for name, module in ctx.weight_layers:
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() < 2 or weight.numel() < 2:
            continue
        act = ctx.followers.get(name, init.LINEAR)
        expected = init.expected_std(weight, act.scheme, act)
        ratio = float(weight.detach().double().std()) / expected
        if not 1 / INIT_TOLERANCE <= ratio <= INIT_TOLERANCE:
            found.append((name, ratio, act.scheme))
    return found


def _rec_init(ctx: _Context) -> list[Recommendation]:
    wrong = _mis_initialized(ctx)
    if not wrong or ctx.verdict == "healthy" or not ctx.feedforward:
        return []
    name, ratio, scheme = wrong[0]
    return [
        Recommendation(
            "init",
            "Initialize each layer for the activation that follows it (He/Kaiming for the "
            "ReLU family, Xavier/Glorot for tanh, sigmoid or none, LeCun for SELU): "
            "gradguard.init.initialize(model, 'auto'). "
            f"{len(wrong)} weight layers are off that scale, e.g. {name!r} at {ratio:.2g} "
            f"times the {scheme} std; every layer then multiplies the gradient by a "
            "factor away from 1.",
            tuple(w[0] for w in wrong),
            SOURCES["init"],
        )
    ]


_SIGMOID_LIKE = {"sigmoid", "hardsigmoid", "logsigmoid"}


def _rec_activation(ctx: _Context) -> list[Recommendation]:
    """Sigmoids: no init rescues a deep stack (slope <= 1/4). Tanh: only once init is right."""
    kinds = {
        layer.name: act.kind
        for layer in ctx.layers
        if (act := init.activation_of(_module(ctx.model, layer.name))) is not None
        and act.family == "saturating"
    }
    if ctx.verdict != "vanishing" or not kinds or not ctx.feedforward:
        return []
    sigmoids = [name for name, kind in kinds.items() if kind in _SIGMOID_LIKE]
    if sigmoids:
        why = (
            "a sigmoid passes back at most 1/4 of the gradient (nothing once saturated), so "
            f"no initialization keeps {len(sigmoids)} of them in a row trainable"
        )
    elif not _mis_initialized(ctx):
        why = (
            "the weights already follow Xavier, and each tanh-like unit still passes back "
            "less than all of the gradient (nothing once saturated)"
        )
    else:
        return []  # tanh with the wrong scale: the init recommendation comes first
    return [
        Recommendation(
            "activation",
            "Replace the saturating activations with a non-saturating one (ReLU, Leaky "
            f"ReLU, GELU) and He initialization: {why}.",
            tuple(kinds),
            SOURCES["activation"],
        )
    ]


def _module(model: nn.Module, name: str) -> nn.Module:
    if name == ROOT_LAYER:
        return model
    try:
        return model.get_submodule(name)
    except AttributeError:
        return nn.Identity()


def _has_normalization(ctx: _Context) -> bool:
    """A norm layer of torch or a custom one (``LlamaRMSNorm``), or a norm operator that ran."""
    return ctx.structure.norm or any(
        isinstance(module, init.NORM_LAYERS)
        or (
            type(module).__name__.endswith(("Norm", "Normalization"))
            and not type(module).__name__.startswith("_")  # _WeightNorm: a parametrization
        )
        for module in ctx.model.modules()
    )


def _rec_structure(ctx: _Context) -> list[Recommendation]:
    if ctx.verdict == "healthy" or not ctx.feedforward:
        return []
    flagged = tuple(layer.name for layer in ctx.layers if ctx.verdict in layer.flags)
    recs = []
    if not _has_normalization(ctx):
        recs.append(
            Recommendation(
                "normalization",
                "Add normalization after the linear layers (BatchNorm, or LayerNorm for "
                "sequences and small batches): each layer then sees inputs of unit scale, "
                "whatever the depth and the initialization.",
                flagged,
                SOURCES["normalization"],
            )
        )
    if len(ctx.weight_layers) >= 8 and ctx.structure.skip is not True:
        has = "if the network has none" if ctx.structure.skip is None else "the network has none"
        recs.append(
            Recommendation(
                "residual",
                f"Add residual connections, x + f(x) ({has}): with "
                f"{len(ctx.weight_layers)} weight layers in a row, the identity path "
                "carries the gradient past the layers that shrink or amplify it.",
                flagged,
                SOURCES["residual"],
            )
        )
    return recs


def _rec_exploding(ctx: _Context) -> list[Recommendation]:
    if ctx.verdict != "exploding":
        return []
    if ctx.clip.value is not None:
        clip = (
            f"Clip the global gradient norm, e.g. gradguard.NormClip({ctx.clip.value:.2g}) "
            f"({ctx.clip.basis}; below the global norm measured here, {ctx.grad_norm:.2g}, "
            "so it clips), or let the threshold adapt with gradguard.ZClip()."
        )
    else:
        clip = (
            "Clip the gradient with an adaptive threshold, gradguard.ZClip() or "
            f"gradguard.AutoClip(): {ctx.clip.basis}, so no fixed value fits."
        )
    return [
        Recommendation(
            "clip",
            clip + " Clipping bounds each step; it does not remove the cause: fix the cause, "
            "then run diagnose again for a threshold measured on healthy gradients.",
            (),
            SOURCES["clip"],
        ),
        Recommendation(
            "lower-lr",
            "Lower the learning rate (try 10 times smaller, with a warm-up) until the cause "
            "is fixed: the same learning rate times a gradient this large overshoots.",
            (),
            SOURCES["lower-lr"],
        ),
    ]


def _rec_recurrent(ctx: _Context) -> list[Recommendation]:
    recs = []
    for rnn in ctx.recurrent:
        radius = max(rnn.spectral_radius.values(), default=_NAN)
        if "vanishing" in rnn.flags and rnn.kind == "RNN":
            recs.append(
                Recommendation(
                    "gated-rnn",
                    "Use an LSTM or GRU instead of a vanilla RNN: their additive cell "
                    f"state carries the gradient across time; here the first of {rnn.steps} "
                    f"steps gets {rnn.decay:.2g} of the gradient the last one gets.",
                    (rnn.name,),
                    SOURCES["gated-rnn"],
                )
            )
        if rnn.flags and rnn.kind in ("RNN", "RNNCell") and not 0.8 <= radius <= 1.25:
            recs.append(
                Recommendation(
                    "recurrent-init",
                    "Initialize the recurrent weights orthogonally (spectral radius 1; now "
                    f"{radius:.2g}): each step back in time multiplies the gradient by up "
                    "to the radius, so above 1 it grows and below 1 it shrinks, "
                    "exponentially in the number of steps.",
                    (rnn.name,),
                    SOURCES["recurrent-init"],
                )
            )
        recs += _rec_forget_bias(rnn)
    return recs


def _rec_forget_bias(rnn: RecurrentDiagnosis) -> list[Recommendation]:
    gate = rnn.forget_gate
    if "vanishing" not in rnn.flags or rnn.kind not in ("LSTM", "GRU"):
        return []
    if gate is None or gate.bias >= 0.5:
        return [
            Recommendation(
                "long-memory",
                f"The gates have not learned to hold yet: the gradient from {rnn.steps} steps "
                f"back is {rnn.decay:.2g} of the last step's at initialization. Training "
                "usually opens them; for dependencies known to span T steps, draw the "
                "forget-gate biases as log(U(1, T - 1)) (chrono initialization).",
                (rnn.name,),
                SOURCES["long-memory"],
            )
        ]
    return [
        Recommendation(
            "lstm-forget-bias",
            "Set the forget-gate bias to 1 (gradguard.init.set_forget_bias(lstm, 1.0), or "
            "gradguard.init.initialize(model, forget_bias=1.0)): the forget gate now "
            f"averages {gate.mean:.2f} (bias {gate.bias:.2g}), so the cell keeps that "
            f"share per step and the gradient from {rnn.steps} steps back is {rnn.decay:.2g} "
            "of the last step's.",
            (rnn.name,),
            SOURCES["lstm-forget-bias"],
        )
    ]


def _feeding(ctx: _Context, layers: Sequence[LayerDiagnosis]) -> list[tuple[str, nn.Module]]:
    """The weight layer that runs last before each of ``layers`` (the one feeding it)."""
    found: dict[str, nn.Module] = {}
    for layer in layers:
        before = [
            (other.name, module)
            for other in ctx.layers[: layer.index]
            if isinstance(module := _module(ctx.model, other.name), init.WEIGHT_LAYERS)
        ]
        if before:
            found.setdefault(*before[-1])
    return list(found.items())


def _input_std(ctx: _Context) -> float | None:
    """The std of the model's input, from the first layer's output std over its gain."""
    for layer in ctx.layers:
        if layer.gain is not None and layer.gain > 0 and layer.activation_std is not None:
            return layer.activation_std / layer.gain
    return None


def _rec_dead(ctx: _Context, dead: Sequence[LayerDiagnosis]) -> Recommendation:
    """Remedies for dead ReLUs, less those the model already has (He init, zero biases)."""
    feeding = _feeding(ctx, dead)
    wrong = {name for name, _, _ in _mis_initialized(ctx)}
    biased = [
        name
        for name, module in feeding
        if isinstance(bias := getattr(module, "bias", None), Tensor) and bool(bias.any())
    ]
    if not feeding or biased or any(name in wrong for name, _ in feeding):
        remedies = "use He initialization with zero biases, a Leaky ReLU, or a lower learning rate"
    else:
        remedies = (
            "use a Leaky ReLU, or a lower learning rate (the layers feeding them already "
            "follow He initialization with zero biases)"
        )
    return Recommendation(
        "dead-units",
        f"{dead[0].dead_fraction:.0%} of the units after {dead[0].name!r} output zero for "
        f"every example (dead ReLUs get no gradient): {remedies}.",
        tuple(layer.name for layer in dead),
        SOURCES["dead-units"],
    )


def _rec_saturation(ctx: _Context, saturated: Sequence[LayerDiagnosis]) -> Recommendation:
    """Remedies for saturated units, less those the model already has (unit inputs, Xavier)."""
    feeding = _feeding(ctx, saturated)
    wrong = {name for name, _, _ in _mis_initialized(ctx)}
    remedies = []
    std = _input_std(ctx)
    if std is None or not 1 / INIT_TOLERANCE <= std <= INIT_TOLERANCE:
        remedies.append("scale the inputs to unit variance")
    if not feeding or any(name in wrong for name, _ in feeding):
        remedies.append("use Xavier initialization")
    remedies.append("use a non-saturating activation")
    text = remedies[0] if len(remedies) == 1 else ", ".join(remedies[:-1]) + ", or " + remedies[-1]
    return Recommendation(
        "saturation",
        f"{saturated[0].saturated_fraction:.0%} of the outputs of {saturated[0].name!r} sit "
        f"where the activation's slope is under {SATURATION_DERIVATIVE:.0%} of its peak: "
        f"{text}.",
        tuple(layer.name for layer in saturated),
        SOURCES["saturation"],
    )


def _rec_units(ctx: _Context) -> list[Recommendation]:
    dead = [layer for layer in ctx.layers if "dead" in layer.flags]
    saturated = [layer for layer in ctx.layers if "saturated" in layer.flags]
    return ([_rec_dead(ctx, dead)] if dead else []) + (
        [_rec_saturation(ctx, saturated)] if saturated else []
    )


def _recommend(ctx: _Context) -> tuple[Recommendation, ...]:
    rules = (_rec_init, _rec_activation, _rec_structure, _rec_recurrent, _rec_exploding)
    recs = [rec for rule in rules for rec in rule(ctx)]
    return tuple(recs + _rec_units(ctx))


@dataclass(frozen=True)
class _Clip:
    """A global-norm clipping threshold (None: no fixed value fits) and, in words, its basis."""

    value: float | None
    basis: str


def _typical_norm(param_norms: Mapping[str, float]) -> tuple[float, int] | None:
    """√L times the median layer gradient norm, and L, over the finite nonzero layer norms.

    The global norm the batch would have if every layer's gradient were typical.
    """
    norms = sorted(v for v in param_norms.values() if math.isfinite(v) and v > 0)
    if not norms:
        return None
    mid = len(norms) // 2
    median = norms[mid] if len(norms) % 2 else (norms[mid - 1] + norms[mid]) / 2
    return math.sqrt(len(norms)) * median, len(norms)


_AMPLIFICATION = {
    "depth": "the amplification from the last layer's output to the first's",
    "time": "the amplification from the last time step to the first",
    "jacobian": "the input-output Jacobian's rms singular value",
}


def _suggested_clip(
    typical: tuple[float, int] | None, grad_norm: float, signals: Sequence[_Signal]
) -> _Clip:
    """The smallest of the bounds below that apply, rounded down to 2 significant figures.

    * √L times the median layer gradient norm: the global norm if every layer were typical,
      so clipping there bounds the outlier layers and leaves the typical ones alone;
    * :data:`CLIP_FRACTION` times the global norm G: a threshold at or above G would not
      clip the very batch it was measured on (where all layers are alike, √L times the
      median *is* G);
    * when a gradient explodes: G divided by the amplification measured, the depth ratio or
      the decay through time (the larger, if both), else the Jacobian's rms singular value.
      That is about the norm without the explosion, the size of a step the repaired network
      takes; a threshold read off the exploded norms themselves (1e22 on a ReLU network
      with N(0, 1) weights) bounds nothing.

    Always below G, positive and finite. No value when G or the amplification is not
    finite (an overflow), when an activation or the loss overflowed, or with no gradient.
    """
    exploding = [s for s in signals if s.kind == "exploding"]
    if any(s.source == "nonfinite" for s in exploding) or not math.isfinite(grad_norm):
        return _Clip(None, "the measured norms overflow (inf/NaN)")
    if grad_norm <= 0:
        return _Clip(None, "the measured gradient is zero")
    bounds = [(CLIP_FRACTION * grad_norm, f"{CLIP_FRACTION:g} times the global norm")]
    if typical is not None:
        bounds.append(
            (
                typical[0],
                f"√L times the median layer gradient norm, L = {typical[1]} layers: the "
                "global norm if every layer were typical",
            )
        )
    ratios = [s for s in exploding if s.source in ("depth", "time")] or [
        s for s in exploding if s.source == "jacobian"
    ]
    if ratios:
        worst = max(ratios, key=lambda s: s.factor)
        if not math.isfinite(worst.factor):
            return _Clip(None, "the measured amplification overflows (inf/NaN)")
        bounds.append(
            (
                grad_norm / worst.factor,
                f"the global norm divided by {_AMPLIFICATION[worst.source]}, "
                f"{worst.factor:.2g}: about the norm without the explosion",
            )
        )
    value, basis = min(bounds, key=lambda bound: bound[0])
    rounded = float(_TWO_FIGURES_DOWN.create_decimal(value)) if value > 0 else 0.0
    if not 0 < rounded < grad_norm:  # an underflow: no number is better than a wrong one
        return _Clip(None, "the measured norms are out of range")
    return _Clip(rounded, basis)


_TWO_FIGURES_DOWN = decimal.Context(prec=2, rounding=decimal.ROUND_DOWN)
"""Rounds to 2 significant figures toward zero: a rounded bound stays below the bound."""


# --------------------------------------------------------------------------- diagnose


def diagnose(
    model: nn.Module,
    inputs: Any,
    targets: Any = None,
    loss_fn: Callable[..., Tensor] | None = None,
    *,
    jacobian: bool = True,
    batch_dim: int | None = None,
    samples: int = 4,
    seed: int = 0,
) -> Diagnosis:
    """Diagnose vanishing or exploding gradients of ``model`` on one batch, before training.

    Runs one forward pass with hooks, one backward pass with ``torch.autograd.grad`` (the
    model's ``.grad`` fields are never written), the Jacobian estimate and, for each
    RNN/LSTM/GRU, one pass through time; see the module docstring for what is measured
    and the thresholds of the verdict. The model is left exactly as it was found.

    The clipping threshold (``suggested_clip``, and the ``clip`` recommendation when the
    verdict is "exploding") is the smallest of these bounds, rounded down to 2
    significant figures:

    * √L times the median layer gradient norm, the global norm if every layer were
      typical: clipping there bounds outlier layers and leaves ordinary steps alone;
    * :data:`CLIP_FRACTION` (half) of the global norm G: a threshold at or above G would
      not clip the batch it was measured on, and where every layer is alike √L times the
      median is G itself;
    * when gradients explode, G divided by the amplification measured (the depth ratio or
      the decay through time, else the Jacobian's rms singular value): about the norm
      without the explosion, so steps keep the size the repaired network takes. A value
      read off the exploded norms (1e22 on a 30-layer ReLU network with N(0, 1) weights)
      would bound nothing; the fix there is the initialization, and the threshold to keep
      is the one diagnose measures after it.

    It is therefore always below G, positive and finite; when the norms, an activation or
    the loss overflow (inf/NaN) no fixed value is given and the advice is an adaptive
    threshold (``ZClip``, ``AutoClip``). The message says which bound the number is.

    Recommendations leave out what the model already has: normalization when it has a
    norm layer (torch's, a custom ``...Norm`` module, or a norm operator in the autograd
    graph), residual connections when the autograd graph holds an ``x + f(x)``, He
    initialization with zero biases for dead ReLUs whose feeding layers have both,
    Xavier initialization and input scaling for saturated units when the feeding layers
    follow Xavier and the inputs have unit std, a gated RNN for an LSTM or GRU, a Leaky
    ReLU for units that already leak (they are never flagged dead).

    Args:
        model: the network, in the mode to diagnose (a new model is in train mode).
        inputs: a tensor, a tuple/list of positional arguments or a dict of keyword
            arguments for ``model``.
        targets: optional targets: with no ``loss_fn``, integer targets get
            cross-entropy over dimension 1 (or the last) and float targets of the
            output's shape get the mean squared error.
        loss_fn: ``loss_fn(output, targets)`` (or ``loss_fn(output)`` without targets)
            returning a scalar tensor. Without it and without targets the loss is a
            fixed random readout ``mean(y * r)``, r ~ N(0, 1), of the output's first
            floating-point tensor ``y``: its gradient does not depend on ``y``'s scale.
        jacobian: estimate the input-output Jacobian (a few hundred products on a few
            examples; turn off to save time on large models).
        batch_dim: the batch dimension of inputs and outputs; by default 0, or 1 when the
            first module (in registration order) with a ``batch_first`` attribute has it
            False.
        samples: examples the Jacobian is averaged over.
        seed: seed of the readout, the Jacobian's directions and any dropout.

    Returns:
        The diagnosis.

    Raises:
        UnsupportedModelError: not a module, no parameters, or all parameters frozen.
        ConfigError: inputs the model does not accept, or targets without a default loss.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> layers = [m for _ in range(20) for m in (nn.Linear(32, 32), nn.Sigmoid())]
        >>> diag = diagnose(nn.Sequential(*layers), torch.randn(16, 32))
        >>> diag.verdict, diag.flagged("vanishing")[0]
        ('vanishing', '0')
    """
    model = uncompiled(model)  # diagnosed eagerly, under the model's own names
    trainable = _trainable(model)
    call = _as_call(inputs)
    devices = sorted({p.device.index or 0 for _, p in trainable if p.device.type == "cuda"})
    with ExitStack() as stack:
        stack.enter_context(_untouched(model))
        stack.enter_context(torch.random.fork_rng(devices=devices))
        if devices and any(isinstance(m, nn.RNNBase) for m in model.modules()):
            stack.enter_context(_cudnn_disabled())
        torch.manual_seed(seed)
        return _diagnose(
            model, trainable, call, targets, loss_fn, (jacobian, batch_dim, samples, seed)
        )


def _diagnose(
    model: nn.Module,
    trainable: list[tuple[str, nn.Parameter]],
    call: tuple[tuple[Any, ...], dict[str, Any]],
    targets: Any,
    loss_fn: Callable[..., Tensor] | None,
    options: tuple[bool, int | None, int, int],
) -> Diagnosis:
    want_jacobian, batch_dim, samples, seed = options
    if batch_dim is None:
        batch_dim = _infer_batch_dim(model)
    with _Recorder(model, batch_dim) as recorder:
        output = _forward(model, *call)
    records = _unrun_owners(model, sorted(recorder.records.values(), key=lambda r: r.index))
    primary = _first_float(output)
    loss = _loss(output, primary, targets, loss_fn, seed)
    outputs = [t for record in records for t in record.outputs]
    structure = _graph_structure(loss)
    param_grads, out_grads = _backward(loss, [p for _, p in trainable], outputs)
    del output, outputs
    param_norms, grad_norm = _param_grad_norms(trainable, param_grads)
    followers = _followers(model, records)
    layers = tuple(
        _build_layers(records, param_norms, _out_grad_norms(records, out_grads), followers)
    )
    for record in records:
        record.outputs.clear()  # free the activations before the Jacobian's passes
    notes = [f"{r.name}: {r.note}" for r in records if r.note and r.calls]
    jac, note = (
        _measure_jacobian(model, call, batch_dim, samples, seed) if want_jacobian else (None, None)
    )
    notes += [note] if note else []
    recurrent, rnn_notes = _recurrent(records, seed)
    return _conclude(
        model,
        layers,
        jac,
        tuple(recurrent),
        (float(loss.detach()), grad_norm, _typical_norm(param_norms)),
        (followers, structure),
        (batch_dim, tuple(notes + rnn_notes)),
    )


def _followers(model: nn.Module, records: Sequence[_Record]) -> dict[str, init.Activation]:
    """The activation after each weight layer: torch.fx if it traces, else run order."""
    order = [(r.name, r.module) for r in records if r.calls]
    try:
        return init.trace_followers(model, order=order)
    except Exception:  # noqa: BLE001 - an annotation only: never fail the diagnosis for it
        return init.followers(order)


def _conclude(
    model: nn.Module,
    layers: tuple[LayerDiagnosis, ...],
    jac: JacobianDiagnosis | None,
    recurrent: tuple[RecurrentDiagnosis, ...],
    measured: tuple[float, float, tuple[float, int] | None],
    shape: tuple[Mapping[str, init.Activation], _Structure],
    extra: tuple[int, tuple[str, ...]],
) -> Diagnosis:
    loss, grad_norm, typical = measured
    followers, structure = shape
    signals = _nonfinite_signals(layers, loss, grad_norm)
    signals += [s for s in (_depth_signal(layers), _jacobian_signal(jac)) if s is not None]
    signals += _time_signals(recurrent)
    verdict = _verdict(signals)
    owners = [layer for layer in layers if layer.parameters and layer.relative_grad is not None]
    ratio = owners[0].relative_grad if len(owners) > 1 else None
    reasons = tuple(s.reason for s in signals if s.kind == verdict) or (
        _healthy_reason(ratio, jac, recurrent),
    )
    clip = _suggested_clip(typical, grad_norm, signals)
    ctx = _Context(
        model, verdict, tuple(signals), layers, recurrent, followers, clip, grad_norm, structure
    )
    return Diagnosis(
        verdict=verdict,
        reasons=reasons,
        layers=layers,
        jacobian=jac,
        recurrent=recurrent,
        recommendations=_recommend(ctx),
        loss=loss,
        grad_norm=grad_norm,
        gradient_ratio=ratio,
        suggested_clip=clip.value,
        batch_dim=extra[0],
        notes=extra[1],
    )


# --------------------------------------------------------------------------- display


def _fmt(value: float | int | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-2):
        return f"{value:.2e}"
    return f"{value:.3g}"


LAYER_COLUMNS = (
    "#", "layer", "type", "mean", "std", "sat/dead", "grad (params)", "grad (output)",
    "relative", "σmax(W)", "gain", "flags",
)  # fmt: skip
"""Columns of the layer table, in full (plain text, HTML, wide consoles)."""

NARROW_COLUMNS = ("layer", "type", "std", "sat/dead", "relative", "flags")
"""Columns a console narrower than :data:`WIDE_CONSOLE` characters shows."""

WIDE_CONSOLE = 150


def _units(layer: LayerDiagnosis) -> str:
    if layer.saturated_fraction is not None:
        return f"{layer.saturated_fraction:.0%} sat"
    if layer.dead_fraction is not None:
        return f"{layer.dead_fraction:.0%} dead"
    return "-"


def _layer_rows(diag: Diagnosis, columns: Sequence[str] = LAYER_COLUMNS) -> list[list[str]]:
    rows = []
    for layer in diag.layers:
        cells = {
            "#": str(layer.index),
            "layer": layer.name,
            "type": layer.kind + (f" → {layer.followed_by}" if layer.followed_by else ""),
            "mean": _fmt(layer.activation_mean),
            "std": _fmt(layer.activation_std),
            "sat/dead": _units(layer),
            "grad (params)": _fmt(layer.grad_norm),
            "grad (output)": _fmt(layer.output_grad_norm),
            "relative": _fmt(layer.relative_grad),
            "σmax(W)": _fmt(layer.weight_sv_max),
            "gain": _fmt(layer.gain),
            "flags": " ".join(layer.flags),
        }
        rows.append([cells[column] for column in columns])
    return rows


RECURRENT_COLUMNS = (
    "module", "type", "steps", "decay (first/last)", "spectral radius", "forget gate", "flags",
)  # fmt: skip


def _recurrent_rows(diag: Diagnosis) -> list[list[str]]:
    rows = []
    for rnn in diag.recurrent:
        radius = max(rnn.spectral_radius.values(), default=None)
        gate = rnn.forget_gate
        forget = "-" if gate is None else f"mean {gate.mean:.2f}, bias {gate.bias:.2g}"
        rows.append(
            [
                rnn.name,
                rnn.kind,
                _fmt(rnn.steps),
                _fmt(rnn.decay),
                _fmt(radius),
                forget,
                " ".join(rnn.flags) or (rnn.note or ""),
            ]
        )
    return rows


def _jacobian_line(jac: JacobianDiagnosis | None) -> str:
    if jac is None:
        return "Jacobian: not measured"
    top = ", ".join(_fmt(v) for v in jac.top_singular_values)
    how = "exact" if jac.exact else f"{jac.products} products"
    return (
        f"Jacobian (per example, {jac.out_features} x {jac.in_features}, mean of "
        f"{jac.samples}; {how}): largest singular values {top}; rms singular value "
        f"{_fmt(jac.rms_singular_value)} (isometry: 1)"
    )


def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return lines


def _plain_text(diag: Diagnosis) -> str:
    lines = [f"gradguard diagnosis: {diag.verdict.upper()}"]
    lines += [f"  - {reason}" for reason in diag.reasons]
    lines += ["", *_text_table(LAYER_COLUMNS, _layer_rows(diag)), "", _jacobian_line(diag.jacobian)]
    if diag.recurrent:
        lines += ["", *_text_table(RECURRENT_COLUMNS, _recurrent_rows(diag))]
    if diag.recommendations:
        lines += ["", "Recommendations:"]
        lines += [f"  - {rec}" for rec in diag.recommendations]
    if diag.notes:
        lines += ["", "Notes:", *(f"  - {note}" for note in diag.notes)]
    return "\n".join(lines)


_STYLE = {"healthy": "bold green", "vanishing": "bold yellow", "exploding": "bold red"}


def _rich_renderables(diag: Diagnosis, width: int) -> Iterator[Any]:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    yield Text.assemble(("gradguard diagnosis: ", "bold"), (diag.verdict, _STYLE[diag.verdict]))
    for reason in diag.reasons:
        yield Text(f"  • {reason}")
    columns = LAYER_COLUMNS if width >= WIDE_CONSOLE else NARROW_COLUMNS
    table = Table(title="Layers, in run order", title_justify="left", box=box.SIMPLE_HEAD)
    for column in columns:
        table.add_column(
            column, justify="left" if column in ("layer", "type", "flags") else "right"
        )
    for row in _layer_rows(diag, columns):
        bad = "exploding" in row[-1] or "nonfinite" in row[-1]
        table.add_row(*row, style="red" if bad else "yellow" if row[-1] else "")
    yield table
    yield Text(_jacobian_line(diag.jacobian))
    if diag.recurrent:
        rnn = Table(title="Recurrent modules", title_justify="left", box=box.SIMPLE_HEAD)
        for column in RECURRENT_COLUMNS:
            rnn.add_column(column)
        for row in _recurrent_rows(diag):
            rnn.add_row(*row)
        yield rnn
    if diag.recommendations:
        yield Text("Recommendations", style="bold")
    for rec in diag.recommendations:
        layers = f"[{', '.join(rec.layers[:6])}{', ...' if len(rec.layers) > 6 else ''}] "
        yield Text.assemble(
            "  • ",
            (rec.code, "bold"),
            f": {rec.message} ",
            (layers if rec.layers else "", "dim"),
            (f"({rec.source})", "italic"),
        )
    for note in diag.notes:
        yield Text(f"note: {note}", style="dim")


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; }
td.text { text-align: left; }
tr.flagged { background: #fff6d6; }
.healthy { color: #17702b; } .vanishing { color: #9a6700; } .exploding { color: #b3261e; }
"""


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]], text_cols: set[int]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="text">{html.escape(c)}</td>'
            if i in text_cols
            else f"<td>{html.escape(c)}</td>"
            for i, c in enumerate(row)
        )
        flagged = ' class="flagged"' if row[-1] else ""
        body.append(f"<tr{flagged}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _figures(diag: Diagnosis) -> str:
    """The page's plots (gradient flow, saturation, Jacobian), when matplotlib is here."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "<p><i>Install matplotlib (the report extra) for the plots.</i></p>"
    from gradguard.report._diagnosis import figures_html

    return "<h2>Plots</h2>\n" + figures_html(diag.to_dict())


def _html_page(diag: Diagnosis) -> str:
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>gradguard diagnosis: {esc(diag.verdict)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f'<h1>gradguard diagnosis: <span class="{esc(diag.verdict)}">'
        f"{esc(diag.verdict)}</span></h1>",
        "<ul>" + "".join(f"<li>{esc(r)}</li>" for r in diag.reasons) + "</ul>",
        "<h2>Layers, in the order they run</h2>",
        _html_table(LAYER_COLUMNS, _layer_rows(diag), {1, 2, 5, 11}),
        f"<p>{esc(_jacobian_line(diag.jacobian))}</p>",
        _figures(diag),
    ]
    if diag.recurrent:
        parts += ["<h2>Recurrent modules</h2>"]
        parts += [_html_table(RECURRENT_COLUMNS, _recurrent_rows(diag), {0, 1, 5, 6})]
    if diag.recommendations:
        items = "".join(
            f"<li><b>{esc(r.code)}</b>: {esc(r.message)}"
            + (f" <i>[{esc(', '.join(r.layers))}]</i>" if r.layers else "")
            + f" <small>({esc(r.source)})</small></li>"
            for r in diag.recommendations
        )
        parts += ["<h2>Recommendations</h2>", f"<ul>{items}</ul>"]
    if diag.notes:
        parts += [
            "<h2>Notes</h2>",
            "<ul>" + "".join(f"<li>{esc(n)}</li>" for n in diag.notes) + "</ul>",
        ]
    parts += ["</body></html>", ""]
    return "\n".join(parts)


__all__ = [
    "RATIO",
    "SOURCES",
    "VERDICTS",
    "Diagnosis",
    "ForgetGate",
    "JacobianDiagnosis",
    "LayerDiagnosis",
    "Recommendation",
    "RecurrentDiagnosis",
    "diagnose",
    "forget_gate_stats",
    "largest_singular_value",
    "spectral_radii",
]
