"""Experiment ``selu``: a deep self-normalizing net trains where ReLU under the same init stalls.

Klambauer et al. (2017) chose the constants of SELU, ``λ ≈ 1.0507`` and ``α ≈ 1.6733``, so
that under LeCun's init N(0, 1/n) the map from one layer's (mean, variance) to the next
has a stable, attracting fixed point at (0, 1): the activations normalize themselves
without BatchNorm, and the gradient neither vanishes nor explodes. Their Fig. 1 trains
feed-forward nets of 8, 16 and 32 layers on MNIST and CIFAR-10 without normalization.
The same init halves the variance at every ReLU layer (He et al. 2015).

Setup. 64 → 32 × [Linear(64), activation] → Linear(10) on the bundled digits, every
weight LeCun normal (``gradguard.init.initialize(model, "lecun")``), biases 0,
cross-entropy, SGD with momentum 0.9 at LR 0.005, batches of 64, 500 steps (the reference
setup's). Three activations: SELU, ReLU, and tanh as an extension (a saturating activation is
near-linear at small inputs, so under this init it keeps a variance of order 0.01 and
still trains; there is no claim on it). :func:`gradguard.diagnose.diagnose` probes each
network at init on 256 training images: per-layer mean and variance of the activations,
the gradient ratio between the first and the last layer, and the verdict. The networks
are trained side by side as in the ``initialization`` experiment, whose machinery this
module reuses.

Mean-field numbers (for the criteria): at the fixed point, SELU's
``χ = n·Var[w]·E[f'(h)²] = λ²(½ + α² e² Φ(-2)) ≈ 1.07`` per layer, so the gradient at the
first layer's output is ``χ^(32/2) ≈ 3`` times the last layer's (SELU nets sit slightly
on the expanding side); ReLU's ``χ = ½`` gives ``2^(-16) ≈ 1.5e-5`` and a last-layer
variance of about ``2^(-32)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gradguard.lab._harness import seeds_for, single_thread
from gradguard.lab._records import Claim, Criterion, ExperimentResult, Progress, Table
from gradguard.lab.initialization import (
    CHANCE_LOSS,
    PROBE_SIZE,
    Run,
    Runs,
    Setting,
    cell,
    flush_denormals,
    progress_units,
    run_setting,
)

DEPTH = 32
WIDTH = 64
LR = 0.005
MOMENTUM = 0.9
BATCH_SIZE = 64
STEPS = 500
FULL_SEEDS = 3
INIT = "lecun"

ACTIVATIONS = ("selu", "relu", "tanh")
"""The activations trained, in table order, all under LeCun's init."""

LABELS: Mapping[str, str] = {"selu": "SELU", "relu": "ReLU", "tanh": "tanh (extension)"}

SETTING = Setting(DEPTH, LR, STEPS, tuple((a, INIT) for a in ACTIVATIONS))

SELU_CHI = 1.0507009873554805**2 * (
    0.5 + 1.6732632423543772**2 * math.exp(2) * 0.5 * math.erfc(2 / math.sqrt(2))
)
"""SELU's χ = n·Var[w]·E[f'(h)²] at the fixed point (0, 1) under LeCun init:
λ²(½ + α² e² Φ(-2)) ≈ 1.07."""

SELU_GRADIENT_RATIO = SELU_CHI ** (DEPTH / 2)
"""Mean-field gradient ratio, first layer's output over the last's, for SELU: ≈ 3."""


def _setting_text(n: int) -> str:
    return f"{DEPTH} × {WIDTH}, LeCun init, LR {LR}, {STEPS} steps, {n} seed(s)"


def _init_claims(r: Runs) -> list[Claim]:
    selu, relu = r.of(INIT, DEPTH, "selu"), r.of(INIT, DEPTH, "relu")
    n = len(selu)
    variances = [v for x in selu for v in (min(x.hidden_std) ** 2, max(x.hidden_std) ** 2)]
    return [
        Claim(
            id="selu-unit-variance",
            source="Klambauer et al. 2017 (Theorem 1)",
            statement=(
                "Under LeCun init SELU activations keep unit variance through every layer: "
                "(0, 1) is an attracting fixed point."
            ),
            paper="(mean, var) = (0, 1) is a stable, attracting fixed point of the layer map",
            measured_on=(
                f"smallest and largest variance over the {DEPTH} hidden layers at init, "
                f"on {PROBE_SIZE} images, {_setting_text(n)}"
            ),
            values=tuple(variances),
            criterion=Criterion(low=0.5, high=2.0),
        ),
        Claim(
            id="selu-zero-mean",
            source="Klambauer et al. 2017 (Theorem 1)",
            statement="The last hidden layer's mean stays near the fixed point's 0.",
            paper="fixed point at mean 0",
            measured_on=f"|mean| of the last hidden layer at init, {_setting_text(n)}",
            values=tuple(abs(x.hidden_mean[-1]) for x in selu),
            criterion=Criterion(high=0.2),
        ),
        Claim(
            id="relu-same-init-vanishes",
            source="He et al. 2015 (eq. 10)",
            statement="Under the same init ReLU halves the variance at every layer.",
            paper=f"×½ per layer: 2^-{DEPTH} = {2.0**-DEPTH:.1e} after {DEPTH} (derived)",
            measured_on=f"variance of the last hidden layer at init, ReLU, {_setting_text(n)}",
            values=tuple(x.hidden_std[-1] ** 2 for x in relu),
            criterion=Criterion(high=1e-6),
        ),
    ]


