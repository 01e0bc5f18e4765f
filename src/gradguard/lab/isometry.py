"""Experiment ``isometry``: Jacobian spectra of deep nets, and depth-free learning in linear nets.

Orthogonal tanh nets are isometric at any depth, Gaussian and ReLU nets are not; deep
orthogonal linear nets learn as fast as shallow ones (Pennington et al. 2017; Saxe et al.
2014). See docs/lab/isometry.md for the setup, the papers' numbers and the criteria.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from gradguard import init as gg_init
from gradguard.diagnose import diagnose
from gradguard.lab._figures import finish, new_figure
from gradguard.lab._harness import LabExperiment, Ticker
from gradguard.lab._records import Claim, Criterion, Record, Table, cell, share
from gradguard.lab._spectra import (
    N,
    Network,
    build_network,
    network_input,
    singular_values,
    tanh_critical_point,
)
from gradguard.lab.data import N_CLASSES, N_FEATURES, N_TRAIN, load_digits

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DEPTHS = (4, 16, 64)

SAXE_DEPTHS = (1, 8, 32)
SAXE_WIDTH = 64
SAXE_LR = 0.005
SAXE_TARGET = 0.5
SAXE_MAX_STEPS = 1000
SAXE_DIVERGED = 1e6
SAXE_INITS = ("orthogonal", "gaussian")
SAXE_SCHEMES: Mapping[str, str] = {"orthogonal": "orthogonal", "gaussian": "lecun"}


_SMALL = (*tanh_critical_point(1 / 64), 1 / 64)
_ONE = (*tanh_critical_point(1.0), 1.0)
NETWORKS: tuple[Network, ...] = (
    Network("linear-gaussian", "linear, Gaussian", "linear", "gaussian", 1.0, 0.0, 1.0),
    Network("linear-orthogonal", "linear, orthogonal", "linear", "orthogonal", 1.0, 0.0, 1.0),
    Network("tanh-gaussian", "tanh, Gaussian, q* = 1/64", "tanh", "gaussian", *_SMALL),
    Network("tanh-orthogonal", "tanh, orthogonal, q* = 1/64", "tanh", "orthogonal", *_SMALL),
    Network("tanh-orthogonal-q1", "tanh, orthogonal, q* = 1", "tanh", "orthogonal", *_ONE),
    Network("relu-gaussian", "ReLU, He-Gaussian", "relu", "gaussian", math.sqrt(2), 0.0, 1.0),
    Network(
        "relu-orthogonal", "ReLU, orthogonal × √2", "relu", "orthogonal", math.sqrt(2), 0.0, 1.0
    ),
)
"""The networks of Part 1, in table order."""


# --- Part 1: spectra ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Spectrum(Record):
    """The Jacobian spectrum of one network at one depth and seed (σ: singular values)."""

    network: str
    depth: int
    seed: int
    mean_sq: float
    """Mean of σ² (1 at isometry)."""
    var_sq: float
    """Variance of σ² (0 at isometry): the spread."""
    sigma_max: float
    sigma_min: float
    singular_values: tuple[float, ...]
    """All of them, descending (kept at the deepest depth only)."""
    diagnose_sigma_max: float | None
    """``diagnose``'s randomized estimate of σ_max (deepest depth; so are the next two)."""
    diagnose_mean_sq: float | None
    diagnose_verdict: str | None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dictionary (with ``part: "spectrum"``)."""
        return {"part": "spectrum", **super().to_dict()}


def measure_spectra(network: Network, seed: int) -> list[Spectrum]:
    """The spectra of ``network`` at every depth of :data:`DEPTHS` for one seed."""
    deepest = max(DEPTHS)
    model = build_network(network, deepest, seed)
    x = network_input(network, seed)
    found = []
    for depth in DEPTHS:
        s = singular_values(model[: 2 * depth], x[:1], seed)
        sq = s.square()
        diag_top = diag_mean = verdict = None
        if depth == deepest:
            diag = diagnose(model, x, samples=1, seed=seed)
            if diag.jacobian is not None:
                diag_top = diag.jacobian.top_singular_values[0]
                diag_mean = diag.jacobian.mean_squared_singular_value
            verdict = diag.verdict
        found.append(
            Spectrum(
                network=network.name,
                depth=depth,
                seed=seed,
                mean_sq=float(sq.mean()),
                var_sq=float(sq.var(correction=0)),
                sigma_max=float(s[0]),
                sigma_min=float(s[-1]),
                singular_values=tuple(s.tolist()) if depth == deepest else (),
                diagnose_sigma_max=diag_top,
                diagnose_mean_sq=diag_mean,
                diagnose_verdict=verdict,
            )
        )
    return found


# --- Part 2: learning time of deep linear nets -------------------------------------------------


@dataclass(frozen=True)
class Regression:
    """The digits regression as a 64-row least-squares problem.

    Full-batch GD sees the data only through ``XᵀX`` and ``XᵀY``, so with the thin QR
    factorization ``X = QR``, ``‖X Wᵀ - Y‖² = ‖R Wᵀ - QᵀY‖² + ‖Y‖² - ‖QᵀY‖²``: the same loss
    and gradient from 64 rows instead of 1,437, about 20 times cheaper.
    """

    r: Tensor  # (64, 64): X = QR
    target: Tensor  # (64, 10): QᵀY
    constant: float  # ‖Y‖² - ‖QᵀY‖²

    def loss(self, model: nn.Module) -> Tensor:
        """Mean over images of the squared error summed over outputs."""
        residual: Tensor = model(self.r) - self.target
        return (residual.square().sum() + self.constant) / N_TRAIN


def regression() -> Regression:
    """Return the QR form of the digits regression (fp64 factorization, fp32 tensors)."""
    digits = load_digits()
    x = digits.x_train.double()
    y = nn.functional.one_hot(digits.y_train, N_CLASSES).double()
    q, r = torch.linalg.qr(x)
    target = q.T @ y
    constant = float(y.square().sum() - target.square().sum())
    return Regression(r.float(), target.float(), constant)


def least_squares_optimum() -> float:
    """The smallest loss any linear map reaches (0.407 on the digits)."""
    data = regression()
    solution = torch.linalg.lstsq(data.r.double(), data.target.double(), driver="gelsd").solution
    residual = data.r.double() @ solution - data.target.double()
    return float((residual.square().sum() + data.constant) / N_TRAIN)


def build_linear(depth: int, init: str, seed: int) -> nn.Sequential:
    """64 → ``depth`` × 64 → 10, no biases, initialized by :func:`gradguard.init.initialize`."""
    dims = [N_FEATURES] + [SAXE_WIDTH] * depth + [N_CLASSES]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(
            *(nn.Linear(a, b, bias=False) for a, b in zip(dims[:-1], dims[1:], strict=True))
        )
        gg_init.initialize(model, SAXE_SCHEMES[init])
    return model


@dataclass(frozen=True)
class LinearRun(Record):
    """One deep linear net trained by full-batch gradient descent."""

    init: str
    depth: int
    seed: int
    steps: int | None
    """Updates until the loss was first below :data:`SAXE_TARGET`; None if never."""
    outcome: str
    """``reached``, ``diverged`` or ``not reached`` (in :data:`SAXE_MAX_STEPS`)."""
    loss: tuple[float, ...]
    """The loss before each update, then the last one."""

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dictionary (with ``part: "linear"``)."""
        return {"part": "linear", **super().to_dict()}


