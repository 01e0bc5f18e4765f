"""Experiment ``optimizers-lr``: learning rates, adaptive optimizers, warm-up and clipping.

On a digits MLP: high-LR SGD blows up, Guard + NormClip rescues it, Adam, RMSprop and
AdaGrad train at their usual LRs, and warm-up tames a BN net's early spike (Goyal et al.
2017). See docs/lab/optimizers-lr.md for the setup, the papers' numbers and the criteria.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from gradguard.clip import NormClip
from gradguard.guard import Guard
from gradguard.lab._figures import block_means, new_figure, positive_or_nan
from gradguard.lab._harness import LabExperiment
from gradguard.lab._records import BySeed, Claim, Criterion, Table, TracedRun, format_value
from gradguard.lab._training import digit_batches, digits_loss, evaluate_digits, train_loop
from gradguard.lab.data import N_CLASSES, N_FEATURES
from gradguard.records import StepReport
from gradguard.stats import grad_stats

if TYPE_CHECKING:
    from matplotlib.figure import Figure

WIDTH = 128
DEPTH = 3
BATCH_SIZE = 64
STEPS = 600
USUAL_LR = 0.1
HIGH_LR = 2.0
CLIP = 1.0
BN_LR = 5.0
WARMUP = 100
SPIKE_STEPS = 50
LOG_EVERY = 10


@dataclass(frozen=True)
class ArmSpec:
    """How one arm trains."""

    name: str
    label: str
    optimizer: str
    lr: float
    batchnorm: bool = False
    guard: bool = False
    warmup: bool = False


ARMS = (
    ArmSpec("sgd", f"SGD, LR {USUAL_LR:g}", "sgd", USUAL_LR),
    ArmSpec("sgd-high", f"SGD, LR {HIGH_LR:g}", "sgd", HIGH_LR),
    ArmSpec(
        "sgd-high-clip",
        f"SGD, LR {HIGH_LR:g}, Guard + NormClip({CLIP:g})",
        "sgd",
        HIGH_LR,
        guard=True,
    ),
    ArmSpec("adam", "Adam, LR 1e-3", "adam", 1e-3),
    ArmSpec("rmsprop", "RMSprop, LR 1e-3", "rmsprop", 1e-3),
    ArmSpec("adagrad", "AdaGrad, LR 1e-2", "adagrad", 1e-2),
    ArmSpec("bn-constant", f"BN net, SGD, LR {BN_LR:g} constant", "sgd", BN_LR, batchnorm=True),
    ArmSpec(
        "bn-warmup",
        f"BN net, SGD, LR {BN_LR:g}, warm-up {WARMUP} + cosine",
        "sgd",
        BN_LR,
        batchnorm=True,
        warmup=True,
    ),
)
ARM_BY_NAME: Mapping[str, ArmSpec] = {a.name: a for a in ARMS}

OPTIMIZERS: Mapping[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
}


def build_model(batchnorm: bool, seed: int) -> nn.Sequential:
    """The ReLU MLP (BN before every ReLU if asked), default init under ``seed``; keeps the RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        fan_in = N_FEATURES
        for _ in range(DEPTH):
            layers.append(nn.Linear(fan_in, WIDTH))
            if batchnorm:
                layers.append(nn.BatchNorm1d(WIDTH))
            layers.append(nn.ReLU())
            fan_in = WIDTH
        layers.append(nn.Linear(fan_in, N_CLASSES))
        return nn.Sequential(*layers)


def warmup_cosine(step: int) -> float:
    """LR factor after ``step`` scheduler steps: linear warm-up, then cosine decay to 0.

    Example:
        >>> [round(warmup_cosine(s), 3) for s in (0, 99, 100, 350, 600)]
        [0.01, 1.0, 1.0, 0.5, 0.0]
    """
    if step < WARMUP:
        return (step + 1) / WARMUP
    progress = min(1.0, (step - WARMUP) / (STEPS - WARMUP))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Run(TracedRun):
    """One arm of one seed."""

    final_loss: float
    """Cross-entropy on the training split after training (NaN if lost)."""
    test_accuracy: float
    nonfinite_step: int | None
    """The first step whose loss or gradient was not finite (guarded: the last), or None."""
    early_peak: float
    """Largest batch loss of steps 1-50 over the loss of step 1."""
    transition_peak: float
    """Largest batch loss of steps 1-150 (warm-up, reaching the target LR, 50 more) / step 1."""
    clipped_fraction: float
    """Share of steps the clip policy scaled down (0 without one)."""
    lr: tuple[float, ...]