def _gradient_claims(r: Runs) -> list[Claim]:
    selu, relu = r.of(INIT, DEPTH, "selu"), r.of(INIT, DEPTH, "relu")
    n = len(selu)
    return [
        Claim(
            id="selu-gradient-stable",
            source="Klambauer et al. 2017 (Theorems 2, 3)",
            statement=(
                "SELU gradients neither vanish nor explode: the first layer's is within 10× "
                f"of the mean-field χ^(L/2) ≈ {SELU_GRADIENT_RATIO:.2g} times the last's."
            ),
            paper="variance bounds rule out vanishing and exploding gradients",
            measured_on=(
                f"gradguard.diagnose gradient ratio first/last layer output, SELU, "
                f"{_setting_text(n)}"
            ),
            values=tuple(x.gradient_ratio for x in selu),
            criterion=Criterion(low=0.3, high=30.0),  # χ^(L/2) ≈ 3, within a factor 10
            note="diagnose: " + ", ".join(x.verdict for x in selu),
        ),
        Claim(
            id="relu-gradient-vanishes",
            source="He et al. 2015 (eq. 14)",
            statement="Under the same init ReLU's gradient vanishes toward the input.",
            paper=f"×½ per layer in variance: 2^-{DEPTH // 2} = {2.0 ** -(DEPTH // 2):.1e} "
            "in norm (derived)",
            measured_on=(
                f"gradguard.diagnose gradient ratio first/last layer output, ReLU, "
                f"{_setting_text(n)}; its band: 1e-3"
            ),
            values=tuple(x.gradient_ratio for x in relu),
            criterion=Criterion(high=1e-3),
            note="diagnose: " + ", ".join(x.verdict for x in relu),
        ),
    ]


def _training_claims(r: Runs) -> list[Claim]:
    selu, relu = r.of(INIT, DEPTH, "selu"), r.of(INIT, DEPTH, "relu")
    n = len(selu)
    return [
        Claim(
            id="selu-trains",
            source="Klambauer et al. 2017 (Fig. 1)",
            statement="A 32-layer SELU net trains without any normalization layer.",
            paper="SNNs of 8, 16 and 32 layers train on MNIST and CIFAR-10 (loss curves)",
            measured_on=f"final training loss, SELU, {_setting_text(n)}",
            values=tuple(x.final_loss for x in selu),
            criterion=Criterion(high=0.3),
            note="test accuracy " + ", ".join(f"{x.test_accuracy:.3f}" for x in selu),
        ),
        Claim(
            id="relu-same-init-stalls",
            source="He et al. 2015 (Fig. 3); Klambauer et al. 2017",
            statement="The ReLU net of the same depth and init stalls at chance.",
            paper="deep rectifier nets under a variance-halving init stall",
            measured_on=(
                f"final training loss, ReLU, {_setting_text(n)}; chance ln 10 = {CHANCE_LOSS:.3f}"
            ),
            values=tuple(x.final_loss for x in relu),
            criterion=Criterion(low=2.2),
        ),
    ]


def claims(runs: Sequence[Run], seeds: tuple[int, ...]) -> tuple[Claim, ...]:
    """Judge the claims against the runs of every activation and seed."""
    r = Runs(runs, seeds)
    return (*_init_claims(r), *_gradient_claims(r), *_training_claims(r))


def tables(runs: Sequence[Run], seeds: tuple[int, ...]) -> tuple[Table, ...]:
    """One row per activation: init statistics, diagnose, training outcome."""
    r = Runs(runs, seeds)
    spread = "" if len(seeds) == 1 else f"; mean [min, max] over {len(seeds)} seeds"
    rows = []
    for activation in ACTIVATIONS:
        xs = r.of(INIT, DEPTH, activation)
        rows.append(
            (
                LABELS[activation],
                "/".join(sorted({x.verdict for x in xs})),
                cell([x.hidden_mean[-1] for x in xs]),
                cell([x.hidden_std[-1] ** 2 for x in xs]),
                cell([x.gradient_ratio for x in xs]),
                cell([x.final_loss for x in xs]),
                cell([x.test_accuracy for x in xs]),
            )
        )
    return (
        Table(
            title=f"{DEPTH} × {WIDTH} MLPs, LeCun N(0, 1/n) init, SGD momentum {MOMENTUM}, "
            f"LR {LR}, {STEPS} steps{spread}",
            columns=(
                "activation",
                "diagnose",
                "last hidden mean",
                "last hidden var",
                "grad ratio first/last",
                "final train loss",
                "test accuracy",
            ),
            rows=tuple(rows),
            note="At initialization unless stated; diagnose: gradguard.diagnose's verdict.",
        ),
    )