def train_linear(data: Regression, init: str, depth: int, seed: int) -> LinearRun:
    """Run full-batch gradient descent until the target, a divergence or the step limit."""
    model = build_linear(depth, init, seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=SAXE_LR, foreach=True)
    losses: list[float] = []
    for step in range(SAXE_MAX_STEPS + 1):
        loss = data.loss(model)
        value = float(loss.detach())  # sync: the stopping rule reads the loss (a CPU tensor)
        losses.append(value)
        if value < SAXE_TARGET:
            return LinearRun(init, depth, seed, step, "reached", tuple(losses))
        if not value < SAXE_DIVERGED:  # also true for NaN
            return LinearRun(init, depth, seed, None, "diverged", tuple(losses))
        if step == SAXE_MAX_STEPS:
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    return LinearRun(init, depth, seed, None, "not reached", tuple(losses))


# --- claims and tables -------------------------------------------------------------------------


class Results:
    """The spectra and linear runs of one experiment, indexed."""

    def __init__(self, records: Sequence[Spectrum | LinearRun], seeds: tuple[int, ...]) -> None:
        self.spectra = {(s.network, s.depth, s.seed): s for s in records if isinstance(s, Spectrum)}
        self.linear = {(r.init, r.depth, r.seed): r for r in records if isinstance(r, LinearRun)}
        self.seeds = seeds

    def spectrum(self, network: str, depth: int = max(DEPTHS)) -> list[Spectrum]:
        """One spectrum per seed."""
        return [self.spectra[(network, depth, s)] for s in self.seeds]

    def var_sq(self, network: str, depth: int = max(DEPTHS)) -> tuple[float, ...]:
        """var(σ²) per seed."""
        return tuple(s.var_sq for s in self.spectrum(network, depth))

    def sigma_max(self, network: str) -> tuple[float, ...]:
        """σ_max at the deepest depth, per seed."""
        return tuple(s.sigma_max for s in self.spectrum(network))

    def runs(self, init: str, depth: int) -> list[LinearRun]:
        """One linear run per seed."""
        return [self.linear[(init, depth, s)] for s in self.seeds]


