"""Remedies for what the diagnosis measured, less those the model already has.

Each rule reads the :class:`Context` (the verdict, its signals, the layers, the model
itself) and returns its recommendations, with their sources in :data:`SOURCES`; the
clipping threshold (:func:`suggested_clip`) is derived from the measured gradients.
"""

from __future__ import annotations

import decimal
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from gradguard._activations import LINEAR, NORM_LAYERS, WEIGHT_LAYERS, Activation, activation_of
from gradguard.diagnose.records import LayerDiagnosis, Recommendation, RecurrentDiagnosis
from gradguard.diagnose.structure import Structure
from gradguard.diagnose.thresholds import CLIP_FRACTION, INIT_TOLERANCE, SATURATION_DERIVATIVE
from gradguard.diagnose.verdict import Signal
from gradguard.init import expected_std
from gradguard.stats import ROOT_LAYER

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

_NAN = float("nan")


@dataclass(frozen=True)
class Context:
    """What the rules read: the model, the verdict and its signals, the measurements.

    Attributes:
        model: the model diagnosed (read only).
        verdict: ``"healthy"``, ``"vanishing"`` or ``"exploding"``.
        signals: the measurements beyond the band, of either kind.
        layers: the layers, in run order.
        recurrent: the RNN/LSTM/GRU modules.
        followers: the activation after each weight layer, by name.
        clip: the clipping threshold suggested, and its basis.
        grad_norm: the global gradient norm measured.
        structure: the skip connections and normalization the autograd graph shows.
    """

    model: nn.Module
    verdict: str
    signals: tuple[Signal, ...]
    layers: tuple[LayerDiagnosis, ...]
    recurrent: tuple[RecurrentDiagnosis, ...]
    followers: Mapping[str, Activation]
    clip: Clip
    grad_norm: float
    structure: Structure

    @property
    def sources(self) -> set[str]:
        """Where the signals come from: ``depth``, ``jacobian``, ``time``, ``nonfinite``."""
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
        """The Linear/Conv layers of the model, by name, in registration order."""
        return [
            (name, module)
            for name, module in self.model.named_modules()
            if isinstance(module, WEIGHT_LAYERS)
        ]


@dataclass(frozen=True)
class _OffScale:
    """A weight layer whose std is off the std its activation's scheme gives."""

    layer: str
    ratio: float  # actual std / expected std
    scheme: str


def _mis_initialized(ctx: Context) -> list[_OffScale]:
    """The weight layers off their activation's scheme by more than INIT_TOLERANCE."""
    found = []
    for name, module in ctx.weight_layers:
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() < 2 or weight.numel() < 2:
            continue
        act = ctx.followers.get(name, LINEAR)
        expected = expected_std(weight, act.scheme, act)
        ratio = float(weight.detach().double().std()) / expected
        if not 1 / INIT_TOLERANCE <= ratio <= INIT_TOLERANCE:
            found.append(_OffScale(name, ratio, act.scheme))
    return found


def _rec_init(ctx: Context) -> list[Recommendation]:
    wrong = _mis_initialized(ctx)
    if not wrong or ctx.verdict == "healthy" or not ctx.feedforward:
        return []
    first = wrong[0]
    return [
        Recommendation(
            "init",
            "Initialize each layer for the activation that follows it (He/Kaiming for the "
            "ReLU family, Xavier/Glorot for tanh, sigmoid or none, LeCun for SELU): "
            "gradguard.init.initialize(model, 'auto'). "
            f"{len(wrong)} weight layers are off that scale, e.g. {first.layer!r} at "
            f"{first.ratio:.2g} times the {first.scheme} std; every layer then multiplies the "
            "gradient by a factor away from 1.",
            tuple(w.layer for w in wrong),
            SOURCES["init"],
        )
    ]


_SIGMOID_LIKE = {"sigmoid", "hardsigmoid", "logsigmoid"}


