"""Experiment ``isometry``: Jacobian spectra of deep nets, and depth-free learning in linear nets.

Pennington, Schoenholz & Ganguli (2017) computed the whole singular value spectrum of a
deep net's input-output Jacobian ``J = Π D_l W_l`` with free probability. At criticality
(``χ = σ_w²·E[φ'(h)²] = 1``) its mean squared singular value is 1, but its *spread* grows
with depth for Gaussian weights, and for ReLU whatever the weights; only orthogonal
weights with tanh at a small pre-activation variance ``q*`` keep the spread O(1) at any
depth ("dynamical isometry"), and such nets trained much faster. Saxe, McClelland & Ganguli
(2014) had found the linear case: a deep *linear* net with orthogonal weights is an exact
isometry, and its learning time does not grow with depth, where scaled Gaussian weights
slow down.

Part 1, spectra. Networks of ``L`` layers ``x_l = φ(W_l x_{l-1} + b_l)`` of width N = 256,
for L = 4, 16, 64 (the first L layers of one 64-layer net), weights N(0, σ_w²/N) or σ_w
times a random orthogonal matrix, biases N(0, σ_b²), input x ~ N(0, q* I) (data seed
``1000 + seed``). Seven networks: linear Gaussian and orthogonal (σ_w = 1); tanh Gaussian
and orthogonal on the critical line at q* = 1/64, and orthogonal at q* = 1 (the point
(σ_w, σ_b) solved by Gauss-Hermite quadrature from ``σ_w² E[φ'(√q* z)²] = 1`` and
``q* = σ_w² E[φ(√q* z)²] + σ_b²``); ReLU He-Gaussian and ReLU orthogonal × √2. The
singular values of ``J`` at one input come from :func:`gradguard._jacobian.estimate`, the
estimator behind :func:`gradguard.diagnose.diagnose`, in its exact mode (``top = N``: the
Jacobian is formed from N basis vectors and passed to ``svdvals``). ``diagnose`` itself,
with its default randomized estimate (subspace iteration, 20 iterations), is run on the
64-layer nets and compared with the exact σ_max.

Part 2, learning time (Saxe et al.). A deep linear net 64 → D × 64 → 10 without biases
maps the standardized digits to one-hot targets; the loss is the squared error summed
over the 10 outputs and averaged over the 1,437 training images (least-squares optimum
0.407; 1.0 at a zero output). Full-batch gradient descent at LR 0.005 runs until the loss
is below 0.5 (at most 1,000 steps; a loss above 10⁶ or non-finite is a divergence), for D
= 1, 8, 32 hidden layers, weights orthogonal (``gradguard.init.initialize(net,
"orthogonal")``: gain 1 in a linear net) or N(0, 1/n) (``"lecun"``). Full-batch GD
sees the data only through ``XᵀX`` and ``XᵀY``, so each step uses the thin QR factorization
``X = QR``: ``‖X Wᵀ - Y‖² = ‖R Wᵀ - QᵀY‖² + ‖Y‖² - ‖QᵀY‖²``, the same loss and gradient from
a 64-row problem, about 20 times cheaper.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gradguard import _jacobian
from gradguard import init as gg_init
from gradguard.diagnose import diagnose
from gradguard.lab._harness import data_generator, seeds_for, single_thread
from gradguard.lab._records import (
    Claim,
    Criterion,
    ExperimentResult,
    Progress,
    Table,
)
from gradguard.lab.data import N_CLASSES, N_FEATURES, N_TRAIN, load_digits
from gradguard.lab.initialization import cell, share

N = 256
DEPTHS = (4, 16, 64)
DIAGNOSE_BATCH = 8
FULL_SEEDS = 3

SAXE_DEPTHS = (1, 8, 32)
SAXE_WIDTH = 64
SAXE_LR = 0.005
SAXE_TARGET = 0.5
SAXE_MAX_STEPS = 1000
SAXE_DIVERGED = 1e6
SAXE_INITS = ("orthogonal", "gaussian")
SAXE_SCHEMES: Mapping[str, str] = {"orthogonal": "orthogonal", "gaussian": "lecun"}


def tanh_critical_point(q: float, points: int = 101) -> tuple[float, float]:
    """Return (σ_w, σ_b) of the tanh critical line at pre-activation variance ``q``.

    Solves ``σ_w² E[tanh'(√q z)²] = 1`` (χ = 1) and ``q = σ_w² E[tanh(√q z)²] + σ_b²``
    (``q`` is the fixed point) with Gauss-Hermite quadrature, z ~ N(0, 1).

    Example:
        >>> [round(v, 3) for v in tanh_critical_point(1.0)]
        [1.467, 0.389]
    """
    z, w = np.polynomial.hermite_e.hermegauss(points)
    w = w / w.sum()
    t = np.tanh(math.sqrt(q) * z)
    sw2 = 1.0 / float(np.sum(w * (1 - t**2) ** 2))
    sb2 = q - sw2 * float(np.sum(w * t**2))
    return math.sqrt(sw2), math.sqrt(max(sb2, 0.0))


@dataclass(frozen=True)
class Network:
    """One family of deep networks of Part 1.

    Attributes:
        name: identifier, e.g. ``tanh-orthogonal``.
        label: for tables and plots.
        activation: ``linear``, ``tanh`` or ``relu``.
        weights: ``gaussian`` or ``orthogonal``.
        sigma_w: weight scale (std × √N for Gaussian, gain for orthogonal).
        sigma_b: bias std.
        q: input variance per unit.
    """

    name: str
    label: str
    activation: str
    weights: str
    sigma_w: float
    sigma_b: float
    q: float


_SMALL_Q = 1 / 64
_SW_SMALL, _SB_SMALL = tanh_critical_point(_SMALL_Q)
_SW_ONE, _SB_ONE = tanh_critical_point(1.0)

NETWORKS: tuple[Network, ...] = (
    Network("linear-gaussian", "linear, Gaussian", "linear", "gaussian", 1.0, 0.0, 1.0),
    Network("linear-orthogonal", "linear, orthogonal", "linear", "orthogonal", 1.0, 0.0, 1.0),
    Network(
        "tanh-gaussian",
        "tanh, Gaussian, q* = 1/64",
        "tanh",
        "gaussian",
        _SW_SMALL,
        _SB_SMALL,
        _SMALL_Q,
    ),
    Network(
        "tanh-orthogonal",
        "tanh, orthogonal, q* = 1/64",
        "tanh",
        "orthogonal",
        _SW_SMALL,
        _SB_SMALL,
        _SMALL_Q,
    ),
    Network(
        "tanh-orthogonal-q1",
        "tanh, orthogonal, q* = 1",
        "tanh",
        "orthogonal",
        _SW_ONE,
        _SB_ONE,
        1.0,
    ),
    Network("relu-gaussian", "ReLU, He-Gaussian", "relu", "gaussian", math.sqrt(2), 0.0, 1.0),
    Network(
        "relu-orthogonal", "ReLU, orthogonal × √2", "relu", "orthogonal", math.sqrt(2), 0.0, 1.0
    ),
)
"""The networks of Part 1, in table order."""

_ACTIVATIONS: Mapping[str, Callable[[], nn.Module]] = {
    "linear": nn.Identity,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
}


# --- Part 1: spectra ---------------------------------------------------------------------------


def build_network(network: Network, depth: int, seed: int) -> nn.Sequential:
    """Return ``depth`` layers of ``network``'s family drawn from model seed ``seed``.

    The layers are drawn in order from one generator, so a shallower net is the first
    layers of a deeper one.
    """
    generator = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth):
        linear = nn.Linear(N, N, device="meta").to_empty(device="cpu")
        with torch.no_grad():
            if network.weights == "orthogonal":
                nn.init.orthogonal_(linear.weight, gain=network.sigma_w, generator=generator)
            else:
                nn.init.normal_(
                    linear.weight, 0.0, network.sigma_w / math.sqrt(N), generator=generator
                )
            nn.init.normal_(linear.bias, 0.0, network.sigma_b, generator=generator)
        layers += [linear, _ACTIVATIONS[network.activation]()]
    return nn.Sequential(*layers)


def network_input(network: Network, seed: int) -> Tensor:
    """``DIAGNOSE_BATCH`` inputs ~ N(0, q* I) from data seed ``1000 + seed``; row 0 is probed."""
    z = torch.randn(DIAGNOSE_BATCH, N, generator=data_generator(seed))
    return z * math.sqrt(network.q)


def singular_values(model: nn.Module, x: Tensor, seed: int) -> Tensor:
    """All singular values of the Jacobian of ``model`` at ``x`` (one row), descending.

    :func:`gradguard._jacobian.estimate` with ``top`` equal to the width forms the Jacobian
    exactly from basis vectors (its exact mode) and returns every singular value.
    """
    spectrum = _jacobian.estimate(model, [x], samples=1, top=N, probes=1, seed=seed)
    if not spectrum.exact:  # the estimator's own rule: min(m, n) <= top + probes
        raise RuntimeError("expected the exact Jacobian")
    return torch.tensor(spectrum.top, dtype=torch.float64)


@dataclass(frozen=True)
class Spectrum:
    """The Jacobian spectrum of one network at one depth and seed.

    Attributes:
        network: a :class:`Network` name.
        depth: layers.
        seed: model seed.
        mean_sq: mean of σ² (1 at isometry).
        var_sq: variance of σ² (0 at isometry): the spread.
        sigma_max: the largest singular value.
        sigma_min: the smallest singular value.
        singular_values: all of them, descending (kept at the deepest depth only).
        diagnose_sigma_max: ``diagnose``'s randomized estimate of σ_max (deepest depth).
        diagnose_mean_sq: ``diagnose``'s estimate of the mean σ² (deepest depth).
        diagnose_verdict: ``diagnose``'s verdict (deepest depth).
    """

    network: str
    depth: int
    seed: int
    mean_sq: float
    var_sq: float
    sigma_max: float
    sigma_min: float
    singular_values: tuple[float, ...]
    diagnose_sigma_max: float | None
    diagnose_mean_sq: float | None
    diagnose_verdict: str | None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dictionary (with ``part: "spectrum"``)."""
        record = asdict(self)
        record["singular_values"] = list(self.singular_values)
        return {"part": "spectrum", **record}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Spectrum:
        """Rebuild from :meth:`to_dict` output, e.g. read back from results.json."""
        fields = {k: v for k, v in record.items() if k != "part"}
        for key in ("mean_sq", "var_sq", "sigma_max", "sigma_min"):
            fields[key] = float(fields[key])
        for key in ("diagnose_sigma_max", "diagnose_mean_sq"):
            fields[key] = None if fields[key] is None else float(fields[key])
        fields["singular_values"] = tuple(float(v) for v in fields["singular_values"])
        return cls(**fields)


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
    """The digits regression as a 64-row least-squares problem (see the module docstring)."""

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
class LinearRun:
    """One deep linear net trained by full-batch gradient descent.

    Attributes:
        init: ``orthogonal`` or ``gaussian``.
        depth: hidden layers.
        seed: model seed.
        steps: updates until the loss was first below :data:`SAXE_TARGET`; None if never.
        outcome: ``reached``, ``diverged`` or ``not reached`` (in :data:`SAXE_MAX_STEPS`).
        loss: the loss before each update, then the last one.
    """

    init: str
    depth: int
    seed: int
    steps: int | None
    outcome: str
    loss: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dictionary (with ``part: "linear"``)."""
        return {"part": "linear", **asdict(self), "loss": list(self.loss)}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> LinearRun:
        """Rebuild from :meth:`to_dict` output, e.g. read back from results.json."""
        fields = {k: v for k, v in record.items() if k != "part"}
        fields["loss"] = tuple(float(v) for v in fields["loss"])
        return cls(**fields)


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


# --- claims ------------------------------------------------------------------------------------


class Results:
    """The spectra and linear runs of one experiment, indexed."""

    def __init__(
        self, spectra: Sequence[Spectrum], linear: Sequence[LinearRun], seeds: tuple[int, ...]
    ) -> None:
        self.spectra = {(s.network, s.depth, s.seed): s for s in spectra}
        self.linear = {(r.init, r.depth, r.seed): r for r in linear}
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


def _spectrum_on(network: str, n: int) -> str:
    label = next(x.label for x in NETWORKS if x.name == network)
    return f"{label}, L = {max(DEPTHS)}, N = {N}, exact SVD of J at one input, {n} seed(s)"


def _isometry_claims(r: Results) -> list[Claim]:
    n = len(r.seeds)
    return [
        Claim(
            id="orthogonal-tanh-isometric",
            source="Pennington et al. 2017",
            statement="Orthogonal tanh nets at criticality and small q* keep the spread of J's "
            "squared singular values O(1) at any depth: dynamical isometry.",
            paper="var(σ²) of JJᵀ stays O(1) with depth (qualitative, Fig. 2)",
            measured_on="var(σ²), " + _spectrum_on("tanh-orthogonal", n),
            values=r.var_sq("tanh-orthogonal"),
            criterion=Criterion(high=0.5),
        ),
        Claim(
            id="orthogonal-tanh-sigma-max",
            source="Pennington et al. 2017",
            statement="Their largest singular value stays near 1.",
            paper="σ_max stays O(1) with depth (qualitative)",
            measured_on="σ_max, " + _spectrum_on("tanh-orthogonal", n),
            values=r.sigma_max("tanh-orthogonal"),
            criterion=Criterion(high=2.0),
        ),
        Claim(
            id="linear-orthogonal-exact",
            source="Saxe et al. 2014",
            statement="A deep linear net with orthogonal weights is an exact isometry.",
            paper="every singular value of the end-to-end map is 1",
            measured_on="var(σ²), " + _spectrum_on("linear-orthogonal", n),
            values=r.var_sq("linear-orthogonal"),
            criterion=Criterion(high=1e-6),
        ),
    ]


def _spread_claims(r: Results) -> list[Claim]:
    n = len(r.seeds)
    shallow, deep = min(DEPTHS), max(DEPTHS)
    growth = tuple(
        d / s
        for d, s in zip(
            r.var_sq("linear-gaussian", deep), r.var_sq("linear-gaussian", shallow), strict=True
        )
    )
    return [
        Claim(
            id="gaussian-tanh-spread",
            source="Pennington et al. 2017",
            statement="Gaussian weights at the same critical point spread the spectrum with depth.",
            paper="var(σ²) grows linearly with L for Gaussian weights (qualitative)",
            measured_on="var(σ²), " + _spectrum_on("tanh-gaussian", n),
            values=r.var_sq("tanh-gaussian"),
            criterion=Criterion(low=5.0),
        ),
        Claim(
            id="gaussian-tanh-sigma-max",
            source="Pennington et al. 2017",
            statement="Their largest singular value grows well above 1.",
            paper="σ_max grows with depth for Gaussian weights (qualitative)",
            measured_on="σ_max, " + _spectrum_on("tanh-gaussian", n),
            values=r.sigma_max("tanh-gaussian"),
            criterion=Criterion(low=3.0),
        ),
        Claim(
            id="relu-orthogonal-spread",
            source="Pennington et al. 2017",
            statement="ReLU nets cannot be isometric, even with orthogonal weights.",
            paper="ReLU: var(σ²) grows with L for any weights (qualitative)",
            measured_on="var(σ²), " + _spectrum_on("relu-orthogonal", n),
            values=r.var_sq("relu-orthogonal"),
            criterion=Criterion(low=5.0),
        ),
        Claim(
            id="large-q-not-isometric",
            source="Pennington et al. 2017",
            statement="Orthogonal tanh at a large q* = 1 is critical but not isometric.",
            paper="isometry needs small q*; the spread grows with q* (qualitative)",
            measured_on="var(σ²), " + _spectrum_on("tanh-orthogonal-q1", n),
            values=r.var_sq("tanh-orthogonal-q1"),
            criterion=Criterion(low=2.0),
        ),
        Claim(
            id="linear-gaussian-spread-grows",
            source="Pennington et al. 2017; Saxe et al. 2014",
            statement="For a product of Gaussian matrices the spread grows with depth.",
            paper=f"var(σ²) = L as N → ∞: ×{deep // shallow} from L = {shallow} to {deep}",
            measured_on=(
                f"var(σ²) at L = {deep} over var(σ²) at L = {shallow}, linear Gaussian, "
                f"N = {N}, {n} seed(s)"
            ),
            values=growth,
            criterion=Criterion(low=4.0),
        ),
    ]


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
        measured_on=(
            f"|σ_max(diagnose) / σ_max(exact) - 1|, the {len(NETWORKS)} networks at L = "
            f"{max(DEPTHS)}, {len(r.seeds)} seed(s)"
        ),
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
            measured_on=(
                f"share of seeds where the Gaussian net at D = {deep} is slower than the "
                f"orthogonal one or fails (pass: more than half), {setting}"
            ),
            values=(share(relative, Criterion(high=1.0)),),
            criterion=Criterion(low=0.5),
            note=f"Gaussian steps D = {deep}: {_steps_text(gauss_deep)}",
        ),
    ]


def claims(
    spectra: Sequence[Spectrum], linear: Sequence[LinearRun], seeds: tuple[int, ...]
) -> tuple[Claim, ...]:
    """Judge the claims against every spectrum and linear run."""
    r = Results(spectra, linear, seeds)
    return (*_isometry_claims(r), *_spread_claims(r), _diagnose_claim(r), *_saxe_claims(r))


def tables(
    spectra: Sequence[Spectrum], linear: Sequence[LinearRun], seeds: tuple[int, ...]
) -> tuple[Table, ...]:
    """The spectrum table and the learning-time table."""
    r = Results(spectra, linear, seeds)
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
    linear_rows = [
        (init, *(_steps_text(r.runs(init, d)) for d in SAXE_DEPTHS)) for init in SAXE_INITS
    ]
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
            rows=tuple(linear_rows),
            note=f"Least-squares optimum {least_squares_optimum():.3f}; at most "
            f"{SAXE_MAX_STEPS} steps.",
        ),
    )


# --- the experiment ----------------------------------------------------------------------------


class Isometry:
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

    def run(self, *, quick: bool, seed: int, progress: Progress | None = None) -> ExperimentResult:
        """Measure every spectrum and train every linear net; quick uses 1 seed."""
        seeds = seeds_for(seed, quick=quick, n_full=FULL_SEEDS)
        data = regression()
        jobs: list[tuple[Network | str, int, int]] = [
            *((net, 0, s) for s in seeds for net in NETWORKS),
            *((i, d, s) for s in seeds for i in SAXE_INITS for d in SAXE_DEPTHS),
        ]
        spectra: list[Spectrum] = []
        linear: list[LinearRun] = []
        start = time.perf_counter()
        with single_thread():
            for done, (what, depth, s) in enumerate(jobs, start=1):
                if isinstance(what, Network):
                    spectra += measure_spectra(what, s)
                else:
                    linear.append(train_linear(data, what, depth, s))
                if progress is not None:
                    progress(done, len(jobs))
        return ExperimentResult(
            name=self.name,
            title=self.title,
            references=self.references,
            setting=self.setting,
            config={
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
            },
            seeds=seeds,
            claims=claims(spectra, linear, seeds),
            tables=tables(spectra, linear, seeds),
            measurements=tuple([s.to_dict() for s in spectra] + [x.to_dict() for x in linear]),
            duration_s=time.perf_counter() - start,
        )


EXPERIMENT = Isometry()


# --- the figure --------------------------------------------------------------------------------

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


def _plot_spectra(ax: Any, var_ax: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    first_seed = min(r["seed"] for r in rows)
    for row in rows:
        if row["seed"] == first_seed and row["singular_values"]:
            values = [float(v) for v in row["singular_values"]]
            rank = [(i + 0.5) / len(values) for i in range(len(values))]
            ax.plot(
                rank,
                values,
                color=_COLORS.get(row["network"]),
                lw=1.2,
                label=_LABELS.get(row["network"], row["network"]),
            )
    for network in dict.fromkeys(r["network"] for r in rows):
        depths = sorted({r["depth"] for r in rows if r["network"] == network})
        means = [
            max(
                statistics.fmean(
                    float(r["var_sq"]) for r in rows if r["network"] == network and r["depth"] == d
                ),
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


def _plot_linear(steps_ax: Any, loss_ax: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    colors = {"orthogonal": "#2ca02c", "gaussian": "#d62728"}
    first_seed = min(r["seed"] for r in rows)
    ceiling = SAXE_MAX_STEPS * 1.3
    for row in rows:
        color = colors.get(row["init"])
        label = row["init"] if row["seed"] == first_seed and row["depth"] == 1 else "_"
        if row["steps"] is None:
            steps_ax.plot(row["depth"], ceiling, marker="x", ms=9, color=color, label=label)
        else:
            steps_ax.plot(row["depth"], row["steps"], marker="o", color=color, label=label)
        if row["seed"] == first_seed:
            style = "-" if row["depth"] == max(SAXE_DEPTHS) else ":"
            loss = [float(v) if float(v) < SAXE_DIVERGED else math.nan for v in row["loss"]]
            label = f"{row['init']}, D = {row['depth']}"
            loss_ax.plot(range(1, len(loss) + 1), loss, ls=style, color=color, label=label)
    steps_ax.axhline(ceiling, color="#7f7f7f", lw=0.6, ls="--")
    steps_ax.set(xlabel="hidden layers D", ylabel=f"steps to loss < {SAXE_TARGET} (×: failed)")
    steps_ax.set(xscale="log", yscale="log")
    steps_ax.set_xticks(list(SAXE_DEPTHS), [str(d) for d in SAXE_DEPTHS])
    steps_ax.minorticks_off()
    loss_ax.axhline(SAXE_TARGET, color="#7f7f7f", lw=0.8, ls="--")
    loss_ax.set(xlabel="step + 1 (first seed)", ylabel="training loss", yscale="log")
    loss_ax.set_xscale("log")


def plot(experiment_data: Mapping[str, Any], out_dir: Path) -> Path:
    """Spectra at the deepest depth, spread against depth, and the deep linear nets' timing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = experiment_data["measurements"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    _plot_spectra(axes[0][0], axes[0][1], [r for r in rows if r["part"] == "spectrum"])
    _plot_linear(axes[1][0], axes[1][1], [r for r in rows if r["part"] == "linear"])
    for ax in axes.flat:
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Dynamical isometry: Jacobian spectra (top) and deep linear nets (bottom)")
    fig.tight_layout()
    path = out_dir / "isometry.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