def _spectrum_claim(
    r: Results, claim_id: str, statement: str, paper: str, network: str, criterion: Criterion
) -> Claim:
    """A claim on var(σ²), or on σ_max for a ``*-sigma-max`` id, of ``network`` at the deepest L."""
    label = next(x.label for x in NETWORKS if x.name == network)
    on_max = claim_id.endswith("sigma-max")
    return Claim(
        id=claim_id,
        source="Saxe et al. 2014" if network == "linear-orthogonal" else "Pennington et al. 2017",
        statement=statement,
        paper=paper,
        measured_on=("σ_max, " if on_max else "var(σ²), ")
        + f"{label}, L = {max(DEPTHS)}, N = {N}, exact SVD of J at one input, "
        f"{len(r.seeds)} seed(s)",
        values=r.sigma_max(network) if on_max else r.var_sq(network),
        criterion=criterion,
    )


_SPECTRUM_CLAIMS = (
    (
        "orthogonal-tanh-isometric",
        "Orthogonal tanh nets at criticality and small q* keep the spread of J's squared "
        "singular values O(1) at any depth: dynamical isometry.",
        "var(σ²) of JJᵀ stays O(1) with depth (qualitative, Fig. 2)",
        "tanh-orthogonal",
        Criterion(high=0.5),
    ),
    (
        "orthogonal-tanh-sigma-max",
        "Their largest singular value stays near 1.",
        "σ_max stays O(1) with depth (qualitative)",
        "tanh-orthogonal",
        Criterion(high=2.0),
    ),
    (
        "linear-orthogonal-exact",
        "A deep linear net with orthogonal weights is an exact isometry.",
        "every singular value of the end-to-end map is 1",
        "linear-orthogonal",
        Criterion(high=1e-6),
    ),
    (
        "gaussian-tanh-spread",
        "Gaussian weights at the same critical point spread the spectrum with depth.",
        "var(σ²) grows linearly with L for Gaussian weights (qualitative)",
        "tanh-gaussian",
        Criterion(low=5.0),
    ),
    (
        "gaussian-tanh-sigma-max",
        "Their largest singular value grows well above 1.",
        "σ_max grows with depth for Gaussian weights (qualitative)",
        "tanh-gaussian",
        Criterion(low=3.0),
    ),
    (
        "relu-orthogonal-spread",
        "ReLU nets cannot be isometric, even with orthogonal weights.",
        "ReLU: var(σ²) grows with L for any weights (qualitative)",
        "relu-orthogonal",
        Criterion(low=5.0),
    ),
    (
        "large-q-not-isometric",
        "Orthogonal tanh at a large q* = 1 is critical but not isometric.",
        "isometry needs small q*; the spread grows with q* (qualitative)",
        "tanh-orthogonal-q1",
        Criterion(low=2.0),
    ),
)
"""The spectrum claims: id, statement, paper, network, criterion."""


def _growth_claim(r: Results) -> Claim:
    shallow, deep = min(DEPTHS), max(DEPTHS)
    at = (r.var_sq("linear-gaussian", deep), r.var_sq("linear-gaussian", shallow))
    return Claim(
        id="linear-gaussian-spread-grows",
        source="Pennington et al. 2017; Saxe et al. 2014",
        statement="For a product of Gaussian matrices the spread grows with depth.",
        paper=f"var(σ²) = L as N → ∞: ×{deep // shallow} from L = {shallow} to {deep}",
        measured_on=f"var(σ²) at L = {deep} over var(σ²) at L = {shallow}, linear Gaussian, "
        f"N = {N}, {len(r.seeds)} seed(s)",
        values=tuple(d / s for d, s in zip(*at, strict=True)),
        criterion=Criterion(low=4.0),
    )


