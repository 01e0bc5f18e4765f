"""Plain records shared downstream of the guard: StepReport, Window and Event.

Detectors, recovery and sinks read these and never import the guard, so the import
layering holds: stats -> clip -> guard; detect and recover read records; sinks read
records only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from torch import Tensor

EventKind = Literal[
    "nonfinite", "overflow", "spike", "vanishing", "exploding", "divergence", "rollback", "cooldown"
]

Severity = Literal["info", "warning", "error"]
SEVERITIES: tuple[Severity, ...] = ("info", "warning", "error")

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, eq=False)
class StepReport:
    """What one ``guard.step`` did, as device tensors: reading one is the caller's sync.

    Attributes:
        step: the index of this step (1 for the first).
        grad_norm: global gradient norm before clipping (fp32).
        clipped_norm: global norm after clipping (fp32).
        scale: the clip scale in [0, 1] (1 when no policy is set).
        skipped: bool, the optimizer step was skipped (non-finite gradients).
        finite: bool, every gradient element was finite.
        loss: the loss passed to ``guard.step``, detached, or None.
    """

    step: int
    grad_norm: Tensor
    clipped_norm: Tensor
    scale: Tensor
    skipped: Tensor
    finite: Tensor
    loss: Tensor | None


@dataclass(frozen=True, eq=False)
class Window:
    """The steps buffered since the last drain, copied to the host in one transfer.

    Every array has one entry (row) per step, in step order. ``loss`` is NaN where no
    loss was given (``loss_given`` False).
    """

    steps: IntArray
    loss: FloatArray
    loss_given: BoolArray
    grad_norm: FloatArray
    clipped_norm: FloatArray
    scale: FloatArray
    skipped: BoolArray
    finite: BoolArray
    overflow: BoolArray
    lr: FloatArray
    per_layer: FloatArray  # [steps, layers]
    per_tensor: FloatArray  # [steps, tensors]
    layer_names: tuple[str, ...]
    tensor_names: tuple[str, ...]
    #: per-layer L2 norm of the parameters at the drain (None when not measured, e.g.
    #: parameters sharded across ranks)
    weight_norm: FloatArray | None = None
    #: the same at the previous drain (at the guard's construction for the first one)
    weight_norm_before: FloatArray | None = None
    #: the guard steps through a ``GradScaler``: non-finite gradients are its normal work
    loss_scaled: bool = False

    def __len__(self) -> int:
        return int(self.steps.shape[0])

    @property
    def clipped(self) -> BoolArray:
        """Steps where the policy shrank the gradient."""
        return self.scale < 1.0

    def rows(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per step (the ``metrics.jsonl`` row format)."""
        out = []
        for i in range(len(self)):
            out.append(
                {
                    "step": int(self.steps[i]),
                    "loss": _json_float(self.loss[i]) if self.loss_given[i] else None,
                    "grad_norm": _json_float(self.grad_norm[i]),
                    "clipped_norm": _json_float(self.clipped_norm[i]),
                    "scale": _json_float(self.scale[i]),
                    "skipped": bool(self.skipped[i]),
                    "finite": bool(self.finite[i]),
                    "overflow": bool(self.overflow[i]),
                    "lr": _json_float(self.lr[i]),
                }
            )
        return out


def _json_float(value: float | np.floating[Any]) -> float | str:
    """A float for JSON, with non-finite values as the strings "nan", "inf", "-inf"."""
    number = float(value)
    return number if math.isfinite(number) else str(number)


@dataclass(frozen=True)
class Event:
    """A decision with its reason: what was seen, against which threshold, and what to do.

    Attributes:
        step: the step at which the condition was seen (its onset for sustained ones).
        kind: ``nonfinite``, ``overflow``, ``spike``, ``vanishing``, ``exploding``,
            ``divergence``, ``rollback`` or ``cooldown`` (the end of a rollback's LR
            cool-down).
        value: the measured value that triggered it (NaN when not numeric).
        threshold: the threshold it crossed (NaN when none applies).
        layers: names of the layers or tensors concerned (may be empty).
        message: one or two sentences naming the symptom and the likely fix.
        metric: what ``value`` measures, e.g. ``loss`` or ``grad_norm``.
        severity: ``info`` (worth a line in the log, needs no action: a clipped gradient
            spike with no effect on the loss, a loss scaler backing off), ``warning`` (the
            user should look: the run is being damaged or will not learn) or ``error``
            (training cannot go on as it is: divergence, a rollback that failed).
    """

    step: int
    kind: EventKind
    value: float
    threshold: float
    layers: tuple[str, ...] = ()
    message: str = ""
    metric: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    severity: Severity = "warning"

    @property
    def needs_attention(self) -> bool:
        """True for warnings and errors: what the report, the console and exit codes count."""
        return self.severity != "info"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the ``events.jsonl`` row format)."""
        return {
            "step": self.step,
            "kind": self.kind,
            "severity": self.severity,
            "metric": self.metric,
            "value": _json_float(self.value),
            "threshold": _json_float(self.threshold),
            "layers": list(self.layers),
            "message": self.message,
            **({"extra": self.extra} if self.extra else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Event:
        """Rebuild an event from :meth:`to_dict` output."""
        return cls(
            step=int(data["step"]),
            kind=data["kind"],
            value=float(data["value"]),
            threshold=float(data["threshold"]),
            layers=tuple(data.get("layers", ())),
            message=data.get("message", ""),
            metric=data.get("metric", ""),
            extra=dict(data.get("extra", {})),
            severity=severity_of(data),
        )

    def __str__(self) -> str:
        where = f" in {', '.join(self.layers[:4])}" if self.layers else ""
        more = f" (+{len(self.layers) - 4} more)" if len(self.layers) > 4 else ""
        return f"step {self.step}: {self.severity} {self.kind}{where}{more}: {self.message}"


def severity_of(data: dict[str, Any]) -> Severity:
    """The severity of an ``events.jsonl`` row.

    Rows written before severity existed read as warnings, except the end of a cool-down,
    which never needed action.
    """
    value = data.get("severity")
    if value in SEVERITIES:
        return value  # type: ignore[no-any-return]
    return "info" if data.get("kind") == "cooldown" else "warning"
