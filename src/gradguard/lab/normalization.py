"""Experiment ``normalization``: BatchNorm and LayerNorm let sigmoid MLPs train.

Ioffe & Szegedy (2015) trained a 3 × 100 sigmoid MLP on MNIST with and without Batch
Normalization (sec. 4.1: the BN net reaches a higher test accuracy, and the inputs of its
sigmoids keep a stable distribution), and an Inception network with sigmoid activations:
with BN and 5× the learning rate it reached 69.8 % top-1, while without BN it stayed at
chance accuracy (sec. 4.2.2). They
argue that BN stops the sigmoids from saturating and so lets higher learning rates be
used (sec. 3.3). Ba, Kiros & Hinton (2016) normalize over the units of a layer instead of
over the batch (LayerNorm) and report faster training than without normalization. This
experiment measures both on the bundled digits, at the scale of a laptop CPU.

Setup. Sigmoid MLPs 64 → 100 → … → 100 → 10 with PyTorch's default init (weights and
biases U(±1/√fan_in), Glorot's "standard" init), cross-entropy, plain SGD, batches of 60
from shuffled epochs (data seed ``1000 + seed``), 500 steps: the reference setup. Three
variants of each net: ``none``; ``batch``, a ``BatchNorm1d`` between every hidden Linear
and its sigmoid; ``layer``, a ``LayerNorm`` there instead. Three settings:

* depth 3 at LR 0.1, the paper's MNIST net (its width, its depth);
* depth 3 at LR 2.5, 25× higher: BN's "higher learning rates" (the paper went up to 30×);
* depth 10 at LR 0.5: the analog of sigmoid Inception, a net too deep for sigmoids.

Every step goes through a :class:`gradguard.Guard` with its default detectors and no clip
policy (the guard then only measures: the optimizer steps exactly as without it); a sink
keeps the loss, the global gradient norm and every Linear layer's gradient norm. Step 1's
norms are those at initialization, before any update: their first-layer over last-layer
ratio is Glorot & Bengio's vanishing-gradient measure. Test accuracy and the training loss
are measured on the full split after training (BN in eval mode, running statistics).

LayerNorm at depth 10 is shown in the tables but judged by no claim: the paper making a
claim about it does not exist. We expected it to rescue the deep net as BN does; it does
not (see ``LN_NOTE``): it stays at chance and its first layer's gradient at init is about
1e-4 of the last's.

The criteria come from the reference setup, fixed before the runs. Every claim held on each
of the seeds 0-8 (the full variant's 0-2 and six more); the smallest margins were BN at
depth 10 (test accuracy 0.906 against > 0.85) and LN at depth 3 (0.939 against > 0.9).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

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
from gradguard.records import Event, Window

WIDTH = 100
BATCH_SIZE = 60
STEPS = 500
LOG_EVERY = 10
FULL_SEEDS = 3

NORMS = ("none", "batch", "layer")
"""The variants of every net, in table order."""

NORM_LABELS: Mapping[str, str] = {
    "none": "no normalization",
    "batch": "BatchNorm",
    "layer": "LayerNorm",
}


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
    """Return the sigmoid MLP with PyTorch's default init under ``seed``.

    The global RNG is forked, so building leaves it as it was.
    """
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


def batches(seed: int) -> Iterator[Tensor]:
    """Yield index batches of the training split, shuffled epoch after epoch (seed 1000+s)."""
    generator = data_generator(seed)
    while True:
        order = torch.randperm(N_TRAIN, generator=generator)
        for start in range(0, N_TRAIN - BATCH_SIZE + 1, BATCH_SIZE):
            yield order[start : start + BATCH_SIZE]


class _Recorder:
    """A sink that keeps the drained steps: loss, global and per-layer norms, events."""

    def __init__(self) -> None:
        self.loss: list[float] = []
        self.grad_norm: list[float] = []
        self.per_layer: list[list[float]] = []
        self.layer_names: tuple[str, ...] = ()
        self.events: list[Event] = []

    def open(self, meta: Mapping[str, Any]) -> None:
        """Nothing to set up."""

    def write(self, window: Window, events: Sequence[Event]) -> None:
        """Append the window's steps."""
        self.loss += window.loss.tolist()
        self.grad_norm += window.grad_norm.tolist()
        self.per_layer += window.per_layer.tolist()
        self.layer_names = window.layer_names
        self.events += events

    def close(self) -> None:
        """Nothing to release."""


