"""What the explainer reads: its thresholds, the facts of the run, a window's numbers.

The thresholds every rule is judged by, :class:`RunFacts` and :class:`LayerScale` (what
the guard tells the explainer about the model and its training setup), one step of a
window as plain numbers, and the small readers of a window's columns the rules share.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradguard.records import SAMPLE_COLUMNS, SAMPLE_TOP, Window

#: An update ratio (||step|| / ||weights||) around this is the usual healthy pace.
TARGET_UPDATE_RATIO = 1e-3
#: A layer whose update ratio passes this is being rewritten, not trained.
HIGH_UPDATE_RATIO = 3e-2
#: A learning rate at least this many times its earlier median was raised.
LR_JUMP = 1.5
#: A per-example loss this many robust deviations above the batch median stands out.
OUTLIER_SIGMA = 6.0
#: A batch whose median loss is this many times the run's typical median is bad as a whole.
BATCH_LEVEL = 5.0
#: Weight scale (std times sqrt(fan-in)) outside [LOW_GAIN, HIGH_GAIN] is a wrong init scale.
LOW_GAIN, HIGH_GAIN = 0.35, 2.5
#: A loss this many times its recent healthy level has not recovered from an episode.
HURT = 1.5
#: A cause stays with the episode for this many steps: a NaN after a blow-up is its end.
INHERIT_STEPS = 50

_SAMPLE = {name: i for i, name in enumerate(SAMPLE_COLUMNS)}
_NOUNS = {"exploding": "explosion", "nonfinite": "NaN/Inf", "vanishing": "vanishing gradient"}
_HISTORY = 2048


@dataclass(frozen=True)
class LayerScale:
    """The scale of a layer's weight matrix: ``std * sqrt(fan_in)`` is its gain."""

    std: float
    fan_in: int
    activation: str | None = None  # the activation after the layer, when known

    @property
    def gain(self) -> float:
        """The standard deviation times the square root of the fan-in."""
        return self.std * math.sqrt(self.fan_in)


@dataclass(frozen=True)
class RunFacts:
    """What the explainer knows about the training setup (filled by the guard).

    Attributes:
        clip_max_norm: the fixed global-norm clip threshold in use, if any.
        clipping: any clip policy is in use.
        scaler: a ``GradScaler`` is in use.
        recovery: a recovery strategy (``Rollback``) is in use.
        low_precision: ``"float16"`` or ``"bfloat16"`` when the parameters are stored so.
        saturating: saturating activation modules found in the model (``Sigmoid``, ...).
        rectified: the model has ReLU modules (units that can die).
        normalized: the model has normalization layers.
        group_lr: the learning rate of each layer's param group (depth order).
        layer_scale: reads a layer's weight scale when needed (events are rare).
    """

    clip_max_norm: float | None = None
    clipping: bool = False
    scaler: bool = False
    recovery: bool = False
    low_precision: str | None = None
    saturating: tuple[str, ...] = ()
    rectified: bool = False
    normalized: bool = False
    group_lr: Callable[[], Sequence[float]] | None = None
    layer_scale: Callable[[str], LayerScale | None] = field(default=lambda _name: None)


def _sig(value: float) -> float:
    """Two significant figures (what a user would type)."""
    if not math.isfinite(value) or value == 0:
        return value
    return float(f"{value:.2g}")


def jsonable(value: Any) -> Any:
    """A JSON-ready copy of a batch id: tensors and arrays become lists, others ``repr``."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    tolist = getattr(value, "tolist", None)
    if callable(tolist):  # torch tensors, numpy arrays and scalars
        return jsonable(tolist())
    return repr(value)


@dataclass
class _Row:
    """One step of a window, as plain numbers."""

    step: int
    loss: float
    grad_norm: float
    lr: float
    loss_given: bool
    finite: bool
    overflow: bool
    skipped: bool
    per_layer: np.ndarray[Any, Any]


def _listed_or_none(values: np.ndarray[Any, Any] | None) -> list[float] | None:
    return None if values is None else [float(v) for v in values]


def _short(value: Any, width: int = 60) -> str:
    """A batch id for a sentence: its JSON, cut to ``width`` characters with its length."""
    text = json.dumps(value)
    if len(text) <= width:
        return text
    if not isinstance(value, list):
        return text[: width - 3] + "..."
    cut = max(text.rfind(",", 0, width - 5), 1)  # whole ids only
    return f"{text[:cut]}, ...] ({len(value)} ids)"


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _listed(names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _first_last(window: Window, names: Sequence[str]) -> tuple[float, float]:
    medians = np.nanmedian(np.where(np.isfinite(window.per_layer), window.per_layer, np.nan), 0)
    return float(medians[0]), float(medians[-1])


def _sample_row(window: Window, step: int) -> np.ndarray[Any, Any] | None:
    """The sample-loss summary of ``step``, if its losses were given."""
    if window.samples is None:
        return None
    hits = np.flatnonzero(window.steps == step)
    if not hits.size:
        return None
    row = window.samples[int(hits[0])]
    return None if not np.isfinite(row[_SAMPLE["size"]]) else row


def _top_is(samples: np.ndarray[Any, Any], value: float) -> bool:
    tops = samples[_SAMPLE["top0"] : _SAMPLE["top0"] + SAMPLE_TOP]
    return bool(np.any(tops == value))


def _outliers(samples: np.ndarray[Any, Any]) -> list[tuple[int, float]]:
    """(position, loss) of the top losses that stand out: non-finite, or far above the rest."""
    median, mad = float(samples[_SAMPLE["median"]]), float(samples[_SAMPLE["mad"]])
    size = int(samples[_SAMPLE["size"]])
    spread = max(1.4826 * mad, 1e-3 * abs(median), 1e-12) if math.isfinite(mad) else math.inf
    found = []
    for k in range(min(SAMPLE_TOP, size)):
        loss = float(samples[_SAMPLE["top0"] + k])
        position = int(samples[_SAMPLE["position0"] + k])
        far = (
            math.isfinite(loss) and (loss - median) / spread >= OUTLIER_SIGMA and loss > 2 * median
        )
        if not math.isfinite(loss) or far:
            found.append((position, loss))
    return found
