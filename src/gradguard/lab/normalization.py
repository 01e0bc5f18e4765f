"""Experiment ``normalization``: BatchNorm and LayerNorm let sigmoid MLPs train.

Ioffe & Szegedy (2015) trained a 3 × 100 sigmoid MLP on MNIST with and without Batch
Normalization (sec. 4.1: the BN net reaches a higher test accuracy, and the inputs of its
sigmoids keep a stable distribution), and an Inception network with sigmoid activations:
with BN and 5× the learning rate it reached 69.8 % top-1, while without BN it stayed at
chance accuracy (sec. 4.2.2). They argue that BN stops the sigmoids from saturating and so
lets higher learning rates be used (sec. 3.3). Ba, Kiros & Hinton (2016) normalize over the
units of a layer instead of over the batch (LayerNorm) and report faster training than
without normalization.

Setup. Sigmoid MLPs 64 → 100 → … → 100 → 10 with PyTorch's default init (weights and
biases U(±1/√fan_in), Glorot's "standard" init), cross-entropy, plain SGD, batches of 60
from shuffled epochs (data seed ``1000 + seed``), 500 steps: the reference setup. Three
variants of each net: ``none``; ``batch``, a ``BatchNorm1d`` between every hidden Linear
and its sigmoid; ``layer``, a ``LayerNorm`` there instead. Three settings:

* depth 3 at LR 0.1, the paper's MNIST net (its width, its depth);
* depth 3 at LR 2.5, 25× higher: BN's "higher learning rates" (the paper went up to 30×);
* depth 10 at LR 0.5: the analog of sigmoid Inception, a net too deep for sigmoids.

Every step goes through a :class:`gradguard.Guard` with its default detectors and no clip
policy (it only measures: the optimizer steps exactly as without it), which records the
loss, the global gradient norm and every Linear layer's gradient norm. Step 1's norms are
those at initialization: their first-layer over last-layer ratio is Glorot & Bengio's
vanishing-gradient measure. Test accuracy and training loss are measured on the full
splits after training (BN in eval mode, running statistics).

LayerNorm at depth 10 is tabulated but judged by no claim (no paper makes one). We expected
it to rescue the deep net as BN does; it does not (see ``LN_NOTE``): it stays at chance and
its first layer's gradient at init is about 1e-4 of the last's.

The criteria come from the reference setup, fixed before the runs. Every claim held on each
of the seeds 0-8 (the full variant's 0-2 and six more); the smallest margins were BN at
depth 10 (test accuracy 0.906 against > 0.85) and LN at depth 3 (0.939 against > 0.9).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gradguard.guard import Guard
from gradguard.lab._figures import block_means, new_figure, positive_or_nan
from gradguard.lab._harness import LabExperiment
from gradguard.lab._records import BySeed, Claim, Criterion, Record, Table, cell
from gradguard.lab._training import (
    Recorder,
    digit_batches,
    digits_loss,
    evaluate_digits,
    train_loop,
)
from gradguard.lab.data import N_CLASSES, N_FEATURES

if TYPE_CHECKING:
    from matplotlib.figure import Figure

WIDTH = 100
BATCH_SIZE = 60
STEPS = 500
LOG_EVERY = 10

NORMS = ("none", "batch", "layer")
"""The variants of every net, in table order."""
NORM_LABELS = {"none": "no normalization", "batch": "BatchNorm", "layer": "LayerNorm"}


@dataclass(frozen=True)
class Setting:
    """One (depth, learning rate) pair, trained with every normalization."""

    key: str
    depth: int
    lr: float
    label: str


SETTINGS = (
    Setting("shallow", 3, 0.1, "depth 3, LR 0.1"),
    Setting("high-lr", 3, 2.5, "depth 3, LR 2.5 (25x)"),
    Setting("deep", 10, 0.5, "depth 10, LR 0.5"),
)
SETTING_BY_KEY: Mapping[str, Setting] = {s.key: s for s in SETTINGS}

LN_NOTE = (
    "LayerNorm normalizes each example over its units. A sigmoid's output has mean about "
    "0.5, so the next Linear adds the same offset pattern W·0.5 to every example; BN "
    "subtracts it (a per-unit batch mean), LN keeps it, and it dominates the per-example "
    "statistics LN divides by, shrinking the part that differs between examples layer "
    "after layer. At depth 10 LN nets stay at chance; at depth 3 they train."
)


def build_model(depth: int, norm: str, seed: int) -> nn.Sequential:
    """Return the sigmoid MLP with PyTorch's default init under ``seed`` (global RNG kept)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        fan_in = N_FEATURES
        for _ in range(depth):
            layers.append(nn.Linear(fan_in, WIDTH))
            if norm == "batch":
                layers.append(nn.BatchNorm1d(WIDTH))
            elif norm == "layer":
                layers.append(nn.LayerNorm(WIDTH))
            layers.append(nn.Sigmoid())
            fan_in = WIDTH
        layers.append(nn.Linear(fan_in, N_CLASSES))
        return nn.Sequential(*layers)