@dataclass(frozen=True)
class Run:
    """One trained net: its outcome, its curves and its gradient flow.

    Attributes:
        setting: a key of :data:`SETTING_BY_KEY`.
        norm: ``none``, ``batch`` or ``layer``.
        seed: model seed (data seed ``1000 + seed``).
        depth: hidden layers.
        lr: the SGD learning rate.
        test_accuracy: on the 360 test images after training.
        train_loss: cross-entropy on the 1,437 training images after training.
        init_ratio: first Linear's gradient norm over the last's, at initialization.
        linear_names: the Linear layers, input to output.
        init_norms: their gradient norms at initialization (step 1).
        loss: the batch loss of every step.
        grad_norm: the global gradient norm of every step.
        layer_steps: the steps of ``layer_norms`` (every :data:`LOG_EVERY` steps).
        layer_norms: the Linear layers' gradient norms at those steps.
        events: the guard's detector events, as ``Event.to_dict()``.
    """

    setting: str
    norm: str
    seed: int
    depth: int
    lr: float
    test_accuracy: float
    train_loss: float
    init_ratio: float
    linear_names: tuple[str, ...]
    init_norms: tuple[float, ...]
    loss: tuple[float, ...]
    grad_norm: tuple[float, ...]
    layer_steps: tuple[int, ...]
    layer_norms: tuple[tuple[float, ...], ...]
    events: tuple[dict[str, Any], ...]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dictionary."""
        record = asdict(self)
        for key, value in record.items():
            if isinstance(value, tuple):
                record[key] = [list(v) if isinstance(v, tuple) else v for v in value]
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Run:
        """Rebuild a run from :meth:`to_dict` output (non-finite numbers may be text)."""
        fields = dict(record)
        for key in ("test_accuracy", "train_loss", "init_ratio", "lr"):
            fields[key] = float(fields[key])
        for key in ("init_norms", "loss", "grad_norm"):
            fields[key] = tuple(float(v) for v in fields[key])
        fields["linear_names"] = tuple(fields["linear_names"])
        fields["layer_steps"] = tuple(int(v) for v in fields["layer_steps"])
        fields["layer_norms"] = tuple(tuple(float(v) for v in row) for row in fields["layer_norms"])
        fields["events"] = tuple(dict(e) for e in fields["events"])
        return cls(**fields)

    def event_kinds(self) -> list[str]:
        """The distinct kinds of the guard's events, in order of first appearance."""
        return list(dict.fromkeys(str(e["kind"]) for e in self.events))


def _evaluate(model: nn.Module) -> tuple[float, float]:
    """Return (test accuracy, training loss) with the model in eval mode."""
    digits = load_digits()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(digits.x_test).argmax(dim=1) == digits.y_test).float().mean())
        loss = float(nn.functional.cross_entropy(model(digits.x_train), digits.y_train))
    model.train()
    return accuracy, loss


def train(setting: Setting, norm: str, seed: int) -> Run:
    """Train one net of ``setting`` with normalization ``norm`` and return its measurements."""
    digits = load_digits()
    model = build_model(setting.depth, norm, seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=setting.lr)
    recorder = _Recorder()
    guard = Guard(model, optimizer, log_every=LOG_EVERY, sinks=[recorder])
    stream = batches(seed)
    for _ in range(STEPS):
        index = next(stream)
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(digits.x_train[index]), digits.y_train[index])
        loss.backward()  # type: ignore[no-untyped-call]
        guard.step(loss)
    guard.close()
    accuracy, train_loss = _evaluate(model)
    linear_names = tuple(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    columns = [recorder.layer_names.index(n) for n in linear_names]
    per_linear = [tuple(row[c] for c in columns) for row in recorder.per_layer]
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
        events=tuple(e.to_dict() for e in recorder.events),
    )


class _Runs:
    """The runs of one experiment, indexed by (setting, norm, seed)."""

    def __init__(self, runs: Sequence[Run], seeds: tuple[int, ...]) -> None:
        self.by_key = {(r.setting, r.norm, r.seed): r for r in runs}
        self.seeds = seeds

    def get(self, setting: str, norm: str) -> list[Run]:
        """Return the runs of ``setting`` and ``norm``, one per seed."""
        return [self.by_key[(setting, norm, s)] for s in self.seeds]

    def accuracy(self, setting: str, norm: str) -> tuple[float, ...]:
        """Return the test accuracy of every seed."""
        return tuple(r.test_accuracy for r in self.get(setting, norm))


def _on(setting: str, norm: str, n: int) -> str:
    return f"{SETTING_BY_KEY[setting].label}, {NORM_LABELS[norm]}, {n} seed(s)"


