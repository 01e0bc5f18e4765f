"""The verdict: flags per layer and per time axis, the signals, and what they add up to.

One number decides all three signals, :data:`~gradguard.diagnose.RATIO`: the first layer's
output gradient over the last one's (depth), the Jacobian's root mean squared singular
value, and the gradient reaching the first input step over the last (time). Any
exploding signal makes the verdict "exploding", otherwise any vanishing one makes it
"vanishing"; a non-finite activation, loss or gradient is "exploding".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from gradguard.diagnose.records import JacobianDiagnosis, LayerDiagnosis, RecurrentDiagnosis
from gradguard.diagnose.thresholds import DEAD_FRACTION, RATIO, SATURATED_FRACTION

_NAN = float("nan")


def layer_flags(
    relative: float | None, *, saturated: float | None, dead: float | None, nonfinite: float
) -> tuple[str, ...]:
    """A layer's flags from its relative gradient and its units' measurements."""
    flags = []
    if relative is not None and (relative < 1 / RATIO):
        flags.append("vanishing")
    if relative is not None and (relative > RATIO or not math.isfinite(relative)):
        flags.append("exploding")
    if (saturated or 0.0) > SATURATED_FRACTION:
        flags.append("saturated")
    if (dead or 0.0) > DEAD_FRACTION:
        flags.append("dead")
    if nonfinite > 0:
        flags.append("nonfinite")
    return tuple(flags)


def time_flags(decay: float, *, steps: int) -> tuple[str, ...]:
    """``vanishing`` or ``exploding`` through time, from first-over-last-step gradient decay."""
    if steps > 1 and decay < 1 / RATIO:
        return ("vanishing",)
    if steps > 1 and (decay > RATIO or not math.isfinite(decay)):
        return ("exploding",)
    return ()


@dataclass(frozen=True)
class Signal:
    """One measurement beyond the band: what it says, where from, in words, by how much."""

    kind: str  # "vanishing" | "exploding"
    source: str  # "nonfinite" | "depth" | "jacobian" | "time"
    reason: str
    factor: float = _NAN  # the measured ratio behind it (nan for "nonfinite")


def _nonfinite_signals(
    layers: Sequence[LayerDiagnosis], loss: float | None, grad_norm: float | None
) -> list[Signal]:
    signals = []
    overflowed = [layer.name for layer in layers if "nonfinite" in layer.flags]
    if overflowed:
        signals.append(
            Signal("exploding", "nonfinite", f"activations are inf/NaN from {overflowed[0]!r} on")
        )
    if loss is not None and not math.isfinite(loss):
        signals.append(Signal("exploding", "nonfinite", f"the loss is {loss}"))
    if grad_norm is not None and not math.isfinite(grad_norm):
        signals.append(Signal("exploding", "nonfinite", f"the gradient norm is {grad_norm}"))
    return signals


def _owners(layers: Sequence[LayerDiagnosis]) -> list[LayerDiagnosis]:
    """The layers with parameters and a relative gradient, in run order."""
    return [layer for layer in layers if layer.parameters and layer.relative_grad is not None]


def gradient_ratio(layers: Sequence[LayerDiagnosis]) -> float | None:
    """The first over the last parametrized layer's output gradient (None with fewer)."""
    owners = _owners(layers)
    return owners[0].relative_grad if len(owners) > 1 else None


def _depth_signal(layers: Sequence[LayerDiagnosis]) -> Signal | None:
    owners = _owners(layers)
    if len(owners) < 2:
        return None
    first, last = owners[0], owners[-1]
    ratio = first.relative_grad if first.relative_grad is not None else _NAN
    if 1 / RATIO <= ratio <= RATIO:
        return None
    kind = "vanishing" if ratio < 1 / RATIO else "exploding"
    flagged = [layer.name for layer in layers if kind in layer.flags][:3]
    return Signal(
        kind,
        "depth",
        f"the gradient at the output of the first layer, {first.name!r} ({first.kind}), is "
        f"{ratio:.2g} times the gradient at the last, {last.name!r} ({last.kind}); beyond the "
        f"band [1/{RATIO:g}, {RATIO:g}]; {kind} layers include {', '.join(flagged)}",
        ratio,
    )


def _jacobian_signal(jac: JacobianDiagnosis | None) -> Signal | None:
    if jac is None:
        return None
    rms = jac.rms_singular_value
    if 1 / RATIO <= rms <= RATIO:
        return None
    kind = "vanishing" if rms < 1 / RATIO else "exploding"
    return Signal(
        kind,
        "jacobian",
        f"the input-output Jacobian's root mean squared singular value is {rms:.2g} "
        f"(largest {jac.top_singular_values[0]:.2g}); isometry is 1, the band "
        f"[1/{RATIO:g}, {RATIO:g}]",
        rms,
    )


def _time_signals(recurrent: Sequence[RecurrentDiagnosis]) -> list[Signal]:
    signals = []
    for rnn in recurrent:
        for kind in rnn.flags:
            signals.append(
                Signal(
                    kind,
                    "time",
                    f"in {rnn.name!r} ({rnn.kind}) the gradient reaching the first of "
                    f"{rnn.steps} steps is {rnn.decay:.2g} times the gradient reaching the "
                    f"last (band [1/{RATIO:g}, {RATIO:g}])",
                    rnn.decay if rnn.decay is not None else _NAN,
                )
            )
    return signals


def signals_of(
    layers: Sequence[LayerDiagnosis],
    jac: JacobianDiagnosis | None,
    recurrent: Sequence[RecurrentDiagnosis],
    *,
    loss: float | None,
    grad_norm: float | None,
) -> list[Signal]:
    """Every signal: non-finite values, then depth, the Jacobian, and time."""
    signals = _nonfinite_signals(layers, loss, grad_norm)
    signals += [s for s in (_depth_signal(layers), _jacobian_signal(jac)) if s is not None]
    return signals + _time_signals(recurrent)


def verdict_of(signals: Sequence[Signal]) -> str:
    """Any exploding signal makes "exploding", else any vanishing one "vanishing"."""
    kinds = {s.kind for s in signals}
    if "exploding" in kinds:
        return "exploding"
    return "vanishing" if "vanishing" in kinds else "healthy"


def reasons_for(
    verdict: str,
    signals: Sequence[Signal],
    *,
    ratio: float | None,
    jac: JacobianDiagnosis | None,
    recurrent: Sequence[RecurrentDiagnosis],
) -> tuple[str, ...]:
    """The reasons of the signals behind ``verdict``; for "healthy", what was measured."""
    reasons = tuple(s.reason for s in signals if s.kind == verdict)
    return reasons or (_healthy_reason(ratio, jac, recurrent),)


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