def train(arm: str, seed: int) -> Run:
    """Train one arm for :data:`STEPS` steps (an unguarded one stops when it goes non-finite)."""
    spec = ARM_BY_NAME[arm]
    model = build_model(spec.batchnorm, seed)
    optimizer = OPTIMIZERS[spec.optimizer](model.parameters(), lr=spec.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine) if spec.warmup else None
    guard = None
    if spec.guard:
        guard = Guard(
            model, optimizer, clip=NormClip(CLIP), scheduler=scheduler, log_every=LOG_EVERY
        )
    losses: list[float] = []
    norms: list[float] = []
    lrs: list[float] = []
    clipped = 0
    nonfinite_step = None

    def after(step: int, loss: Tensor, report: StepReport | None) -> bool:
        nonlocal clipped, nonfinite_step
        if report is not None:
            norm, finite = float(report.grad_norm), bool(report.finite)  # CPU: no device sync
            clipped += int(float(report.scale) < 1.0)
        else:  # the gradients are still those of this step
            stats = grad_stats(model)
            norm, finite = float(stats.total), bool(stats.finite)
        losses.append(loss.item())
        norms.append(norm)
        if not (finite and math.isfinite(losses[-1])):
            nonfinite_step = step
            return guard is None
        return False

    train_loop(
        model,
        optimizer,
        digit_batches(seed, BATCH_SIZE),
        digits_loss,
        STEPS,
        guard=guard,
        scheduler=scheduler,
        before_step=lambda _: lrs.append(float(optimizer.param_groups[0]["lr"])),
        after_step=after,
    )
    events: tuple[dict[str, Any], ...] = ()
    if guard is not None:
        guard.close()
        events = tuple(e.to_dict() for e in guard.events)
    accuracy, final_loss = evaluate_digits(model)
    head = [v if math.isfinite(v) else math.inf for v in losses[: WARMUP + SPIKE_STEPS]]
    return Run(
        arm=arm,
        seed=seed,
        final_loss=final_loss,
        test_accuracy=accuracy,
        nonfinite_step=nonfinite_step,
        early_peak=max(head[:SPIKE_STEPS]) / losses[0],
        transition_peak=max(head) / losses[0],
        clipped_fraction=clipped / len(losses),
        loss=tuple(losses),
        grad_norm=tuple(norms),
        lr=tuple(lrs),
        events=events,
    )


def _final(r: BySeed[Run], arm: str) -> tuple[float, ...]:
    return tuple(x.final_loss for x in r.get(arm))


def _lr_claims(r: BySeed[Run]) -> list[Claim]:
    n = f"{len(r.seeds)} seed(s), {STEPS} steps"
    usual, high = _final(r, "sgd"), _final(r, "sgd-high")
    lost = ", ".join(
        f"non-finite at step {x.nonfinite_step}"
        if x.nonfinite_step is not None
        else f"final loss {format_value(x.final_loss)}"
        for x in r.get("sgd-high")
    )
    return [
        Claim(
            id="sgd-usual-lr-converges",
            source="control",
            statement=f"Plain SGD at the usual LR {USUAL_LR:g} trains the MLP.",
            paper="(the control every claim below is read against)",
            measured_on=f"final train loss, SGD LR {USUAL_LR:g}, {n}",
            values=usual,
            criterion=Criterion(high=0.1),
        ),
        Claim(
            id="sgd-high-lr-blows-up",
            source="practitioners' guides",
            statement=f"Plain SGD at {HIGH_LR / USUAL_LR:g}x that LR blows up: its loss goes "
            "non-finite or ends at least 10x above the usual-LR run's.",
            paper="too-high LR: gradients grow exponentially, NaN/Inf, divergence (qualitative)",
            measured_on=f"LR {USUAL_LR:g} / LR {HIGH_LR:g} final train loss, {n} (non-finite "
            "counts as infinite: 0); pass: below 0.1",
            values=tuple(
                u / h if math.isfinite(h) else 0.0 for u, h in zip(usual, high, strict=True)
            ),
            criterion=Criterion(high=0.1),
            note=lost,
        ),
        Claim(
            id="guard-clip-rescues-high-lr",
            source="Pascanu et al. 2013; practitioners' guides",
            statement=f"The same run through Guard(clip=NormClip({CLIP:g})) trains.",
            paper="norm clipping keeps exploding gradients from derailing training "
            "(SGD-C, Fig. 7; qualitative here)",
            measured_on=f"final train loss, SGD LR {HIGH_LR:g} + Guard/NormClip({CLIP:g}), {n}",
            values=_final(r, "sgd-high-clip"),
            criterion=Criterion(high=0.1),
            note="clipped on "
            + ", ".join(f"{x.clipped_fraction:.0%}" for x in r.get("sgd-high-clip"))
            + " of steps",
        ),
    ]