class Selu:
    """The ``selu`` experiment (Klambauer et al. 2017)."""

    name = "selu"
    title = "A 32-layer SELU net self-normalizes and trains; ReLU under the same init stalls"
    references = (
        "Klambauer, Unterthiner, Mayr & Hochreiter 2017, Self-normalizing neural networks "
        "(arXiv 1706.02515)",
        "He, Zhang, Ren & Sun 2015, Delving deep into rectifiers (arXiv 1502.01852)",
    )
    setting = (
        "Paper: 8-32-layer fully connected nets on MNIST/CIFAR-10 and 121 UCI tasks. Here: "
        f"{DEPTH} × {WIDTH} MLPs on 8×8 digits, {STEPS} SGD steps of {BATCH_SIZE} images."
    )

    def run(self, *, quick: bool, seed: int, progress: Progress | None = None) -> ExperimentResult:
        """Probe and train every activation; quick uses 1 seed, full :data:`FULL_SEEDS`."""
        seeds = seeds_for(seed, quick=quick, n_full=FULL_SEEDS)
        total = progress_units(SETTING, len(seeds))
        done = 0

        def tick() -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total)

        start = time.perf_counter()
        with single_thread(), flush_denormals():
            runs = run_setting(SETTING, seeds, tick)
        return ExperimentResult(
            name=self.name,
            title=self.title,
            references=self.references,
            setting=self.setting,
            config={
                "depth": DEPTH,
                "width": WIDTH,
                "init": "LeCun normal N(0, 1/fan_in), biases 0",
                "activations": list(ACTIVATIONS),
                "lr": LR,
                "momentum": MOMENTUM,
                "batch_size": BATCH_SIZE,
                "steps": STEPS,
                "probe_size": PROBE_SIZE,
                "selu_chi": SELU_CHI,
            },
            seeds=seeds,
            claims=claims(runs, seeds),
            tables=tables(runs, seeds),
            measurements=tuple(x.to_dict() for x in runs),
            duration_s=time.perf_counter() - start,
        )


EXPERIMENT = Selu()

_COLORS = {"selu": "#9467bd", "relu": "#1f77b4", "tanh": "#ff7f0e"}


def _log_values(values: Sequence[Any]) -> list[float]:
    out = []
    for v in values:
        x = float(v)
        out.append(x if x > 0 and math.isfinite(x) else math.nan)
    return out


def plot(experiment_data: Mapping[str, Any], out_dir: Path) -> Path:
    """Per-layer variance and mean at init, per-layer gradient at init, training loss.

    Every seed is drawn, one colour per activation.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = experiment_data["measurements"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    (var_ax, mean_ax), (grad_ax, loss_ax) = axes
    labelled: set[str] = set()
    for row in rows:
        act = row["activation"]
        style = {"color": _COLORS.get(act), "lw": 1, "alpha": 0.8}
        label = {"label": LABELS.get(act, act)} if act not in labelled else {}
        labelled.add(act)
        variance = [float(s) ** 2 for s in row["hidden_std"]]
        layers = range(1, len(variance) + 1)
        var_ax.plot(layers, _log_values(variance), marker=".", **style, **label)
        mean_ax.plot(layers, [float(m) for m in row["hidden_mean"]], marker=".", **style)
        rel = _log_values(row["relative_grad"])
        grad_ax.plot(range(1, len(rel) + 1), rel, marker=".", **style)
        loss_ax.plot(row["log_steps"], _log_values(row["loss"]), **style)
    var_ax.set(xlabel="hidden layer", ylabel="activation variance at init", yscale="log")
    var_ax.axhspan(0.5, 2.0, color="#9467bd", alpha=0.1, lw=0)
    mean_ax.set(xlabel="hidden layer", ylabel="activation mean at init")
    grad_ax.set(xlabel="Linear layer", ylabel="output gradient / last layer's", yscale="log")
    loss_ax.set(xlabel="step", ylabel="batch loss", yscale="log")
    loss_ax.axhline(CHANCE_LOSS, color="#7f7f7f", ls="--", lw=0.8)
    for ax in axes.flat:
        ax.grid(True, which="major", alpha=0.3)
    var_ax.legend(fontsize=8)
    fig.suptitle(f"{DEPTH}-layer MLPs on digits under LeCun init: SELU self-normalizes")
    fig.tight_layout()
    path = out_dir / "selu.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
