"""Plain records shared downstream of the guard: StepReport, Window and Event.

Detectors, recovery and sinks read these and never import the guard, so the import
layering holds: stats -> clip -> guard; detect and recover read records; sinks read
records only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from gradguard.causes import CAUSES

if TYPE_CHECKING:  # the report reads records without torch: StepReport's tensors are types only
    from torch import Tensor

EventKind = Literal[
    "nonfinite",
    "overflow",
    "spike",
    "vanishing",
    "exploding",
    "divergence",
    "rollback",
    "cooldown",
    "snapshot_failed",
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
        accumulating: True for a micro-batch of a gradient accumulation that is not its
            last: nothing was measured or stepped (norms NaN, ``skipped`` False), ``step``
            is the optimizer step it accumulates into.
    """

    step: int
    grad_norm: Tensor
    clipped_norm: Tensor
    scale: Tensor
    skipped: Tensor
    finite: Tensor
    loss: Tensor | None
    accumulating: bool = False


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
    #: steps whose non-finite gradients were zeroed (``nonfinite="zero"``) and then taken;
    #: ``finite`` is False for them, as measured before the zeroing
    zeroed: BoolArray | None = None
    #: per-layer update ratio of the window's last step, ||w_after - w_before|| / ||w_before||
    #: (NaN for the layers not measured at this drain; None when nothing was measured)
    update_ratio: FloatArray | None = None
    #: the batch id given to ``guard.step(batch=...)`` for each step (None where none was)
    batch: tuple[Any, ...] | None = None
    #: per step, a summary of ``sample_losses`` (see :data:`SAMPLE_COLUMNS`; NaN rows where
    #: none was given)
    samples: FloatArray | None = None

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
                    **({"zeroed": True} if self.zeroed is not None and self.zeroed[i] else {}),
                }
            )
        return out


#: Columns of ``Window.samples``: the batch's median per-example loss, the median absolute
#: deviation, the number of non-finite losses, the batch size, then the ``SAMPLE_TOP``
#: largest losses and their positions in the batch.
SAMPLE_TOP = 4
SAMPLE_COLUMNS = (
    ("median", "mad", "nonfinite", "size")
    + tuple(f"top{i}" for i in range(SAMPLE_TOP))
    + tuple(f"position{i}" for i in range(SAMPLE_TOP))
)


def _json_float(value: float | np.floating[Any]) -> float | str:
    """A float for JSON, with non-finite values as the strings "nan", "inf", "-inf"."""
    number = float(value)
    return number if math.isfinite(number) else str(number)