def _training_claims(r: _Runs) -> list[Claim]:
    n = len(r.seeds)
    bn_paper = "MNIST 3 x 100 sigmoid: BN net more accurate, sigmoid inputs stable (Fig. 1)"
    return [
        Claim(
            id="sigmoid-plateau-without-bn",
            source="Ioffe & Szegedy 2015",
            statement="Without normalization the shallow sigmoid MLP is still at chance "
            "after 500 steps at LR 0.1 (the plateau BN removes).",
            paper="baseline net trains more slowly (Fig. 1a; qualitative at this length)",
            measured_on=_on("shallow", "none", n) + "; test accuracy",
            values=r.accuracy("shallow", "none"),
            criterion=Criterion(high=0.2),
        ),
        Claim(
            id="bn-lifts-sigmoid-plateau",
            source="Ioffe & Szegedy 2015",
            statement="With BatchNorm the same net at the same LR trains.",
            paper=bn_paper,
            measured_on=_on("shallow", "batch", n) + "; test accuracy",
            values=r.accuracy("shallow", "batch"),
            criterion=Criterion(low=0.9),
        ),
        Claim(
            id="ln-lifts-sigmoid-plateau",
            source="Ba, Kiros & Hinton 2016",
            statement="LayerNorm, which needs no batch statistics, also trains it.",
            paper="LN speeds up training compared with no normalization (qualitative)",
            measured_on=_on("shallow", "layer", n) + "; test accuracy",
            values=r.accuracy("shallow", "layer"),
            criterion=Criterion(low=0.9),
        ),
        Claim(
            id="bn-tolerates-high-lr",
            source="Ioffe & Szegedy 2015",
            statement="BN trains at a 25x higher learning rate.",
            paper="BN-x5 / BN-x30 Inception train at 5x / 30x the LR; 14x fewer steps",
            measured_on=_on("high-lr", "batch", n) + "; test accuracy",
            values=r.accuracy("high-lr", "batch"),
            criterion=Criterion(low=0.9),
        ),
        Claim(
            id="deep-sigmoid-at-chance-without-bn",
            source="Ioffe & Szegedy 2015",
            statement="A sigmoid net too deep for sigmoids stays at chance without normalization.",
            paper="Inception with sigmoid, no BN: stays at chance accuracy",
            measured_on=_on("deep", "none", n) + "; test accuracy",
            values=r.accuracy("deep", "none"),
            criterion=Criterion(high=0.15),
        ),
        Claim(
            id="bn-trains-deep-sigmoid",
            source="Ioffe & Szegedy 2015",
            statement="With BatchNorm the deep sigmoid net trains.",
            paper="BN-x5-Sigmoid Inception: 69.8 % top-1",
            measured_on=_on("deep", "batch", n) + "; test accuracy",
            values=r.accuracy("deep", "batch"),
            criterion=Criterion(low=0.85),
        ),
    ]


def _gradient_claims(r: _Runs) -> list[Claim]:
    n = len(r.seeds)
    none = [x.init_ratio for x in r.get("deep", "none")]
    batch = [x.init_ratio for x in r.get("deep", "batch")]
    return [
        Claim(
            id="deep-sigmoid-gradient-vanishes",
            source="Glorot & Bengio 2010",
            statement="At initialization the deep sigmoid net's gradient vanishes toward "
            "the input.",
            paper="back-propagated gradients shrink toward the input (qualitative)",
            measured_on=_on("deep", "none", n) + "; first / last Linear gradient norm at init",
            values=tuple(none),
            criterion=Criterion(high=1e-3),
        ),
        Claim(
            id="bn-restores-gradient-flow",
            source="Ioffe & Szegedy 2015",
            statement="With BatchNorm the first layer's gradient is within a factor 100 "
            "of the last's.",
            paper="BN keeps sigmoids out of saturation and gradients from vanishing "
            "(sec. 3.3, qualitative)",
            measured_on=_on("deep", "batch", n) + "; first / last Linear gradient norm at init",
            values=tuple(batch),
            criterion=Criterion(low=1e-2, high=1e2),
        ),
    ]


def claims(runs: Sequence[Run], seeds: tuple[int, ...]) -> tuple[Claim, ...]:
    """Judge the claims against the runs of every setting, normalization and seed."""
    r = _Runs(runs, seeds)
    return (*_training_claims(r), *_gradient_claims(r))


def _cell(values: Sequence[float]) -> str:
    if len(values) == 1:
        return format_value(values[0])
    low, high = format_value(min(values)), format_value(max(values))
    return f"{format_value(statistics.fmean(values))} [{low}, {high}]"