@dataclass(frozen=True)
class Run(Record):
    """One trained net: its outcome, its curves and its gradient flow."""

    setting: str
    """A key of :data:`SETTING_BY_KEY`."""
    norm: str
    """``none``, ``batch`` or ``layer``."""
    seed: int
    """Model seed (data seed ``1000 + seed``)."""
    depth: int
    lr: float
    test_accuracy: float
    """On the 360 test images after training."""
    train_loss: float
    """Cross-entropy on the 1,437 training images after training."""
    init_ratio: float
    """First Linear's gradient norm over the last's, at initialization."""
    linear_names: tuple[str, ...]
    """The Linear layers, input to output."""
    init_norms: tuple[float, ...]
    """Their gradient norms at initialization (step 1)."""
    loss: tuple[float, ...]
    grad_norm: tuple[float, ...]
    layer_steps: tuple[int, ...]
    """The steps of ``layer_norms`` (every :data:`LOG_EVERY` steps)."""
    layer_norms: tuple[tuple[float, ...], ...]
    events: tuple[dict[str, Any], ...]
    """The guard's detector events, as ``Event.to_dict()``."""

    def event_kinds(self) -> list[str]:
        """The distinct kinds of the guard's events, in order of first appearance."""
        return list(dict.fromkeys(str(e["kind"]) for e in self.events))