@dataclass(frozen=True)
class Advice:
    """One concrete step to take, with the setting it changes.

    Attributes:
        action: what to change: ``clip``, ``lr``, ``group_lr``, ``epsilon``,
            ``scaler``, ``bf16``, ``init``, ``activation``, ``normalization``,
            ``inspect_batch``, ``skip_batch`` or ``rollback``.
        text: the step in a sentence, with its numbers.
        setting: the numbers, e.g. ``{"max_norm": 3.2}`` for a clip or
            ``{"lr": 0.002, "from": 0.02}`` for a learning rate.
    """

    action: str
    text: str
    setting: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"action": self.action, "text": self.text, "setting": dict(self.setting)}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | str) -> Advice:
        """Rebuild from :meth:`to_dict` output (a bare string is a step with no setting)."""
        if isinstance(data, str):
            return cls(action="", text=data)
        return cls(
            str(data.get("action", "")), str(data.get("text", "")), dict(data.get("setting", {}))
        )

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Event:
    """A decision with its reason: what was seen, why it happened and what to do.

    Attributes:
        step: the step at which the condition was seen (its onset for sustained ones, the
            first step for a streak); also ``first_step``.
        kind: ``nonfinite``, ``overflow``, ``spike``, ``vanishing``, ``exploding``,
            ``divergence``, ``rollback``, ``cooldown`` (the end of a rollback's LR
            cool-down) or ``snapshot_failed`` (a rollback snapshot could not be written).
        value: the measured value that triggered it (NaN when not numeric).
        threshold: the threshold it crossed (NaN when none applies).
        layers: names of the layers or tensors concerned (may be empty).
        message: one or two sentences naming the symptom.
        metric: what ``value`` measures, e.g. ``loss`` or ``grad_norm``.
        severity: ``info`` (worth a line in the log, needs no action: a clipped gradient
            spike with no effect on the loss, a loss scaler backing off), ``warning`` (the
            user should look: the run is being damaged or will not learn) or ``error``
            (training cannot go on as it is: divergence, a rollback that failed).
        cause: why, one of :data:`CAUSES` (set on every warning and error; may be empty
            on info events).
        evidence: the numbers behind the cause; ``evidence["summary"]`` says it in one
            sentence.
        advice: concrete steps, most effective first, with numbers from this run.
        count: how long the streak has lasted: consecutive events of the same kind and
            cause become one event. For the kinds raised per step (``nonfinite``,
            ``overflow``, ``spike``) it counts steps; for the others, the drains that
            raised the event again.
        last_step: the last step of the streak (``step`` for a single event).
        batch: the id passed as ``guard.step(batch=...)`` at ``step``, if any.
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
    cause: str = ""
    evidence: dict[str, Any] = field(default_factory=dict, compare=False)
    advice: tuple[Advice, ...] = field(default=(), compare=False)
    count: int = 1
    last_step: int | None = None
    batch: Any = field(default=None, compare=False)

    @property
    def needs_attention(self) -> bool:
        """True for warnings and errors: what the report, the console and exit codes count."""
        return self.severity != "info"

    @property
    def first_step(self) -> int:
        """The first step of the event's streak (its ``step``)."""
        return self.step

    @property
    def end_step(self) -> int:
        """The last step of the streak."""
        return self.step if self.last_step is None else self.last_step

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the ``events.jsonl`` row format)."""
        row: dict[str, Any] = {
            "step": self.step,
            "kind": self.kind,
            "severity": self.severity,
            "metric": self.metric,
            "value": _json_float(self.value),
            "threshold": _json_float(self.threshold),
            "layers": list(self.layers),
            "message": self.message,
            "count": self.count,
            "first_step": self.step,
            "last_step": self.end_step,
        }
        if self.cause:
            row["cause"] = self.cause
        if self.evidence:
            row["evidence"] = self.evidence
        if self.advice:
            row["advice"] = [a.to_dict() for a in self.advice]
        if self.batch is not None:
            row["batch"] = self.batch
        if self.extra:
            row["extra"] = self.extra
        return row

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Event:
        """Rebuild an event from :meth:`to_dict` output."""
        step = int(data["step"])
        last = data.get("last_step")
        return cls(
            step=step,
            kind=data["kind"],
            value=float(data["value"]),
            threshold=float(data["threshold"]),
            layers=tuple(data.get("layers", ())),
            message=data.get("message", ""),
            metric=data.get("metric", ""),
            extra=dict(data.get("extra", {})),
            severity=severity_of(data),
            cause=str(data.get("cause", "")),
            evidence=dict(data.get("evidence", {})),
            advice=tuple(Advice.from_dict(a) for a in data.get("advice", ())),
            count=int(data.get("count", 1)),
            last_step=None if last is None or int(last) == step else int(last),
            batch=data.get("batch"),
        )

    def __str__(self) -> str:
        where = f" in {', '.join(self.layers[:4])}" if self.layers else ""
        more = f" (+{len(self.layers) - 4} more)" if len(self.layers) > 4 else ""
        span = f" (x{self.count} to step {self.end_step})" if self.count > 1 else ""
        why = f" [cause: {CAUSES.get(self.cause, self.cause)}]" if self.cause else ""
        text = (
            f"step {self.step}{span}: {self.severity} {self.kind}{where}{more}{why}: {self.message}"
        )
        if self.advice:
            text += " Advice: " + " ".join(f"({i}) {a.text}" for i, a in enumerate(self.advice, 1))
        return text


def severity_of(data: dict[str, Any]) -> Severity:
    """The severity of an ``events.jsonl`` row.

    Rows written before severity existed read as warnings, except the end of a cool-down,
    which never needed action.
    """
    value = data.get("severity")
    if value in SEVERITIES:
        return value  # type: ignore[no-any-return]
    return "info" if data.get("kind") == "cooldown" else "warning"
