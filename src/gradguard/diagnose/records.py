"""What a diagnosis reports: plain, frozen records of measurements, verdict and remedies.

:class:`Diagnosis` renders itself as text or an HTML page through
:mod:`gradguard.report._diagnosis` and as rich tables through
:mod:`gradguard.diagnose.console`, imported when it is first printed or saved (the
report reads ``Diagnosis.to_dict()``; it never imports torch nor this package).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradguard.diagnose.thresholds import (
    DEAD_FRACTION,
    RATIO,
    SATURATED_FRACTION,
    SATURATION_DERIVATIVE,
)

if TYPE_CHECKING:
    from rich.console import Console, ConsoleOptions, RenderResult


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
        from gradguard.report._diagnosis import render_page

        return render_page(self.to_dict())

    def save_html(self, path: str | Path) -> Path:
        """Write :meth:`to_html` to ``path`` (UTF-8) and return the path.

        Written to a temporary file and renamed: a failed write (a full disk) leaves any
        previous page whole and no partial file behind.
        """
        from gradguard.report._diagnosis import save_page

        return save_page(self.to_dict(), Path(path))

    def __str__(self) -> str:
        from gradguard.report._diagnosis import render_text

        return render_text(self.to_dict())

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        """Render as rich tables (rich calls this when the diagnosis is printed)."""
        from gradguard.diagnose.console import render_rich

        yield from render_rich(self.to_dict(), options.max_width)


def _json_ready(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return value