def _diagnose_claim(r: Results) -> Claim:
    errors = [
        abs(s.diagnose_sigma_max / s.sigma_max - 1)
        if s.diagnose_sigma_max is not None
        else math.nan
        for net in NETWORKS
        for s in r.spectrum(net.name)
    ]
    return Claim(
        id="diagnose-sigma-max",
        source="gradguard.diagnose; Halko et al. 2011",
        statement="diagnose()'s randomized σ_max of J matches the exact SVD on every network.",
        paper="subspace iteration converges to the top singular values",
        measured_on=f"|σ_max(diagnose) / σ_max(exact) - 1|, the {len(NETWORKS)} networks at "
        f"L = {max(DEPTHS)}, {len(r.seeds)} seed(s)",
        values=tuple(errors),
        criterion=Criterion(high=0.1),
    )


def _steps_text(runs: Sequence[LinearRun]) -> str:
    return ", ".join(str(x.steps) if x.steps is not None else x.outcome for x in runs)


def _relative_speed(orthogonal: LinearRun, gaussian: LinearRun) -> float:
    """Orthogonal steps over Gaussian steps: below 1 when the Gaussian net is slower.

    0 when only the Gaussian net failed (diverged or never reached the target), inf when
    the orthogonal one failed.
    """
    if orthogonal.steps is None:
        return math.inf
    if gaussian.steps is None:
        return 0.0
    return orthogonal.steps / gaussian.steps


def _saxe_claims(r: Results) -> list[Claim]:
    shallow, deep = min(SAXE_DEPTHS), max(SAXE_DEPTHS)
    orth_shallow, orth_deep = r.runs("orthogonal", shallow), r.runs("orthogonal", deep)
    gauss_deep = r.runs("gaussian", deep)
    slowdown = tuple(
        d.steps / s.steps if d.steps is not None and s.steps is not None else math.inf
        for d, s in zip(orth_deep, orth_shallow, strict=True)
    )
    relative = [_relative_speed(o, g) for o, g in zip(orth_deep, gauss_deep, strict=True)]
    setting = f"LR {SAXE_LR}, loss < {SAXE_TARGET}, {len(r.seeds)} seed(s)"
    return [
        Claim(
            id="orthogonal-no-depth-slowdown",
            source="Saxe et al. 2014",
            statement="With orthogonal init a deep linear net learns no slower than a shallow one.",
            paper="learning time independent of depth (qualitative; deep linear MNIST)",
            measured_on=f"steps at D = {deep} over steps at D = {shallow}, orthogonal, {setting}",
            values=slowdown,
            criterion=Criterion(high=1.0),
            note=f"steps D = {shallow}: {_steps_text(orth_shallow)}; D = {deep}: "
            f"{_steps_text(orth_deep)}",
        ),
        Claim(
            id="gaussian-slower-or-diverges",
            source="Saxe et al. 2014",
            statement="With scaled Gaussian init the deep net is slower, or diverges.",
            paper="scaled Gaussian init: depth-dependent slowdown (qualitative)",
            measured_on=f"share of seeds where the Gaussian net at D = {deep} is slower than the "
            f"orthogonal one or fails (pass: more than half), {setting}",
            values=(share(relative, Criterion(high=1.0)),),
            criterion=Criterion(low=0.5),
            note=f"Gaussian steps D = {deep}: {_steps_text(gauss_deep)}",
        ),
    ]


def claims(
    spectra: Sequence[Spectrum], linear: Sequence[LinearRun], seeds: tuple[int, ...]
) -> tuple[Claim, ...]:
    """Judge the claims against every spectrum and linear run."""
    r = Results([*spectra, *linear], seeds)
    spectral = [_spectrum_claim(r, *c) for c in _SPECTRUM_CLAIMS]
    return (*spectral, _growth_claim(r), _diagnose_claim(r), *_saxe_claims(r))