def _rec_activation(ctx: Context) -> list[Recommendation]:
    """Sigmoids: no init rescues a deep stack (slope <= 1/4). Tanh: only once init is right."""
    kinds = {
        layer.name: act.kind
        for layer in ctx.layers
        if (act := activation_of(_module(ctx.model, layer.name))) is not None
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


def _has_normalization(ctx: Context) -> bool:
    """A norm layer of torch or a custom one (``LlamaRMSNorm``), or a norm operator that ran."""
    return ctx.structure.norm or any(
        isinstance(module, NORM_LAYERS)
        or (
            type(module).__name__.endswith(("Norm", "Normalization"))
            and not type(module).__name__.startswith("_")  # _WeightNorm: a parametrization
        )
        for module in ctx.model.modules()
    )


def _rec_structure(ctx: Context) -> list[Recommendation]:
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


def _rec_exploding(ctx: Context) -> list[Recommendation]:
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


def _rec_recurrent(ctx: Context) -> list[Recommendation]:
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


def _feeding(ctx: Context, layers: Sequence[LayerDiagnosis]) -> list[tuple[str, nn.Module]]:
    """The weight layer that runs last before each of ``layers`` (the one feeding it)."""
    found: dict[str, nn.Module] = {}
    for layer in layers:
        before = [
            (other.name, module)
            for other in ctx.layers[: layer.index]
            if isinstance(module := _module(ctx.model, other.name), WEIGHT_LAYERS)
        ]
        if before:
            found.setdefault(*before[-1])
    return list(found.items())


def _input_std(ctx: Context) -> float | None:
    """The std of the model's input, from the first layer's output std over its gain."""
    for layer in ctx.layers:
        if layer.gain is not None and layer.gain > 0 and layer.activation_std is not None:
            return layer.activation_std / layer.gain
    return None


def _rec_dead(ctx: Context, dead: Sequence[LayerDiagnosis]) -> Recommendation:
    """Remedies for dead ReLUs, less those the model already has (He init, zero biases)."""
    feeding = _feeding(ctx, dead)
    wrong = {w.layer for w in _mis_initialized(ctx)}
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


def _rec_saturation(ctx: Context, saturated: Sequence[LayerDiagnosis]) -> Recommendation:
    """Remedies for saturated units, less those the model already has (unit inputs, Xavier)."""
    feeding = _feeding(ctx, saturated)
    wrong = {w.layer for w in _mis_initialized(ctx)}
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


def _rec_units(ctx: Context) -> list[Recommendation]:
    dead = [layer for layer in ctx.layers if "dead" in layer.flags]
    saturated = [layer for layer in ctx.layers if "saturated" in layer.flags]
    return ([_rec_dead(ctx, dead)] if dead else []) + (
        [_rec_saturation(ctx, saturated)] if saturated else []
    )


def recommend(ctx: Context) -> tuple[Recommendation, ...]:
    """Every rule's recommendations, most relevant first; dead and saturated units last."""
    rules = (_rec_init, _rec_activation, _rec_structure, _rec_recurrent, _rec_exploding)
    recs = [rec for rule in rules for rec in rule(ctx)]
    return tuple(recs + _rec_units(ctx))


@dataclass(frozen=True)
class Clip:
    """A global-norm clipping threshold (None: no fixed value fits) and, in words, its basis."""

    value: float | None
    basis: str


@dataclass(frozen=True)
class TypicalNorm:
    """The global norm the batch would have if every layer's gradient were typical."""

    value: float  # √L times the median layer gradient norm
    layers: int  # L: the layers with a finite nonzero gradient norm


def typical_norm(param_norms: Mapping[str, float]) -> TypicalNorm | None:
    """√L times the median layer gradient norm, over the finite nonzero layer norms."""
    norms = sorted(v for v in param_norms.values() if math.isfinite(v) and v > 0)
    if not norms:
        return None
    mid = len(norms) // 2
    median = norms[mid] if len(norms) % 2 else (norms[mid - 1] + norms[mid]) / 2
    return TypicalNorm(math.sqrt(len(norms)) * median, len(norms))


_AMPLIFICATION = {
    "depth": "the amplification from the last layer's output to the first's",
    "time": "the amplification from the last time step to the first",
    "jacobian": "the input-output Jacobian's rms singular value",
}


def suggested_clip(
    typical: TypicalNorm | None, grad_norm: float, signals: Sequence[Signal]
) -> Clip:
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
        return Clip(None, "the measured norms overflow (inf/NaN)")
    if grad_norm <= 0:
        return Clip(None, "the measured gradient is zero")
    bounds = [(CLIP_FRACTION * grad_norm, f"{CLIP_FRACTION:g} times the global norm")]
    if typical is not None:
        bounds.append(
            (
                typical.value,
                f"√L times the median layer gradient norm, L = {typical.layers} layers: "
                "the global norm if every layer were typical",
            )
        )
    ratios = [s for s in exploding if s.source in ("depth", "time")] or [
        s for s in exploding if s.source == "jacobian"
    ]
    if ratios:
        worst = max(ratios, key=lambda s: s.factor)
        if not math.isfinite(worst.factor):
            return Clip(None, "the measured amplification overflows (inf/NaN)")
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
        return Clip(None, "the measured norms are out of range")
    return Clip(rounded, basis)


_TWO_FIGURES_DOWN = decimal.Context(prec=2, rounding=decimal.ROUND_DOWN)
"""Rounds to 2 significant figures toward zero: a rounded bound stays below the bound."""