_ADAPTIVE = {
    "adam": ("Kingma & Ba 2015", "Adam: default step size 0.001; trains MNIST MLPs"),
    "rmsprop": ("Tieleman & Hinton 2012", "RMSprop: divide the step by a running RMS"),
    "adagrad": ("Duchi, Hazan & Singer 2011", "AdaGrad: per-coordinate step sizes"),
}


def _warmup_claims(r: BySeed[Run]) -> list[Claim]:
    n = f"{len(r.seeds)} seed(s)"
    peak = f"largest batch loss of steps 1-{SPIKE_STEPS} / loss at step 1"
    warmed = r.get("bn-warmup")
    return [
        Claim(
            id="constant-high-lr-spikes-early",
            source="Goyal et al. 2017; practitioners' guides",
            statement=f"At a constant LR {BN_LR:g} the BN net's loss spikes to over twice its "
            "initial (chance) value in the first steps.",
            paper="large LR without warm-up: early optimization difficulty (qualitative)",
            measured_on=f"{peak}, BN net, constant LR {BN_LR:g}, {n}",
            values=tuple(x.early_peak for x in r.get("bn-constant")),
            criterion=Criterion(low=2.0),
        ),
        Claim(
            id="warmup-removes-early-spike",
            source="Goyal et al. 2017; practitioners' guides",
            statement=f"Warming up to the same LR over {WARMUP} steps keeps the loss below "
            "1.5x its initial value.",
            paper="gradual warm-up removes the early instability (qualitative)",
            measured_on=f"{peak}, BN net, warm-up + cosine to LR {BN_LR:g}, {n}",
            values=tuple(x.early_peak for x in warmed),
            criterion=Criterion(high=1.5),
        ),
        Claim(
            id="warmup-no-spike-at-transition",
            source="Goyal et al. 2017; practitioners' guides",
            statement=f"Through the whole warm-up, the step it reaches LR {BN_LR:g} and "
            f"{SPIKE_STEPS} steps more, the warmed-up loss stays below 1.5x its initial value.",
            paper="gradual warm-up avoids the spike an abrupt move to the large LR causes "
            "(Sec. 2.2; qualitative)",
            measured_on=f"largest batch loss of steps 1-{WARMUP + SPIKE_STEPS} / loss at step "
            f"1, BN net, warm-up + cosine to LR {BN_LR:g}, {n}",
            values=tuple(x.transition_peak for x in warmed),
            criterion=Criterion(high=1.5),
            note="steps 1-50 end halfway up the ramp (LR "
            f"{BN_LR * SPIKE_STEPS / WARMUP:g}), before the transition the paper's spike is about",
        ),
        Claim(
            id="warmup-decay-converges",
            source="Goyal et al. 2017; practitioners' guides",
            statement="The warmed-up, decayed run trains.",
            paper="warm-up matches the small-LR baseline's accuracy (qualitative here)",
            measured_on=f"final train loss, BN net, warm-up + cosine to LR {BN_LR:g}, {n}, "
            f"{STEPS} steps",
            values=_final(r, "bn-warmup"),
            criterion=Criterion(high=0.1),
        ),
    ]