def train(setting: Setting, norm: str, seed: int) -> Run:
    """Train one net of ``setting`` with normalization ``norm`` and return its measurements."""
    model = build_model(setting.depth, norm, seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=setting.lr)
    recorder = Recorder()
    guard = Guard(model, optimizer, log_every=LOG_EVERY, sinks=[recorder])
    train_loop(model, optimizer, digit_batches(seed, BATCH_SIZE), digits_loss, STEPS, guard=guard)
    guard.close()
    accuracy, train_loss = evaluate_digits(model)
    linear_names = tuple(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    per_linear = recorder.layer_columns(linear_names)
    init_norms = per_linear[0]
    return Run(
        setting=setting.key,
        norm=norm,
        seed=seed,
        depth=setting.depth,
        lr=setting.lr,
        test_accuracy=accuracy,
        train_loss=train_loss,
        init_ratio=init_norms[0] / init_norms[-1] if init_norms[-1] > 0 else math.nan,
        linear_names=linear_names,
        init_norms=init_norms,
        loss=tuple(recorder.loss),
        grad_norm=tuple(recorder.grad_norm),
        layer_steps=tuple(range(1, STEPS + 1, LOG_EVERY)),
        layer_norms=tuple(per_linear[::LOG_EVERY]),
        events=recorder.event_dicts(),
    )


def _index(runs: Sequence[Run], seeds: tuple[int, ...]) -> BySeed[Run]:
    return BySeed(runs, seeds, key=lambda r: (r.setting, r.norm))


def claims(runs: Sequence[Run], seeds: tuple[int, ...]) -> tuple[Claim, ...]:
    """Judge the claims against the runs of every setting, normalization and seed."""
    r = _index(runs, seeds)

    def on(setting: str, norm: str, measure: str, field: str) -> dict[str, Any]:
        label = f"{SETTING_BY_KEY[setting].label}, {NORM_LABELS[norm]}"
        return {
            "measured_on": f"{label}, {len(seeds)} seed(s); {measure}",
            "values": tuple(getattr(x, field) for x in r.get(setting, norm)),
        }

    def accuracy(setting: str, norm: str) -> dict[str, Any]:
        return on(setting, norm, "test accuracy", "test_accuracy")

    def ratio(norm: str) -> dict[str, Any]:
        return on("deep", norm, "first / last Linear gradient norm at init", "init_ratio")

    ioffe = "Ioffe & Szegedy 2015"
    return (
        Claim(
            id="sigmoid-plateau-without-bn",
            source=ioffe,
            statement="Without normalization the shallow sigmoid MLP is still at chance "
            "after 500 steps at LR 0.1 (the plateau BN removes).",
            paper="baseline net trains more slowly (Fig. 1a; qualitative at this length)",
            **accuracy("shallow", "none"),
            criterion=Criterion(high=0.2),
        ),
        Claim(
            id="bn-lifts-sigmoid-plateau",
            source=ioffe,
            statement="With BatchNorm the same net at the same LR trains.",
            paper="MNIST 3 x 100 sigmoid: BN net more accurate, sigmoid inputs stable (Fig. 1)",
            **accuracy("shallow", "batch"),
            criterion=Criterion(low=0.9),
        ),
        Claim(
            id="ln-lifts-sigmoid-plateau",
            source="Ba, Kiros & Hinton 2016",
            statement="LayerNorm, which needs no batch statistics, also trains it.",
            paper="LN speeds up training compared with no normalization (qualitative)",
            **accuracy("shallow", "layer"),
            criterion=Criterion(low=0.9),
        ),
        Claim(
            id="bn-tolerates-high-lr",
            source=ioffe,
            statement="BN trains at a 25x higher learning rate.",
            paper="BN-x5 / BN-x30 Inception train at 5x / 30x the LR; 14x fewer steps",
            **accuracy("high-lr", "batch"),
            criterion=Criterion(low=0.9),
        ),
        Claim(
            id="deep-sigmoid-at-chance-without-bn",
            source=ioffe,
            statement="A sigmoid net too deep for sigmoids stays at chance without normalization.",
            paper="Inception with sigmoid, no BN: stays at chance accuracy",
            **accuracy("deep", "none"),
            criterion=Criterion(high=0.15),
        ),
        Claim(
            id="bn-trains-deep-sigmoid",
            source=ioffe,
            statement="With BatchNorm the deep sigmoid net trains.",
            paper="BN-x5-Sigmoid Inception: 69.8 % top-1",
            **accuracy("deep", "batch"),
            criterion=Criterion(low=0.85),
        ),
        Claim(
            id="deep-sigmoid-gradient-vanishes",
            source="Glorot & Bengio 2010",
            statement="At initialization the deep sigmoid net's gradient vanishes toward "
            "the input.",
            paper="back-propagated gradients shrink toward the input (qualitative)",
            **ratio("none"),
            criterion=Criterion(high=1e-3),
        ),
        Claim(
            id="bn-restores-gradient-flow",
            source=ioffe,
            statement="With BatchNorm the first layer's gradient is within a factor 100 "
            "of the last's.",
            paper="BN keeps sigmoids out of saturation and gradients from vanishing "
            "(sec. 3.3, qualitative)",
            **ratio("batch"),
            criterion=Criterion(low=1e-2, high=1e2),
        ),
    )


_NORM_COLORS = {"none": "#d62728", "batch": "#1f77b4", "layer": "#2ca02c"}


class NormalizationExperiment(LabExperiment):
    """The ``normalization`` experiment (Ioffe & Szegedy 2015; Ba et al. 2016)."""

    name = "normalization"
    title = "BatchNorm / LayerNorm let sigmoid MLPs train, also at high LR (Ioffe 2015)"
    references = (
        "Ioffe & Szegedy 2015, Batch Normalization: Accelerating Deep Network Training by "
        "Reducing Internal Covariate Shift (arXiv 1502.03167)",
        "Ba, Kiros & Hinton 2016, Layer Normalization (arXiv 1607.06450)",
        "Glorot & Bengio 2010, Understanding the difficulty of training deep feedforward "
        "neural networks (AISTATS)",
    )
    setting = (
        "Papers: a 3 x 100 sigmoid MLP on MNIST for 50,000 steps, sigmoid Inception on "
        f"ImageNet. Here: 3 x {WIDTH} and 10 x {WIDTH} sigmoid MLPs on 8x8 digits, "
        f"{STEPS} plain-SGD steps of {BATCH_SIZE} images."
    )
    record_type = Run

    def config(self, quick: bool) -> dict[str, Any]:
        """The same settings in both variants (quick runs one seed)."""
        return {
            "model": f"sigmoid MLP 64-{WIDTH}x depth-10, PyTorch default init",
            "norms": list(NORMS),
            "settings": [dataclasses.asdict(s) for s in SETTINGS],
            "optimizer": "SGD (no momentum)",
            "batch_size": BATCH_SIZE,
            "steps": STEPS,
            "guard": f"Guard(log_every={LOG_EVERY}, detectors='default', clip=None)",
            "layer_norms_every": LOG_EVERY,
        }

    def grid(self, quick: bool, seeds: tuple[int, ...]) -> list[Callable[[], Run]]:
        """One training per seed, setting and normalization."""
        return [partial(train, st, norm, s) for s in seeds for st in SETTINGS for norm in NORMS]

    def claims(self, records: Sequence[Run], seeds: tuple[int, ...]) -> tuple[Claim, ...]:
        """See :func:`claims`."""
        return claims(records, seeds)

    def tables(self, records: Sequence[Run], seeds: tuple[int, ...]) -> tuple[Table, ...]:
        """The outcome table (accuracy, loss, guard events) and the gradient-flow table."""
        r = _index(records, seeds)
        outcome, flow = [], []
        for setting in SETTINGS:
            for norm in NORMS:
                rs = r.get(setting.key, norm)
                head = (setting.label, NORM_LABELS[norm])
                kinds = ", ".join(sorted({k for x in rs for k in x.event_kinds()})) or "none"
                accuracy, loss = (
                    cell([x.test_accuracy for x in rs]),
                    cell([x.train_loss for x in rs]),
                )
                outcome.append((*head, accuracy, loss, kinds))
                ratio, final = cell([x.init_ratio for x in rs]), cell([x.grad_norm[-1] for x in rs])
                flow.append((*head, ratio, final))
        spread = "" if len(seeds) == 1 else f" (mean [min, max] over {len(seeds)} seeds)"
        return (
            Table(
                title="Test accuracy and training loss after 500 SGD steps" + spread,
                columns=("setting", "normalization", "test accuracy", "train loss", "guard events"),
                rows=tuple(outcome),
                note=f"Chance is 0.1. {LN_NOTE}",
            ),
            Table(
                title="Gradient flow: first / last Linear gradient norm at init" + spread,
                columns=("setting", "normalization", "ratio at init", "final gradient norm"),
                rows=tuple(flow),
                note="Step 1's norms, measured by the guard before the first update.",
            ),
        )

    def figure(self, records: Sequence[Run], data: Mapping[str, Any]) -> Figure:
        """Loss curves of every setting, gradient flow at init of the deep nets (first seed)."""
        first_seed = min(r.seed for r in records)
        chosen = {(r.setting, r.norm): r for r in records if r.seed == first_seed}
        fig, axes = new_figure(1, len(SETTINGS) + 1, figsize=(16, 3.8))
        for ax, setting in zip(axes, SETTINGS, strict=False):
            for norm in NORMS:
                run = chosen[(setting.key, norm)]
                smooth = block_means(run.loss)
                xs = [LOG_EVERY * (i + 0.5) for i in range(len(smooth))]
                label = f"{NORM_LABELS[norm]} (test acc {run.test_accuracy:.2f})"
                ax.plot(xs, smooth, color=_NORM_COLORS[norm], label=label)
            ax.set_title(setting.label, fontsize=10)
            ax.set(xlabel="SGD step", ylim=(0, None))
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        axes[0].set_ylabel("batch loss (mean of 10 steps)")
        flow = axes[-1]
        for norm in NORMS:
            norms = positive_or_nan(chosen[("deep", norm)].init_norms)
            flow.plot(range(1, len(norms) + 1), norms, marker=".", color=_NORM_COLORS[norm])
            flow.plot([], [], color=_NORM_COLORS[norm], label=NORM_LABELS[norm])
        flow.set(
            yscale="log", xlabel="Linear layer (input → output)", ylabel="gradient norm at init"
        )
        flow.set_title("depth 10: gradient flow at init", fontsize=10)
        flow.grid(True, which="major", alpha=0.3)
        flow.legend(fontsize=7)
        fig.suptitle(f"Sigmoid MLPs on digits with and without normalization (seed {first_seed})")
        fig.tight_layout()
        return fig


EXPERIMENT = NormalizationExperiment()