class Isometry(LabExperiment):
    """The ``isometry`` experiment (Saxe et al. 2014; Pennington et al. 2017)."""

    name = "isometry"
    title = "Jacobian spectra: orthogonal tanh is isometric, Gaussian and ReLU are not; deep " + (
        "linear nets learn as fast as shallow ones (Saxe 2014, Pennington 2017)"
    )
    references = (
        "Pennington, Schoenholz & Ganguli 2017, Resurrecting the sigmoid in deep learning "
        "through dynamical isometry (arXiv 1711.04735)",
        "Saxe, McClelland & Ganguli 2014, Exact solutions to the nonlinear dynamics of "
        "learning in deep linear neural networks (arXiv 1312.6120)",
        "Halko, Martinsson & Tropp 2011, Finding structure with randomness (SIAM Review)",
    )
    setting = (
        "Papers: free-probability spectra at N → ∞ and 200-layer nets on CIFAR-10 "
        "(Pennington); deep linear nets on MNIST (Saxe). Here: exact Jacobians of "
        f"{'/'.join(map(str, DEPTHS))}-layer nets of width {N}, and linear nets with "
        f"{'/'.join(map(str, SAXE_DEPTHS))} hidden layers on 8×8 digits."
    )

    def config(self, quick: bool) -> dict[str, Any]:
        """The same for both variants."""
        return {
            "width": N,
            "depths": list(DEPTHS),
            "networks": [asdict(net) for net in NETWORKS],
            "saxe": {
                "depths": list(SAXE_DEPTHS),
                "width": SAXE_WIDTH,
                "lr": SAXE_LR,
                "target": SAXE_TARGET,
                "max_steps": SAXE_MAX_STEPS,
                "inits": {i: SAXE_SCHEMES[i] for i in SAXE_INITS},
            },
        }

    def units(self, quick: bool, seeds: tuple[int, ...]) -> int:
        """One unit per network and seed (its three depths), one per linear run."""
        return len(seeds) * (len(NETWORKS) + len(SAXE_INITS) * len(SAXE_DEPTHS))

    def measure(self, quick: bool, seeds: tuple[int, ...], tick: Ticker) -> list[Record]:
        """Every spectrum, then every linear run."""
        records: list[Record] = []
        for s in seeds:
            for net in NETWORKS:
                records += measure_spectra(net, s)
                tick()
        data = regression()
        for s in seeds:
            for init in SAXE_INITS:
                for depth in SAXE_DEPTHS:
                    records.append(train_linear(data, init, depth, s))
                    tick()
        return records

    def claims(self, records: Sequence[Any], seeds: tuple[int, ...]) -> tuple[Claim, ...]:
        """The spectrum claims, diagnose's accuracy and Saxe et al.'s learning times."""
        r = Results(records, seeds)
        return claims(list(r.spectra.values()), list(r.linear.values()), seeds)

    def tables(self, records: Sequence[Any], seeds: tuple[int, ...]) -> tuple[Table, ...]:
        """The spectrum table and the learning-time table."""
        r = Results(records, seeds)
        spread = "" if len(seeds) == 1 else f"; mean [min, max] over {len(seeds)} seeds"
        deep = max(DEPTHS)
        spectrum_rows = []
        for net in NETWORKS:
            at_deep = r.spectrum(net.name)
            spectrum_rows.append(
                (
                    net.label,
                    f"{net.sigma_w:.3f}, {net.sigma_b:.3f}",
                    *(cell(r.var_sq(net.name, d)) for d in DEPTHS),
                    cell([s.sigma_max for s in at_deep]),
                    cell([s.mean_sq for s in at_deep]),
                    cell([s.diagnose_sigma_max or math.nan for s in at_deep]),
                )
            )
        return (
            Table(
                title=f"Input-output Jacobian spectra, width {N}{spread}",
                columns=(
                    "network",
                    "σ_w, σ_b",
                    *(f"var(σ²) L={d}" for d in DEPTHS),
                    f"σ_max L={deep}",
                    f"mean σ² L={deep}",
                    f"diagnose σ_max L={deep}",
                ),
                rows=tuple(spectrum_rows),
                note="σ: singular values of J at one input (exact); diagnose: the randomized "
                "estimate of gradguard.diagnose. The mean σ² is heavy-tailed at N = 256.",
            ),
            Table(
                title=f"Deep linear nets on digits: full-batch GD steps to loss < {SAXE_TARGET} "
                f"(LR {SAXE_LR}, one value per seed)",
                columns=("init", *(f"D = {d}" for d in SAXE_DEPTHS)),
                rows=tuple(
                    (init, *(_steps_text(r.runs(init, d)) for d in SAXE_DEPTHS))
                    for init in SAXE_INITS
                ),
                note=f"Least-squares optimum {least_squares_optimum():.3f}; at most "
                f"{SAXE_MAX_STEPS} steps.",
            ),
        )

    def records_from(self, data: Mapping[str, Any]) -> list[Any]:
        """Spectra and linear runs, told apart by their ``part``."""
        kinds: dict[str, type[Spectrum | LinearRun]] = {"spectrum": Spectrum, "linear": LinearRun}
        return [kinds[m["part"]].from_dict(m) for m in data["measurements"]]

    def figure(self, records: Sequence[Any], data: Mapping[str, Any]) -> Figure:
        """Spectra at the deepest depth, spread against depth, the deep linear nets' timing."""
        fig, axes = new_figure(2, 2, figsize=(12, 8.5))
        _plot_spectra(axes[0][0], axes[0][1], [r for r in records if isinstance(r, Spectrum)])
        _plot_linear(axes[1][0], axes[1][1], [r for r in records if isinstance(r, LinearRun)])
        title = "Dynamical isometry: Jacobian spectra (top) and deep linear nets (bottom)"
        return finish(fig, title, axes.flat, legend=7)


