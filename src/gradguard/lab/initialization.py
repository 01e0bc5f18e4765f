"""Experiment ``initialization``: a 30-layer ReLU MLP under seven initializations.

Inits off He's 2/n vanish or explode; He, orthogonal with gain √2 and LSUV train (He et
al. 2015; Mishkin & Matas 2016). See docs/lab/initialization.md for the setup, the papers'
numbers and the criteria.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from gradguard import init as gg_init
from gradguard.diagnose import diagnose
from gradguard.errors import ConfigError
from gradguard.lab._figures import finish, new_figure, positive_or_nan
from gradguard.lab._harness import LabExperiment, Ticker
from gradguard.lab._harness import flush_denormals as flush_denormals  # for the tests
from gradguard.lab._records import BySeed, Claim, Criterion, Record, Table, cell, listed, share
from gradguard.lab._stacked import (
    ACTIVATIONS,
    BATCH_SIZE,
    LAYER_LOG_EVERY,
    LOG_EVERY,
    MOMENTUM,
    PROBE_SIZE,
    TICK_EVERY,
    Trace,
    data_stream,
    linears,
    mlp_layers,
    train_stacked,
)
from gradguard.lab._stacked import StackedMLP as StackedMLP  # for the tests
from gradguard.lab.data import N_CLASSES, load_digits

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DEPTH = 30
WIDTH = 64
LR = 0.005
STEPS = 600
CONTROL_DEPTH = 10
CONTROL_LR = 0.02
CHANCE_LOSS = math.log(N_CLASSES)

SCHEMES: Mapping[str, tuple[str, str, str]] = {
    "normal-0.01": ("N(0, 0.01²)", "vanishing", "#8c564b"),
    "normal-1": ("N(0, 1)", "exploding", "#d62728"),
    "xavier": ("Xavier U(±√(6/(n_in+n_out)))", "vanishing", "#ff7f0e"),
    "he": ("He N(0, 2/n_in)", "healthy", "#1f77b4"),
    "orthogonal": ("orthogonal, gain √2", "healthy", "#17becf"),
    "orthogonal-unit": ("orthogonal, gain 1", "vanishing", "#bcbd22"),
    "lsuv": ("LSUV (orthogonal, then unit variance)", "healthy", "#2ca02c"),
}
"""Init: (label, ``diagnose``'s verdict the variance argument predicts over 30 layers, colour)."""

INITS = tuple(SCHEMES)
"""The initializations of the depth-30 networks, in table order."""
INIT_LABELS = {name: label for name, (label, _, _) in SCHEMES.items()}
INIT_LABELS["lecun"] = "LeCun N(0, 1/n_in)"
CONTROL_INITS = ("xavier", "he")

_NORMAL_STD = {"normal-0.01": 0.01, "normal-1": 1.0}
_LIBRARY_SCHEMES = ("xavier", "he", "orthogonal", "lecun")


def build_mlp(depth: int, activation: str, width: int = WIDTH) -> nn.Sequential:
    """``64 → depth × [Linear(width), activation] → Linear(10)``, uninitialized."""
    return mlp_layers(depth, width, ACTIVATIONS[activation][0])


def initialize_mlp(
    model: nn.Sequential, scheme: str, seed: int, batch: Tensor
) -> list[gg_init.LsuvRecord]:
    """Initialize ``model`` in place with ``scheme`` (a key of :data:`INIT_LABELS`), seed ``seed``.

    The global random state is forked and left as it was; every bias is zero. ``batch`` is
    what LSUV rescales on. Returns LSUV's record of each layer (empty for other schemes).

    Raises:
        ConfigError: an unknown scheme.
    """
    if scheme not in INIT_LABELS:
        raise ConfigError(f"unknown scheme {scheme!r}; valid schemes: {', '.join(INIT_LABELS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if scheme == "lsuv":
            return gg_init.lsuv(model, batch)
        if scheme in _LIBRARY_SCHEMES:
            gg_init.initialize(model, scheme)
            return []
        with torch.no_grad():
            for layer in linears(model):
                if scheme == "orthogonal-unit":
                    nn.init.orthogonal_(layer.weight)
                else:
                    nn.init.normal_(layer.weight, 0.0, _NORMAL_STD[scheme])
                nn.init.zeros_(layer.bias)
    return []


def probe(model: nn.Sequential, x: Tensor, y: Tensor, seed: int) -> dict[str, Any]:
    """``diagnose`` at init: verdict, gradient ratio, Jacobian RMS singular value, per-layer stats.

    ``hidden_mean``/``hidden_std`` are each activation module's output statistics,
    ``relative_grad`` each Linear's output gradient over the last Linear's.
    """
    diag = diagnose(model, x, y, seed=seed)
    hidden = [layer for layer in diag.layers if layer.kind not in ("Linear", "Sequential")]
    weights = [layer for layer in diag.layers if layer.kind == "Linear"]
    return {
        "verdict": diag.verdict,
        "gradient_ratio": _number(diag.gradient_ratio),
        "jacobian_rms": math.nan if diag.jacobian is None else diag.jacobian.rms_singular_value,
        "hidden_mean": tuple(_number(layer.activation_mean) for layer in hidden),
        "hidden_std": tuple(_number(layer.activation_std) for layer in hidden),
        "relative_grad": tuple(_number(layer.relative_grad) for layer in weights),
    }


def _number(value: float | None) -> float:
    return math.nan if value is None else float(value)


@dataclass(frozen=True)
class Run(Trace, Record):
    """One network: its :class:`Trace` and its probe at initialization (see :func:`probe`)."""

    activation: str
    init: str
    """A key of :data:`INIT_LABELS`."""
    depth: int
    """Hidden layers."""
    lr: float
    seed: int
    verdict: str
    gradient_ratio: float
    jacobian_rms: float
    hidden_mean: tuple[float, ...]
    hidden_std: tuple[float, ...]
    relative_grad: tuple[float, ...]
    lsuv_std: tuple[float, ...]
    """Output std of each layer after LSUV (empty for other inits)."""
    lsuv_iterations: tuple[int, ...]


@dataclass(frozen=True)
class Setting:
    """Networks trained together: one depth and LR; (activation, init) pairs; seeds."""

    depth: int
    lr: float
    steps: int
    configs: tuple[tuple[str, str], ...]


def run_setting(
    setting: Setting, seeds: Sequence[int], progress: Callable[[], None] | None = None
) -> list[Run]:
    """Build, probe and train every (activation, init, seed) network of ``setting``.

    The runs come back seed by seed, each in the order of ``setting.configs``.
    ``progress`` is called after each probe and every :data:`TICK_EVERY` training steps.
    """
    digits = load_digits()
    keys = [(a, i, s) for s in seeds for a, i in setting.configs]
    probe_rows = {s: data_stream(s, setting.steps)[0] for s in seeds}
    models, probes, lsuv_records = [], [], []
    for activation, scheme, seed in keys:
        x, y = digits.x_train[probe_rows[seed]], digits.y_train[probe_rows[seed]]
        model = build_mlp(setting.depth, activation)
        lsuv_records.append(initialize_mlp(model, scheme, seed, x))
        probes.append(probe(model, x, y, seed))
        models.append(model)
        if progress is not None:
            progress()
    traces = train_stacked(
        models,
        [a for a, _, _ in keys],
        [s for _, _, s in keys],
        steps=setting.steps,
        lr=setting.lr,
        tick=progress,
    )
    return [
        Run(
            activation=activation,
            init=scheme,
            depth=setting.depth,
            lr=setting.lr,
            seed=seed,
            **probed,
            lsuv_std=tuple(r.std for r in records),
            lsuv_iterations=tuple(r.iterations for r in records),
            **asdict(trace),
        )
        for (activation, scheme, seed), probed, records, trace in zip(
            keys, probes, lsuv_records, traces, strict=True
        )
    ]


def stacked_config(setting: Setting) -> dict[str, Any]:
    """The config entries of ``setting``'s networks and their side-by-side training."""
    return {
        "depth": setting.depth,
        "width": WIDTH,
        "lr": setting.lr,
        "momentum": MOMENTUM,
        "batch_size": BATCH_SIZE,
        "steps": setting.steps,
        "probe_size": PROBE_SIZE,
    }


def progress_units(setting: Setting, n_seeds: int) -> int:
    """How many times :func:`run_setting` calls ``progress`` for ``n_seeds`` seeds."""
    return len(setting.configs) * n_seeds + setting.steps // TICK_EVERY


class Runs(BySeed[Run]):
    """The runs of one experiment, indexed by (activation, init, depth) and seed."""

    def __init__(self, runs: Sequence[Run], seeds: tuple[int, ...]) -> None:
        super().__init__(runs, seeds, key=lambda r: (r.activation, r.init, r.depth))

    def of(self, init: str, depth: int = DEPTH, activation: str = "relu") -> list[Run]:
        """The runs of one configuration, one per seed."""
        return self.get(activation, init, depth)


MAIN = Setting(DEPTH, LR, STEPS, tuple(("relu", i) for i in INITS))
CONTROL = Setting(CONTROL_DEPTH, CONTROL_LR, STEPS, tuple(("relu", i) for i in CONTROL_INITS))


def _on(runs: Sequence[Run]) -> str:
    return f"{INIT_LABELS[runs[0].init]}, {DEPTH} × {WIDTH} ReLU, LR {LR}"


def _stall(claim_id: str, source: str, statement: str, paper: str, runs: list[Run]) -> Claim:
    """The net stalls: its final training loss stays above 2.2 (chance is ln 10)."""
    return Claim(
        claim_id,
        source,
        statement,
        paper,
        f"final training loss, {_on(runs)}, {STEPS} steps, {len(runs)} seed(s); "
        f"chance is ln 10 = {CHANCE_LOSS:.3f}",
        tuple(r.final_loss for r in runs),
        Criterion(low=2.2),
        "diagnose at init: " + ", ".join(r.verdict for r in runs),
    )


def _trains(claim_id: str, source: str, statement: str, paper: str, runs: list[Run]) -> Claim:
    """The net trains: more than half of the seeds end below a training loss of 1.0."""
    losses = [r.final_loss for r in runs]
    return Claim(
        claim_id,
        source,
        statement,
        paper,
        "share of seeds with final training loss < 1.0 (pass: more than half), "
        f"{_on(runs)}, {STEPS} steps, {len(runs)} seed(s)",
        (share(losses, Criterion(high=1.0)),),
        Criterion(low=0.5),
        f"final loss {listed(losses)}; test accuracy " + listed([r.test_accuracy for r in runs]),
    )


def _claims(r: Runs) -> tuple[Claim, ...]:
    he, xavier, wild, lsuv = r.of("he"), r.of("xavier"), r.of("normal-1"), r.of("lsuv")
    n = f"{len(r.seeds)} seed(s)"
    wrong = [
        f"{x.init} seed {x.seed}: {x.verdict}"
        for init in INITS
        for x in r.of(init)
        if x.verdict != SCHEMES[init][1]
    ]
    control = [x for init in CONTROL_INITS for x in r.of(init, depth=CONTROL_DEPTH)]
    return (
        _stall(
            "normal-0.01-vanishes",
            "He et al. 2015 (sec. 2.2), quoting Simonyan & Zisserman 2015",
            "Gaussian weights of a fixed std 0.01 leave a deep net untrainable from scratch.",
            "std 0.01: models deeper than 8 conv layers have difficulties to converge",
            r.of("normal-0.01"),
        ),
        Claim(
            "he-xavier-std-ratio",
            "He et al. 2015 (eq. 10)",
            "Xavier's variance 1/n halves the signal's variance at every ReLU layer; "
            "He's 2/n keeps it: after 30 layers their stds differ by 2^15.",
            "variance ×½·n·Var[w] per layer; 2^15 = 3.3e4 after 30 layers (derived)",
            f"last hidden layer's activation std at init, He / Xavier, {n}",
            tuple(h.hidden_std[-1] / x.hidden_std[-1] for h, x in zip(he, xavier, strict=True)),
            Criterion(low=1e3),
        ),
        _stall(
            "xavier-stalls",
            "He et al. 2015 (Fig. 3)",
            "A 30-layer rectifier net under the Xavier scale stalls.",
            "30 layers: 'Xavier' completely stalls, with diminishing gradients",
            xavier,
        ),
        _stall(
            "orthogonal-unit-stalls",
            "He et al. 2015 (eq. 10); Mishkin & Matas 2016 (LSUV's starting point)",
            "Orthonormal weights with gain 1 halve the variance at every ReLU: they stall too.",
            "variance ×½ per ReLU layer (derived); LSUV starts from here",
            r.of("orthogonal-unit"),
        ),
        Claim(
            "normal-1-explodes",
            "He et al. 2015 (sec. 2.2, eq. 10)",
            "Unit-variance Gaussian weights magnify the signal ×√32 per layer: the first "
            "update overflows and training turns to NaN at once.",
            "an init off 2/n reduces or magnifies the signal exponentially (qualitative)",
            f"first step with a non-finite loss (steps + 1 = never), {_on(wild)}, {n}",
            tuple(float(x.first_nonfinite or STEPS + 1) for x in wild),
            Criterion(high=10),
            "last hidden std at init " + listed([x.hidden_std[-1] for x in wild]),
        ),
        _trains(
            "he-trains",
            "He et al. 2015 (Fig. 3)",
            "The same 30-layer net under He init converges.",
            "30 layers: He init converges; Xavier does not",
            he,
        ),
        _trains(
            "orthogonal-trains",
            "Saxe et al. 2014; He et al. 2015 (gain)",
            "Orthogonal weights scaled by the rectifier's gain √2 train like He init.",
            "orthogonal init with the nonlinearity's gain trains deep nets (qualitative)",
            r.of("orthogonal"),
        ),
        _trains(
            "lsuv-trains",
            "Mishkin & Matas 2016",
            "LSUV makes the stalled orthonormal init train, without normalization layers.",
            "thin 17-19-layer nets train with LSUV, matching or beating other inits "
            "(CIFAR-10, ≈94 % [recalled])",
            lsuv,
        ),
        Claim(
            "lsuv-unit-variance",
            "Mishkin & Matas 2016 (Alg. 1)",
            "LSUV brings every layer's output variance within Tol_var of 1 in at most "
            "T_max rescalings per layer.",
            "Tol_var = 0.1, T_max = 10; the cost is negligible",
            f"largest |std² - 1| over the {DEPTH + 1} Linear outputs after gradguard.init.lsuv "
            f"on {PROBE_SIZE} images, {n}",
            tuple(max(abs(s * s - 1) for s in x.lsuv_std) for x in lsuv),
            Criterion(high=0.1),
            f"at most {max(max(x.lsuv_iterations) for x in lsuv)} rescaling(s) per layer",
        ),
        Claim(
            "diagnose-verdicts",
            "gradguard.diagnose; He et al. 2015 (eq. 10)",
            "diagnose() calls each init what the variance argument predicts: vanishing, "
            "exploding or healthy.",
            "×0.0032, ×32, ×½, ×1, ×1, ×½, ×1 per layer for the seven inits (derived)",
            f"verdicts that differ from the prediction, {len(INITS)} inits × {n}",
            (float(len(wrong)),),
            Criterion(high=0.5),
            "; ".join(wrong) if wrong else "all as predicted",
        ),
        Claim(
            "shallow-control-trains",
            "He et al. 2015 (Fig. 2)",
            "At moderate depth both Xavier and He init train: the stall is about depth.",
            "22 layers: both converge, He earlier",
            f"final training loss, Xavier and He, {CONTROL_DEPTH} × {WIDTH} ReLU, "
            f"LR {CONTROL_LR}, {STEPS} steps, {n}",
            tuple(x.final_loss for x in control),
            Criterion(high=0.1),
        ),
    )


def _row(label: str, runs: Sequence[Run]) -> tuple[str, ...]:
    return (
        label,
        "/".join(sorted({r.verdict for r in runs})),
        cell([r.hidden_std[-1] for r in runs]),
        cell([r.gradient_ratio for r in runs]),
        cell([r.final_loss for r in runs]),
        cell([r.test_accuracy for r in runs]),
        ", ".join("never" if r.first_nonfinite is None else str(r.first_nonfinite) for r in runs),
    )


TABLE_COLUMNS = (
    "init",
    "diagnose",
    "last hidden std at init",
    "grad ratio first/last",
    "final train loss",
    "test accuracy",
    "first non-finite step",
)

_LOSS_TOP = 30.0  # the loss axis ends here: N(0, 1)'s first loss is about 1e23


class Initialization(LabExperiment):
    """The ``initialization`` experiment (He et al. 2015; Mishkin & Matas 2016)."""

    name = "initialization"
    title = (
        "30-layer ReLU MLP under seven initializations: vanish, explode or train (He 2015, LSUV)"
    )
    references = (
        "He, Zhang, Ren & Sun 2015, Delving deep into rectifiers (arXiv 1502.01852)",
        "Mishkin & Matas 2016, All you need is a good init (arXiv 1511.06422)",
        "Saxe, McClelland & Ganguli 2014, Exact solutions to the nonlinear dynamics of "
        "learning in deep linear neural networks (arXiv 1312.6120)",
        "Simonyan & Zisserman 2015, Very deep convolutional networks for large-scale image "
        "recognition (arXiv 1409.1556)",
    )
    setting = (
        "Papers: 22- and 30-layer conv nets on ImageNet (He), 17-19-layer FitNets on CIFAR-10 "
        f"(LSUV). Here: {DEPTH} × {WIDTH} ReLU MLPs on 8×8 digits, {STEPS} SGD steps of "
        f"{BATCH_SIZE} images, a few seconds of CPU."
    )
    record_type = Run
    denormals = True

    def config(self, quick: bool) -> dict[str, Any]:
        """Both variants run every init and the control: the networks train side by side."""
        return {
            **stacked_config(MAIN),
            "inits": {i: INIT_LABELS[i] for i in INITS},
            "control": {"depth": CONTROL_DEPTH, "lr": CONTROL_LR, "inits": CONTROL_INITS},
            "lsuv": {"tol": 0.1, "max_iter": 10},
            "log_every": LOG_EVERY,
            "layer_log_every": LAYER_LOG_EVERY,
        }

    def units(self, quick: bool, seeds: tuple[int, ...]) -> int:
        """Probes and training ticks of the main and the control setting."""
        return sum(progress_units(s, len(seeds)) for s in (MAIN, CONTROL))

    def measure(self, quick: bool, seeds: tuple[int, ...], tick: Ticker) -> list[Run]:
        """Probe and train the main setting, then the control."""
        return run_setting(MAIN, seeds, tick) + run_setting(CONTROL, seeds, tick)

    def claims(self, records: Sequence[Run], seeds: tuple[int, ...]) -> tuple[Claim, ...]:
        """Vanishing, exploding, training, LSUV, diagnose and the depth-10 control."""
        return _claims(Runs(records, seeds))

    def tables(self, records: Sequence[Run], seeds: tuple[int, ...]) -> tuple[Table, ...]:
        """The depth-30 table and the depth-10 control table."""
        r = Runs(records, seeds)
        spread = "" if len(seeds) == 1 else f"; mean [min, max] over {len(seeds)} seeds"
        return (
            Table(
                title=f"{DEPTH} × {WIDTH} ReLU MLP, SGD momentum {MOMENTUM}, LR {LR}, "
                f"{STEPS} steps{spread}",
                columns=TABLE_COLUMNS,
                rows=tuple(_row(INIT_LABELS[i], r.of(i)) for i in INITS),
                note="diagnose: gradguard.diagnose's verdict at init (band 10³); grad ratio: "
                "gradient at the first layer's output over the last layer's.",
            ),
            Table(
                title=f"Control: {CONTROL_DEPTH} × {WIDTH} ReLU MLP, LR {CONTROL_LR}{spread}",
                columns=TABLE_COLUMNS,
                rows=tuple(_row(INIT_LABELS[i], r.of(i, CONTROL_DEPTH)) for i in CONTROL_INITS),
            ),
        )

    def figure(self, records: Sequence[Run], data: Mapping[str, Any]) -> Figure:
        """Activation std and gradient by layer at init, loss and gradient norm in training.

        One line per init, the first seed, depth 30. Zero (underflowed) and non-finite values
        leave gaps; a run that turned NaN is marked with an × at the step it did.
        """
        rows = [r for r in records if r.depth == DEPTH]
        first_seed = min(r.seed for r in rows)
        fig, axes = new_figure(2, 2, figsize=(12, 8))
        (std_ax, grad_ax), (loss_ax, norm_ax) = axes
        for row in (r for r in rows if r.seed == first_seed):
            style = {"color": SCHEMES[row.init][2], "label": INIT_LABELS[row.init]}
            std = positive_or_nan(row.hidden_std)
            std_ax.plot(range(1, len(std) + 1), std, marker=".", **style)
            rel = positive_or_nan(row.relative_grad)
            grad_ax.plot(range(1, len(rel) + 1), rel, marker=".", **style)
            loss_ax.plot(row.log_steps, positive_or_nan(row.loss), lw=1, **style)
            if row.first_nonfinite is not None:
                loss_ax.plot(
                    row.first_nonfinite, _LOSS_TOP, marker="x", ms=10, color=style["color"]
                )
            norm_ax.plot(row.log_steps, positive_or_nan(row.grad_norm), lw=1, **style)
        std_ax.set(xlabel="hidden layer (input → output)", ylabel="activation std at init")
        grad_ax.set(xlabel="Linear layer", ylabel="output gradient / last layer's, at init")
        loss_ax.set(xlabel="step", ylabel="batch loss (×: the step it turned NaN)")
        loss_ax.set_ylim(1e-3, _LOSS_TOP * 2)
        norm_ax.set(xlabel="step", ylabel="global gradient norm")
        for ax in axes.flat:
            ax.set_yscale("log")
        loss_ax.axhline(CHANCE_LOSS, color="#7f7f7f", ls="--", lw=0.8)
        std_ax.legend(fontsize=8)
        title = f"{DEPTH}-layer ReLU MLP on digits under seven initializations (seed {first_seed})"
        return finish(fig, title, axes.flat)


EXPERIMENT = Initialization()
claims = EXPERIMENT.claims  # judges stored records too: ``claims(runs, seeds)``