def tables(runs: Sequence[Run], seeds: tuple[int, ...]) -> tuple[Table, ...]:
    """Return the outcome table (accuracy, loss) and the gradient-flow table."""
    r = _Runs(runs, seeds)
    spread = "" if len(seeds) == 1 else f" (mean [min, max] over {len(seeds)} seeds)"
    outcome_rows = []
    for setting in SETTINGS:
        for norm in NORMS:
            rs = r.get(setting.key, norm)
            kinds = sorted({k for x in rs for k in x.event_kinds()})
            outcome_rows.append(
                (
                    setting.label,
                    NORM_LABELS[norm],
                    _cell([x.test_accuracy for x in rs]),
                    _cell([x.train_loss for x in rs]),
                    ", ".join(kinds) or "none",
                )
            )
    flow_rows = [
        (
            setting.label,
            NORM_LABELS[norm],
            _cell([x.init_ratio for x in r.get(setting.key, norm)]),
            _cell([x.grad_norm[-1] for x in r.get(setting.key, norm)]),
        )
        for setting in SETTINGS
        for norm in NORMS
    ]
    return (
        Table(
            title="Test accuracy and training loss after 500 SGD steps" + spread,
            columns=("setting", "normalization", "test accuracy", "train loss", "guard events"),
            rows=tuple(outcome_rows),
            note=f"Chance is 0.1. {LN_NOTE}",
        ),
        Table(
            title="Gradient flow: first / last Linear gradient norm at init" + spread,
            columns=("setting", "normalization", "ratio at init", "final gradient norm"),
            rows=tuple(flow_rows),
            note="Step 1's norms, measured by the guard before the first update.",
        ),
    )


class NormalizationExperiment:
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

    def run(self, *, quick: bool, seed: int, progress: Progress | None = None) -> ExperimentResult:
        """Train every setting and normalization; quick uses 1 seed, full :data:`FULL_SEEDS`."""
        seeds = seeds_for(seed, quick=quick, n_full=FULL_SEEDS)
        grid = [(setting, norm, s) for s in seeds for setting in SETTINGS for norm in NORMS]
        runs: list[Run] = []
        start = time.perf_counter()
        with single_thread():
            for done, (setting, norm, s) in enumerate(grid, start=1):
                runs.append(train(setting, norm, s))
                if progress is not None:
                    progress(done, len(grid))
        return ExperimentResult(
            name=self.name,
            title=self.title,
            references=self.references,
            setting=self.setting,
            config={
                "model": f"sigmoid MLP 64-{WIDTH}x depth-10, PyTorch default init",
                "norms": list(NORMS),
                "settings": [asdict(s) for s in SETTINGS],
                "optimizer": "SGD (no momentum)",
                "batch_size": BATCH_SIZE,
                "steps": STEPS,
                "guard": f"Guard(log_every={LOG_EVERY}, detectors='default', clip=None)",
                "layer_norms_every": LOG_EVERY,
            },
            seeds=seeds,
            claims=claims(runs, seeds),
            tables=tables(runs, seeds),
            measurements=tuple(r.to_dict() for r in runs),
            duration_s=time.perf_counter() - start,
        )


EXPERIMENT = NormalizationExperiment()

_NORM_COLORS = {"none": "#d62728", "batch": "#1f77b4", "layer": "#2ca02c"}


def _smooth(values: Sequence[float], width: int = 10) -> list[float]:
    """Mean over consecutive blocks of ``width`` steps (NaN where a block has none)."""
    out = []
    for i in range(0, len(values), width):
        block = [v for v in values[i : i + width] if math.isfinite(v)]
        out.append(statistics.fmean(block) if block else math.nan)
    return out


def plot(experiment_data: Mapping[str, Any], out_dir: Path) -> Path:
    """Loss curves of each setting and the gradient flow at init of the deep nets.

    Drawn from the ``results.json`` data alone (first seed).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [Run.from_dict(m) for m in experiment_data["measurements"]]
    first_seed = min(r.seed for r in rows)
    chosen = {(r.setting, r.norm): r for r in rows if r.seed == first_seed}
    fig, axes = plt.subplots(1, len(SETTINGS) + 1, figsize=(16, 3.8))
    for ax, setting in zip(axes, SETTINGS, strict=False):
        for norm in NORMS:
            run = chosen[(setting.key, norm)]
            smooth = _smooth(run.loss)
            xs = [LOG_EVERY * (i + 0.5) for i in range(len(smooth))]
            label = f"{NORM_LABELS[norm]} (test acc {run.test_accuracy:.2f})"
            ax.plot(xs, smooth, color=_NORM_COLORS[norm], label=label)
        ax.set_title(setting.label, fontsize=10)
        ax.set_xlabel("SGD step")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("batch loss (mean of 10 steps)")
    flow = axes[-1]
    for norm in NORMS:
        run = chosen[("deep", norm)]
        norms = [v if v > 0 else math.nan for v in run.init_norms]
        flow.plot(range(1, len(norms) + 1), norms, marker=".", color=_NORM_COLORS[norm])
        flow.plot([], [], color=_NORM_COLORS[norm], label=NORM_LABELS[norm])
    flow.set_yscale("log")
    flow.set_xlabel("Linear layer (input → output)")
    flow.set_ylabel("gradient norm at init")
    flow.set_title("depth 10: gradient flow at init", fontsize=10)
    flow.grid(True, which="major", alpha=0.3)
    flow.legend(fontsize=7)
    fig.suptitle(f"Sigmoid MLPs on digits with and without normalization (seed {first_seed})")
    fig.tight_layout()
    path = out_dir / "normalization.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