def _cell(values: Sequence[float]) -> str:
    """Mean [min, max] of the finite values, with the count of the others ("+ 1 NaN")."""
    finite = [v for v in values if math.isfinite(v)]
    if len(values) == 1 or not finite:
        return ", ".join(format_value(v) for v in values)
    lost = len(values) - len(finite)
    low, high = format_value(min(finite)), format_value(max(finite))
    text = f"{format_value(statistics.fmean(finite))} [{low}, {high}]"
    return text + (f" + {lost} NaN" if lost else "")


class OptimizersLrExperiment(LabExperiment):
    """The ``optimizers-lr`` experiment (practitioners' guides)."""

    name = "optimizers-lr"
    title = "High-LR SGD blows up; adaptive optimizers, warm-up and clipping (seeds 001/2/4)"
    references = (
        "Kingma & Ba 2015, Adam: A Method for Stochastic Optimization (arXiv 1412.6980)",
        "Tieleman & Hinton 2012, Lecture 6.5 - RMSProp, COURSERA: Neural Networks for "
        "Machine Learning",
        "Duchi, Hazan & Singer 2011, Adaptive Subgradient Methods for Online Learning and "
        "Stochastic Optimization (JMLR 12)",
        "Goyal et al. 2017, Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour "
        "(arXiv 1706.02677)",
        "Pascanu, Mikolov & Bengio 2013, On the difficulty of training recurrent neural "
        "networks (arXiv 1211.5063)",
    )
    setting = (
        "Papers: ImageNet ResNet-50 at batch 8k (Goyal), RNNs (Pascanu), MNIST/CIFAR (Adam). "
        f"Here: a {DEPTH} x {WIDTH} ReLU MLP (and its BN version) on 8x8 digits, {STEPS} "
        f"steps of {BATCH_SIZE} images."
    )
    record_type = Run

    def config(self, quick: bool) -> dict[str, Any]:
        """The same for both variants."""
        return {
            "model": f"ReLU MLP 64-{WIDTH}x{DEPTH}-10, PyTorch default init",
            "arms": [asdict(a) for a in ARMS],
            "batch_size": BATCH_SIZE,
            "steps": STEPS,
            "clip": repr(NormClip(CLIP)),
            "warmup_steps": WARMUP,
            "schedule": "linear warm-up, then cosine decay to 0",
            "spike_window": SPIKE_STEPS,
            "guard": f"Guard(clip=NormClip({CLIP:g}), log_every={LOG_EVERY})",
        }

    def grid(self, quick: bool, seeds: tuple[int, ...]) -> list[Callable[[], Run]]:
        """Every arm of every seed (``train`` looked up at call time)."""
        return [partial(train, a.name, s) for s in seeds for a in ARMS]

    def claims(self, records: Sequence[Run], seeds: tuple[int, ...]) -> tuple[Claim, ...]:
        """The LR claims, the adaptive optimizers' and the warm-up claims."""
        r = BySeed(records, seeds, key=lambda x: (x.arm,))
        adaptive = [
            Claim(
                id=f"{arm}-converges",
                source=f"{source}; practitioners' guides",
                statement=f"{ARM_BY_NAME[arm].label.split(',')[0]} at its usual LR trains the MLP.",
                paper=paper + " (qualitative)",
                measured_on=f"final train loss, {ARM_BY_NAME[arm].label}, "
                f"{len(seeds)} seed(s), {STEPS} steps",
                values=_final(r, arm),
                criterion=Criterion(high=0.1),
            )
            for arm, (source, paper) in _ADAPTIVE.items()
        ]
        return (*_lr_claims(r), *adaptive, *_warmup_claims(r))

    def tables(self, records: Sequence[Run], seeds: tuple[int, ...]) -> tuple[Table, ...]:
        """One table, a row per arm."""
        r = BySeed(records, seeds, key=lambda x: (x.arm,))
        rows = []
        for spec in ARMS:
            rs = r.get(spec.name)
            lost = [str(x.nonfinite_step) for x in rs if x.nonfinite_step is not None]
            kinds = sorted({str(e["kind"]) for x in rs for e in x.events})
            rows.append(
                (
                    spec.label,
                    _cell([x.final_loss for x in rs]),
                    _cell([x.test_accuracy for x in rs]),
                    _cell([x.early_peak for x in rs]),
                    _cell([x.transition_peak for x in rs]),
                    _cell([max(x.grad_norm) for x in rs]),
                    ", ".join(lost) or "never",
                    ", ".join(kinds) or ("none" if spec.guard else "(no guard)"),
                )
            )
        spread = "" if len(seeds) == 1 else f" (mean [min, max] over {len(seeds)} seeds)"
        return (
            Table(
                title=f"After {STEPS} steps" + spread,
                columns=(
                    "arm",
                    "final train loss",
                    "test accuracy",
                    f"early peak (steps 1-{SPIKE_STEPS})",
                    f"peak, steps 1-{WARMUP + SPIKE_STEPS}",
                    "largest gradient norm",
                    "non-finite at step",
                    "guard events",
                ),
                rows=tuple(rows),
                note="An unguarded arm stops at its first non-finite loss or gradient and is "
                "evaluated as it is (NaN loss, chance accuracy). The early peak is the largest "
                "batch loss of the first steps over the first batch loss (inf: non-finite).",
            ),
        )

    def figure(self, records: Sequence[Run], data: Mapping[str, Any]) -> Figure:
        """Loss of every arm, gradient norms of the high-LR arms, the warm-up close-up (seed 1)."""
        first_seed = min(x.seed for x in records)
        chosen = {x.arm: x for x in records if x.seed == first_seed}
        fig, (curves, norms, warm) = new_figure(1, 3, figsize=(16, 4.2))
        for name in ("sgd", "sgd-high", "sgd-high-clip", "adam", "rmsprop", "adagrad"):
            run = chosen[name]
            smooth = block_means(run.loss)
            xs = [10 * (i + 0.5) for i in range(len(smooth))]
            curves.plot(xs, smooth, color=_COLORS[name], label=ARM_BY_NAME[name].label)
            if run.nonfinite_step is not None:
                curves.axvline(run.nonfinite_step, color=_COLORS[name], ls=":", lw=1)
        curves.set(yscale="log", xlabel="step", ylabel="batch loss (mean of 10 steps)")
        curves.set_title("MLP: loss (dotted: first non-finite step)", fontsize=10)
        for name in ("sgd", "sgd-high", "sgd-high-clip"):
            values = positive_or_nan(chosen[name].grad_norm)
            norms.plot(range(1, len(values) + 1), values, color=_COLORS[name], lw=0.7)
            norms.plot([], [], color=_COLORS[name], label=ARM_BY_NAME[name].label)
        norms.axhline(CLIP, color="#1f77b4", ls="--", lw=0.8, label=f"clip threshold {CLIP:g}")
        norms.set(yscale="log", xlabel="step", ylabel="global gradient norm (before clipping)")
        norms.set_title("MLP: gradient norm", fontsize=10)
        for ax in (curves, norms):
            ax.grid(True, which="major", alpha=0.3)
            ax.legend(fontsize=7)
        span = 2 * WARMUP
        for name in ("bn-constant", "bn-warmup"):
            warm.plot(range(1, span + 1), chosen[name].loss[:span], color=_COLORS[name], lw=0.8)
            warm.plot([], [], color=_COLORS[name], label=ARM_BY_NAME[name].label)
        warm.axhline(chosen["bn-constant"].loss[0], color="#7f7f7f", ls=":", lw=0.8)
        warm.set(xlabel="step", ylabel="batch loss")
        warm.set_title(f"BN net at LR {BN_LR:g}: the first {span} steps", fontsize=10)
        warm.grid(True, alpha=0.3)
        lr_axis = warm.twinx()
        lr = chosen["bn-warmup"].lr[:span]
        lr_axis.plot(range(1, span + 1), lr, color="#1f77b4", ls="--", lw=0.8)
        lr_axis.set_ylabel("warm-up LR (dashed)")
        warm.legend(fontsize=7, loc="upper right")
        fig.suptitle(
            f"Learning rates, optimizers, warm-up and clipping on digits (seed {first_seed})"
        )
        fig.tight_layout()
        return fig


_COLORS = {
    "sgd": "#7f7f7f",
    "sgd-high": "#d62728",
    "sgd-high-clip": "#1f77b4",
    "adam": "#2ca02c",
    "rmsprop": "#9467bd",
    "adagrad": "#8c564b",
    "bn-constant": "#d62728",
    "bn-warmup": "#1f77b4",
}

EXPERIMENT = OptimizersLrExperiment()
claims = EXPERIMENT.claims
