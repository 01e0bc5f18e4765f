"""Experiment ``normalization``: BatchNorm and LayerNorm let sigmoid MLPs train.

Sigmoid MLPs at chance without normalization train with BatchNorm, also at a 25x higher
LR and at depth 10 (Ioffe & Szegedy 2015; Ba et al. 2016). See docs/lab/normalization.md
for the setup, the papers' numbers and the criteria.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gradguard.lab._figures import block_means, finish, new_figure, positive_or_nan
from gradguard.lab._harness import LabExperiment
from gradguard.lab._records import BySeed, Claim, Criterion, Table, cell
from gradguard.lab._training import GuardedRun, first_over_last, train_guarded
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
class Run(GuardedRun):
    """One trained net: its outcome, its curves and its gradient flow (Linear layers)."""

    setting: str
    """A key of :data:`SETTING_BY_KEY`."""
    norm: str
    """``none``, ``batch`` or ``layer``."""
    depth: int
    lr: float
    linear_names: tuple[str, ...]
    """The Linear layers, input to output."""
    init_norms: tuple[float, ...]
    """Their gradient norms at initialization (step 1)."""
    layer_steps: tuple[int, ...]
    """The steps of ``layer_norms`` (every :data:`LOG_EVERY` steps)."""
    layer_norms: tuple[tuple[float, ...], ...]

    def event_kinds(self) -> list[str]:
        """The distinct kinds of the guard's events, in order of first appearance."""
        return list(dict.fromkeys(str(e["kind"]) for e in self.events))


def train(setting: Setting, norm: str, seed: int) -> Run:
    """Train one net of ``setting`` with normalization ``norm`` and return its measurements."""
    model = build_model(setting.depth, norm, seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=setting.lr)
    recorder, accuracy, train_loss = train_guarded(
        model, optimizer, seed, batch_size=BATCH_SIZE, steps=STEPS, log_every=LOG_EVERY
    )
    linear_names = tuple(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    per_linear = recorder.layer_columns(linear_names)
    return Run(
        setting=setting.key,
        norm=norm,
        seed=seed,
        depth=setting.depth,
        lr=setting.lr,
        test_accuracy=accuracy,
        train_loss=train_loss,
        init_ratio=first_over_last(per_linear[0]),
        linear_names=linear_names,
        init_norms=per_linear[0],
        loss=tuple(recorder.loss),
        grad_norm=tuple(recorder.grad_norm),
        layer_steps=tuple(range(1, STEPS + 1, LOG_EVERY)),
        layer_norms=tuple(per_linear[::LOG_EVERY]),
        events=recorder.event_dicts(),
    )


def _index(runs: Sequence[Run], seeds: tuple[int, ...]) -> BySeed[Run]:
    return BySeed(runs, seeds, key=lambda r: (r.setting, r.norm))


_IOFFE = "Ioffe & Szegedy 2015"
_ACCURACY = ("test accuracy", "test_accuracy")
_RATIO = ("first / last Linear gradient norm at init", "init_ratio")
_CLAIMS = (
    (
        "sigmoid-plateau-without-bn",
        _IOFFE,
        "Without normalization the shallow sigmoid MLP is still at chance "
        "after 500 steps at LR 0.1 (the plateau BN removes).",
        "baseline net trains more slowly (Fig. 1a; qualitative at this length)",
        ("shallow", "none", _ACCURACY),
        Criterion(high=0.2),
    ),
    (
        "bn-lifts-sigmoid-plateau",
        _IOFFE,
        "With BatchNorm the same net at the same LR trains.",
        "MNIST 3 x 100 sigmoid: BN net more accurate, sigmoid inputs stable (Fig. 1)",
        ("shallow", "batch", _ACCURACY),
        Criterion(low=0.9),
    ),
    (
        "ln-lifts-sigmoid-plateau",
        "Ba, Kiros & Hinton 2016",
        "LayerNorm, which needs no batch statistics, also trains it.",
        "LN speeds up training compared with no normalization (qualitative)",
        ("shallow", "layer", _ACCURACY),
        Criterion(low=0.9),
    ),
    (
        "bn-tolerates-high-lr",
        _IOFFE,
        "BN trains at a 25x higher learning rate.",
        "BN-x5 / BN-x30 Inception train at 5x / 30x the LR; 14x fewer steps",
        ("high-lr", "batch", _ACCURACY),
        Criterion(low=0.9),
    ),
    (
        "deep-sigmoid-at-chance-without-bn",
        _IOFFE,
        "A sigmoid net too deep for sigmoids stays at chance without normalization.",
        "Inception with sigmoid, no BN: stays at chance accuracy",
        ("deep", "none", _ACCURACY),
        Criterion(high=0.15),
    ),
    (
        "bn-trains-deep-sigmoid",
        _IOFFE,
        "With BatchNorm the deep sigmoid net trains.",
        "BN-x5-Sigmoid Inception: 69.8 % top-1",
        ("deep", "batch", _ACCURACY),
        Criterion(low=0.85),
    ),
    (
        "deep-sigmoid-gradient-vanishes",
        "Glorot & Bengio 2010",
        "At initialization the deep sigmoid net's gradient vanishes toward the input.",
        "back-propagated gradients shrink toward the input (qualitative)",
        ("deep", "none", _RATIO),
        Criterion(high=1e-3),
    ),
    (
        "bn-restores-gradient-flow",
        _IOFFE,
        "With BatchNorm the first layer's gradient is within a factor 100 of the last's.",
        "BN keeps sigmoids out of saturation and gradients from vanishing (sec. 3.3, qualitative)",
        ("deep", "batch", _RATIO),
        Criterion(low=1e-2, high=1e2),
    ),
)
"""id, source, statement, paper, (setting, norm, (measure, field)), criterion of every claim."""


def claims(runs: Sequence[Run], seeds: tuple[int, ...]) -> tuple[Claim, ...]:
    """Judge the claims against the runs of every setting, normalization and seed."""
    r = _index(runs, seeds)
    found = []
    for claim_id, source, statement, paper, (setting, norm, (measure, field)), crit in _CLAIMS:
        label = f"{SETTING_BY_KEY[setting].label}, {NORM_LABELS[norm]}"
        found.append(
            Claim(
                claim_id,
                source,
                statement,
                paper,
                f"{label}, {len(seeds)} seed(s); {measure}",
                tuple(getattr(x, field) for x in r.get(setting, norm)),
                crit,
            )
        )
    return tuple(found)


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
        title = f"Sigmoid MLPs on digits with and without normalization (seed {first_seed})"
        return finish(fig, title, [flow], legend=7)


EXPERIMENT = NormalizationExperiment()
