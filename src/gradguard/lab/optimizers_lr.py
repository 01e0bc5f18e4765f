"""Experiment ``optimizers-lr``: learning rates, adaptive optimizers, warm-up and clipping.

Practitioners' guides make four claims about the learning rate and
exploding gradients: plain SGD at a too-high learning rate blows up; adaptive optimizers
(Adam, RMSprop, AdaGrad) at their usual learning rates train stably; an LR schedule with
warm-up and decay removes the instability at the start of training; gradient clipping
stabilizes a run that would otherwise explode. Behind them are Kingma & Ba (2015, Adam),
Tieleman & Hinton (2012, RMSprop), Duchi, Hazan & Singer (2011, AdaGrad), Goyal et al.
(2017, gradual warm-up for large learning rates) and Pascanu, Mikolov & Bengio (2013,
norm clipping). This experiment measures each on the bundled digits.

Setup. A ReLU MLP 64 → 128 → 128 → 128 → 10 with PyTorch's default init, cross-entropy,
batches of 64 from shuffled epochs (data seed ``1000 + seed``), 600 steps. Arms:

* ``sgd``: plain SGD at LR 0.1, the usual value (the control);
* ``sgd-high``: plain SGD at LR 2.0 (20x), an ordinary loop without a guard, stopped at its
  first non-finite loss;
* ``sgd-high-clip``: the same LR through ``gradguard.Guard(clip=NormClip(1.0))`` (default
  detectors), Pascanu et al.'s global-norm clipping at threshold 1, about the largest
  gradient norm of the LR-0.1 run;
* ``adam`` (LR 1e-3, the paper's default), ``rmsprop`` (LR 1e-3, the common default of
  Keras and TensorFlow), ``adagrad`` (LR 1e-2, PyTorch's default), everything else at
  PyTorch's defaults.

The warm-up claim is measured on the same MLP with a ``BatchNorm1d`` before every ReLU,
plain SGD at LR 5.0: Goyal et al.'s setting is a BN network at a large LR. A BN net's
loss does not depend on the scale of its normalized weights, so its effective LR is LR /
||w||²; a too-large first step spikes the loss, grows ||w|| and the net recovers by itself.
Pilot runs chose this setting (seeds 100-108, not the lab's): at LR 2.0 the BN net's
spike is too small to tell from noise on some seeds, and the BN net never goes
non-finite, so it cannot stand in for the plain MLP. Two arms:

* ``bn-constant``: LR 5.0 from the first step;
* ``bn-warmup``: linear warm-up from LR 5/100 to 5.0 over the first 100 steps (about
  4.5 epochs, Goyal et al. warm up for 5), then cosine decay to 0 at step 600.

The early spike is the largest batch loss of steps 1-50 over the loss of step 1 (about
ln 10 = 2.3, chance, for every net here). Per step the batch loss and the global gradient
norm (``gradguard.grad_stats`` for the unguarded arms, the guard's report otherwise) are
kept; the final loss is the cross-entropy on the whole training split after training
(BN in eval mode).

The criteria were fixed before the lab's seeds were run: converged means a final loss
below 0.1 (chance is 2.3), a spike is a peak above 2x the initial loss, no spike below
1.5x. On seeds 0-8 every claim held on every seed but one: the warm-up spike claim fails
on seeds 0 and 4, whose warmed-up runs still spike to 1.68x and 1.67x at steps 47 and 34
(LR 2.35 and 1.70) while the constant-LR runs spike to 2.4-6.7x at step 2-4. Warm-up
shrinks the early spike (it moves it later and makes it smaller) but does not always
remove it here: the claim is reported as not reproduced.

Revised (2026-12-05). The spikes of the warmed-up run are chaotic in the last bits of the
arithmetic: on another machine (same code, torch, seeds) seed 0 peaks at 1.04x, not 1.68x,
and the default seeds pass; seed 4 gives 1.67x on both. Steps 1-50 also end halfway up the
ramp (LR 2.5), before the move to the full LR that Goyal et al.'s spike is about (Sec. 2.2).
Added, criterion fixed before held-out seeds were run: ``warmup-no-spike-at-transition``,
the largest batch loss of steps 1-150 below 1.5x the first. The setup is unchanged (pilots
on seeds 0-2 over target LRs 2.5-5, 100-300 warm-up steps and momentum found no setting
without sporadic spikes). Old / new claim: seeds 0-2 pass 3/3 / 3/3; held-out seeds 10-15
6/6 / 5/6 (seed 14: 2.47x); seeds 20-25 6/6 / 5/6 (seed 24: 1.95x).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradguard.clip import NormClip
from gradguard.guard import Guard
from gradguard.lab._harness import data_generator, seeds_for, single_thread
from gradguard.lab._records import (
    Claim,
    Criterion,
    ExperimentResult,
    Progress,
    Table,
    format_value,
)
from gradguard.lab.data import N_CLASSES, N_FEATURES, N_TRAIN, load_digits
from gradguard.stats import grad_stats

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
FULL_SEEDS = 3


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
    """Return the ReLU MLP (with BN before every ReLU if asked), default init under ``seed``.

    The global RNG is forked, so building leaves it as it was.
    """
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


def batches(seed: int) -> Iterator[Tensor]:
    """Yield index batches of the training split, shuffled epoch after epoch (seed 1000+s)."""
    generator = data_generator(seed)
    while True:
        order = torch.randperm(N_TRAIN, generator=generator)
        for start in range(0, N_TRAIN - BATCH_SIZE + 1, BATCH_SIZE):
            yield order[start : start + BATCH_SIZE]


@dataclass(frozen=True)
class Run:
    """One arm of one seed.

    Attributes:
        arm: a name in :data:`ARM_BY_NAME`.
        seed: model seed (data seed ``1000 + seed``).
        final_loss: cross-entropy on the training split after training (NaN if lost).
        test_accuracy: on the test split after training.
        nonfinite_step: the first step whose loss or gradient was not finite, or None.
        early_peak: largest batch loss of steps 1-50 over the loss of step 1.
        transition_peak: largest batch loss of steps 1-150 (the warm-up, the step it reaches
            the target LR and 50 more) over the loss of step 1.
        clipped_fraction: share of steps the clip policy scaled down (0 without one).
        loss: the batch loss of every step taken.
        grad_norm: the global gradient norm of every step taken (before clipping).
        lr: the learning rate of every step taken.
        events: the guard's events, as ``Event.to_dict()`` (none for unguarded arms).
    """

    arm: str
    seed: int
    final_loss: float
    test_accuracy: float
    nonfinite_step: int | None
    early_peak: float
    transition_peak: float
    clipped_fraction: float
    loss: tuple[float, ...]
    grad_norm: tuple[float, ...]
    lr: tuple[float, ...]
    events: tuple[dict[str, Any], ...]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dictionary."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Run:
        """Rebuild a run from :meth:`to_dict` output (non-finite numbers may be text)."""
        fields = dict(record)
        for key in (
            "final_loss",
            "test_accuracy",
            "early_peak",
            "transition_peak",
            "clipped_fraction",
        ):
            fields[key] = float(fields[key])
        for key in ("loss", "grad_norm", "lr"):
            fields[key] = tuple(float(v) for v in fields[key])
        fields["events"] = tuple(dict(e) for e in fields["events"])
        return cls(**fields)


def _evaluate(model: nn.Module) -> tuple[float, float]:
    """Return (training loss, test accuracy) with the model in eval mode."""
    digits = load_digits()
    model.eval()
    with torch.no_grad():
        loss = float(nn.functional.cross_entropy(model(digits.x_train), digits.y_train))
        accuracy = float((model(digits.x_test).argmax(dim=1) == digits.y_test).float().mean())
    model.train()
    return loss, accuracy


def train(arm: str, seed: int) -> Run:
    """Train one arm for :data:`STEPS` steps (an unguarded one stops when it goes non-finite)."""
    spec = ARM_BY_NAME[arm]
    digits = load_digits()
    model = build_model(spec.batchnorm, seed)
    optimizer = OPTIMIZERS[spec.optimizer](model.parameters(), lr=spec.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine) if spec.warmup else None
    guard = (
        Guard(model, optimizer, clip=NormClip(CLIP), log_every=LOG_EVERY) if spec.guard else None
    )
    stream = batches(seed)
    losses: list[float] = []
    norms: list[float] = []
    lrs: list[float] = []
    clipped = 0
    nonfinite_step = None
    for step in range(1, STEPS + 1):
        index = next(stream)
        lrs.append(float(optimizer.param_groups[0]["lr"]))
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(digits.x_train[index]), digits.y_train[index])
        loss.backward()  # type: ignore[no-untyped-call]
        if guard is not None:
            report = guard.step(loss)
            norm, finite = float(report.grad_norm), bool(report.finite)  # CPU: no device sync
            clipped += int(float(report.scale) < 1.0)
        else:
            stats = grad_stats(model)
            norm, finite = float(stats.total), bool(stats.finite)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
        losses.append(loss.item())
        norms.append(norm)
        if not (finite and math.isfinite(losses[-1])):
            nonfinite_step = step
            if guard is None:
                break
    events: tuple[dict[str, Any], ...] = ()
    if guard is not None:
        guard.close()
        events = tuple(e.to_dict() for e in guard.events)
    final_loss, accuracy = _evaluate(model)
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


class _Runs:
    """The runs of one experiment, indexed by (arm, seed)."""

    def __init__(self, runs: Sequence[Run], seeds: tuple[int, ...]) -> None:
        self.by_key = {(r.arm, r.seed): r for r in runs}
        self.seeds = seeds

    def get(self, arm: str) -> list[Run]:
        """Return the runs of ``arm``, one per seed."""
        return [self.by_key[(arm, s)] for s in self.seeds]

    def final(self, arm: str) -> tuple[float, ...]:
        """Return the final training loss of ``arm`` for every seed."""
        return tuple(r.final_loss for r in self.get(arm))


def _blown_up_value(usual: float, high: float) -> float:
    """Return usual-LR / high-LR final loss; a non-finite high-LR loss counts as infinite."""
    return usual / high if math.isfinite(high) else 0.0


def _lr_claims(r: _Runs) -> list[Claim]:
    n = f"{len(r.seeds)} seed(s), {STEPS} steps"
    usual, high = r.final("sgd"), r.final("sgd-high")
    lost = ", ".join(
        f"non-finite at step {x.nonfinite_step}"
        if x.nonfinite_step is not None
        else f"final loss {format_value(x.final_loss)}"
        for x in r.get("sgd-high")
    )
    converge = Criterion(high=0.1)
    return [
        Claim(
            id="sgd-usual-lr-converges",
            source="control",
            statement=f"Plain SGD at the usual LR {USUAL_LR:g} trains the MLP.",
            paper="(the control every claim below is read against)",
            measured_on=f"final train loss, SGD LR {USUAL_LR:g}, {n}",
            values=usual,
            criterion=converge,
        ),
        Claim(
            id="sgd-high-lr-blows-up",
            source="practitioners' guides",
            statement=f"Plain SGD at {HIGH_LR / USUAL_LR:g}x that LR blows up: its loss goes "
            "non-finite or ends at least 10x above the usual-LR run's.",
            paper="too-high LR: gradients grow exponentially, NaN/Inf, divergence (qualitative)",
            measured_on=f"LR {USUAL_LR:g} / LR {HIGH_LR:g} final train loss, {n} (non-finite "
            "counts as infinite: 0); pass: below 0.1",
            values=tuple(_blown_up_value(u, h) for u, h in zip(usual, high, strict=True)),
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
            values=r.final("sgd-high-clip"),
            criterion=converge,
            note="clipped on "
            + ", ".join(f"{x.clipped_fraction:.0%}" for x in r.get("sgd-high-clip"))
            + " of steps",
        ),
    ]


def _adaptive_claims(r: _Runs) -> list[Claim]:
    n = f"{len(r.seeds)} seed(s), {STEPS} steps"
    sources = {
        "adam": ("Kingma & Ba 2015", "Adam: default step size 0.001; trains MNIST MLPs"),
        "rmsprop": ("Tieleman & Hinton 2012", "RMSprop: divide the step by a running RMS"),
        "adagrad": ("Duchi, Hazan & Singer 2011", "AdaGrad: per-coordinate step sizes"),
    }
    return [
        Claim(
            id=f"{arm}-converges",
            source=f"{source}; practitioners' guides",
            statement=f"{ARM_BY_NAME[arm].label.split(',')[0]} at its usual LR trains the MLP.",
            paper=paper + " (qualitative)",
            measured_on=f"final train loss, {ARM_BY_NAME[arm].label}, {n}",
            values=r.final(arm),
            criterion=Criterion(high=0.1),
        )
        for arm, (source, paper) in sources.items()
    ]


def _warmup_claims(r: _Runs) -> list[Claim]:
    n = f"{len(r.seeds)} seed(s)"
    peak = f"largest batch loss of steps 1-{SPIKE_STEPS} / loss at step 1"
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
            values=tuple(x.early_peak for x in r.get("bn-warmup")),
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
            values=tuple(x.transition_peak for x in r.get("bn-warmup")),
            criterion=Criterion(high=1.5),
            note="added after the first version: steps 1-50 end halfway up the ramp (LR "
            f"{BN_LR * SPIKE_STEPS / WARMUP:g}), before the transition the paper's spike is about",
        ),
        Claim(
            id="warmup-decay-converges",
            source="Goyal et al. 2017; practitioners' guides",
            statement="The warmed-up, decayed run trains.",
            paper="warm-up matches the small-LR baseline's accuracy (qualitative here)",
            measured_on=f"final train loss, BN net, warm-up + cosine to LR {BN_LR:g}, {n}, "
            f"{STEPS} steps",
            values=r.final("bn-warmup"),
            criterion=Criterion(high=0.1),
        ),
    ]


def claims(runs: Sequence[Run], seeds: tuple[int, ...]) -> tuple[Claim, ...]:
    """Judge the claims against the runs of every arm and seed."""
    r = _Runs(runs, seeds)
    return (*_lr_claims(r), *_adaptive_claims(r), *_warmup_claims(r))


def _cell(values: Sequence[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if len(values) == 1 or not finite:
        return ", ".join(format_value(v) for v in values)
    lost = len(values) - len(finite)
    low, high = format_value(min(finite)), format_value(max(finite))
    text = f"{format_value(statistics.fmean(finite))} [{low}, {high}]"
    return text + (f" + {lost} NaN" if lost else "")


def tables(runs: Sequence[Run], seeds: tuple[int, ...]) -> tuple[Table, ...]:
    """Return one table, a row per arm."""
    r = _Runs(runs, seeds)
    spread = "" if len(seeds) == 1 else f" (mean [min, max] over {len(seeds)} seeds)"
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


class OptimizersLrExperiment:
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

    def run(self, *, quick: bool, seed: int, progress: Progress | None = None) -> ExperimentResult:
        """Train every arm; quick uses 1 seed, full :data:`FULL_SEEDS` seeds."""
        seeds = seeds_for(seed, quick=quick, n_full=FULL_SEEDS)
        grid = [(spec.name, s) for s in seeds for spec in ARMS]
        runs: list[Run] = []
        start = time.perf_counter()
        with single_thread():
            for done, (arm, s) in enumerate(grid, start=1):
                runs.append(train(arm, s))
                if progress is not None:
                    progress(done, len(grid))
        return ExperimentResult(
            name=self.name,
            title=self.title,
            references=self.references,
            setting=self.setting,
            config={
                "model": f"ReLU MLP 64-{WIDTH}x{DEPTH}-10, PyTorch default init",
                "arms": [asdict(a) for a in ARMS],
                "batch_size": BATCH_SIZE,
                "steps": STEPS,
                "clip": repr(NormClip(CLIP)),
                "warmup_steps": WARMUP,
                "schedule": "linear warm-up, then cosine decay to 0",
                "spike_window": SPIKE_STEPS,
                "guard": f"Guard(clip=NormClip({CLIP:g}), log_every={LOG_EVERY})",
            },
            seeds=seeds,
            claims=claims(runs, seeds),
            tables=tables(runs, seeds),
            measurements=tuple(r.to_dict() for r in runs),
            duration_s=time.perf_counter() - start,
        )


EXPERIMENT = OptimizersLrExperiment()

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


def _smooth(values: Sequence[float], width: int = 10) -> list[float]:
    """Mean over consecutive blocks of ``width`` steps (NaN where a block has none)."""
    out = []
    for i in range(0, len(values), width):
        block = [v for v in values[i : i + width] if math.isfinite(v)]
        out.append(statistics.fmean(block) if block else math.nan)
    return out


def plot(experiment_data: Mapping[str, Any], out_dir: Path) -> Path:
    """Loss curves of every arm, gradient norms of the high-LR arms, the warm-up close-up.

    Drawn from the ``results.json`` data alone (first seed).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [Run.from_dict(m) for m in experiment_data["measurements"]]
    first_seed = min(r.seed for r in rows)
    chosen = {r.arm: r for r in rows if r.seed == first_seed}
    fig, (curves, norms, warm) = plt.subplots(1, 3, figsize=(16, 4.2))
    for name in ("sgd", "sgd-high", "sgd-high-clip", "adam", "rmsprop", "adagrad"):
        run = chosen[name]
        smooth = _smooth(run.loss)
        xs = [10 * (i + 0.5) for i in range(len(smooth))]
        curves.plot(xs, smooth, color=_COLORS[name], label=ARM_BY_NAME[name].label)
        if run.nonfinite_step is not None:
            curves.axvline(run.nonfinite_step, color=_COLORS[name], ls=":", lw=1)
    curves.set_yscale("log")
    curves.set_xlabel("step")
    curves.set_ylabel("batch loss (mean of 10 steps)")
    curves.set_title("MLP: loss (dotted: first non-finite step)", fontsize=10)
    curves.grid(True, which="major", alpha=0.3)
    curves.legend(fontsize=7)
    for name in ("sgd", "sgd-high", "sgd-high-clip"):
        run = chosen[name]
        values = [v if math.isfinite(v) and v > 0 else math.nan for v in run.grad_norm]
        norms.plot(range(1, len(values) + 1), values, color=_COLORS[name], lw=0.7)
        norms.plot([], [], color=_COLORS[name], label=ARM_BY_NAME[name].label)
    norms.axhline(CLIP, color="#1f77b4", ls="--", lw=0.8, label=f"clip threshold {CLIP:g}")
    norms.set_yscale("log")
    norms.set_xlabel("step")
    norms.set_ylabel("global gradient norm (before clipping)")
    norms.set_title("MLP: gradient norm", fontsize=10)
    norms.grid(True, which="major", alpha=0.3)
    norms.legend(fontsize=7)
    span = 2 * WARMUP
    for name in ("bn-constant", "bn-warmup"):
        run = chosen[name]
        warm.plot(range(1, span + 1), run.loss[:span], color=_COLORS[name], lw=0.8)
        warm.plot([], [], color=_COLORS[name], label=ARM_BY_NAME[name].label)
    warm.axhline(chosen["bn-constant"].loss[0], color="#7f7f7f", ls=":", lw=0.8)
    warm.set_xlabel("step")
    warm.set_ylabel("batch loss")
    warm.set_title(f"BN net at LR {BN_LR:g}: the first {span} steps", fontsize=10)
    warm.grid(True, alpha=0.3)
    lr_axis = warm.twinx()
    lr_axis.plot(
        range(1, span + 1), chosen["bn-warmup"].lr[:span], color="#1f77b4", ls="--", lw=0.8
    )
    lr_axis.set_ylabel("warm-up LR (dashed)")
    warm.legend(fontsize=7, loc="upper right")
    fig.suptitle(f"Learning rates, optimizers, warm-up and clipping on digits (seed {first_seed})")
    fig.tight_layout()
    path = out_dir / "optimizers-lr.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