EXPERIMENT = Isometry()

_COLORS = {
    "linear-gaussian": "#7f7f7f",
    "linear-orthogonal": "#000000",
    "tanh-gaussian": "#ff7f0e",
    "tanh-orthogonal": "#2ca02c",
    "tanh-orthogonal-q1": "#bcbd22",
    "relu-gaussian": "#1f77b4",
    "relu-orthogonal": "#17becf",
}
_LABELS = {net.name: net.label for net in NETWORKS}
_FLOOR = 1e-12  # var(σ²) of an exact isometry is round-off; drawn at this floor


def _plot_spectra(ax: Any, var_ax: Any, rows: Sequence[Spectrum]) -> None:
    first_seed = min(r.seed for r in rows)
    for row in rows:
        if row.seed == first_seed and row.singular_values:
            values = row.singular_values
            rank = [(i + 0.5) / len(values) for i in range(len(values))]
            label = _LABELS.get(row.network, row.network)
            ax.plot(rank, values, color=_COLORS.get(row.network), lw=1.2, label=label)
    for network in dict.fromkeys(r.network for r in rows):
        depths = sorted({r.depth for r in rows if r.network == network})
        means = [
            max(
                statistics.fmean(r.var_sq for r in rows if (r.network, r.depth) == (network, d)),
                _FLOOR,
            )
            for d in depths
        ]
        var_ax.plot(
            depths, means, marker="o", color=_COLORS.get(network), label=_LABELS.get(network)
        )
    # ReLU Jacobians are rank-deficient (dead units): their tail falls to 1e-100 and below.
    ax.set(xlabel="rank / N", ylabel="singular value of J (deepest net, first seed)")
    ax.set(yscale="log", ylim=(1e-4, 1e2))
    var_ax.set(xlabel="depth L", ylabel="var(σ²), mean over seeds", xscale="log", yscale="log")
    var_ax.set_xticks(list(DEPTHS), [str(d) for d in DEPTHS])
    var_ax.minorticks_off()


def _plot_linear(steps_ax: Any, loss_ax: Any, rows: Sequence[LinearRun]) -> None:
    colors = {"orthogonal": "#2ca02c", "gaussian": "#d62728"}
    first_seed = min(r.seed for r in rows)
    ceiling = SAXE_MAX_STEPS * 1.3
    for row in rows:
        color = colors.get(row.init)
        label = row.init if row.seed == first_seed and row.depth == 1 else "_"
        if row.steps is None:
            steps_ax.plot(row.depth, ceiling, marker="x", ms=9, color=color, label=label)
        else:
            steps_ax.plot(row.depth, row.steps, marker="o", color=color, label=label)
        if row.seed == first_seed:
            style = "-" if row.depth == max(SAXE_DEPTHS) else ":"
            loss = [v if v < SAXE_DIVERGED else math.nan for v in row.loss]
            label = f"{row.init}, D = {row.depth}"
            loss_ax.plot(range(1, len(loss) + 1), loss, ls=style, color=color, label=label)
    steps_ax.axhline(ceiling, color="#7f7f7f", lw=0.6, ls="--")
    steps_ax.set(xlabel="hidden layers D", ylabel=f"steps to loss < {SAXE_TARGET} (×: failed)")
    steps_ax.set(xscale="log", yscale="log")
    steps_ax.set_xticks(list(SAXE_DEPTHS), [str(d) for d in SAXE_DEPTHS])
    steps_ax.minorticks_off()
    loss_ax.axhline(SAXE_TARGET, color="#7f7f7f", lw=0.8, ls="--")
    loss_ax.set(xlabel="step + 1 (first seed)", ylabel="training loss", yscale="log")
    loss_ax.set_xscale("log")
