"""Experiment ``selu``: a deep self-normalizing net trains where ReLU under the same init stalls.

Under LeCun init a 32-layer SELU net keeps unit variance and trains; ReLU vanishes
(Klambauer et al. 2017). See docs/lab/selu.md for the setup, the papers' numbers and the
criteria.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from gradguard.lab._figures import finish, new_figure, positive_or_nan
from gradguard.lab._harness import LabExperiment, Ticker
from gradguard.lab._records import Claim, Criterion, Table, cell
from gradguard.lab._stacked import BATCH_SIZE, MOMENTUM, PROBE_SIZE
from gradguard.lab.initialization import (
    CHANCE_LOSS,
    Run,
    Runs,
    Setting,
    progress_units,
    run_setting,
    stacked_config,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DEPTH = 32
WIDTH = 64
LR = 0.005
STEPS = 500
INIT = "lecun"

ACTIVATIONS = ("selu", "relu", "tanh")
"""The activations trained, in table order, all under LeCun's init."""

LABELS: Mapping[str, str] = {"selu": "SELU", "relu": "ReLU", "tanh": "tanh (extension)"}
_COLORS = {"selu": "#9467bd", "relu": "#1f77b4", "tanh": "#ff7f0e"}

SETTING = Setting(DEPTH, LR, STEPS, tuple((a, INIT) for a in ACTIVATIONS))

SELU_CHI = 1.0507009873554805**2 * (
    0.5 + 1.6732632423543772**2 * math.exp(2) * 0.5 * math.erfc(2 / math.sqrt(2))
)
"""SELU's χ = n·Var[w]·E[f'(h)²] at the fixed point (0, 1) under LeCun init: ≈ 1.07."""

SELU_GRADIENT_RATIO = SELU_CHI ** (DEPTH / 2)
"""Mean-field gradient ratio, first layer's output over the last's, for SELU: ≈ 3."""


def _verdicts(runs: Sequence[Run]) -> str:
    return "diagnose: " + ", ".join(x.verdict for x in runs)


def _accuracies(runs: Sequence[Run]) -> str:
    return "test accuracy " + ", ".join(f"{x.test_accuracy:.3f}" for x in runs)


_RATIO = "gradguard.diagnose gradient ratio first/last layer output"
_CLAIMS = (
    (
        "selu-unit-variance",
        "Klambauer et al. 2017 (Theorem 1)",
        "Under LeCun init SELU activations keep unit variance through every layer: "
        "(0, 1) is an attracting fixed point.",
        "(mean, var) = (0, 1) is a stable, attracting fixed point of the layer map",
        f"smallest and largest variance over the {DEPTH} hidden layers at init, "
        f"on {PROBE_SIZE} images, {{on}}",
        (
            "selu",
            lambda x: (min(x.hidden_std) ** 2, max(x.hidden_std) ** 2),
            Criterion(low=0.5, high=2.0),
            None,
        ),
    ),
    (
        "selu-zero-mean",
        "Klambauer et al. 2017 (Theorem 1)",
        "The last hidden layer's mean stays near the fixed point's 0.",
        "fixed point at mean 0",
        "|mean| of the last hidden layer at init, {on}",
        ("selu", lambda x: (abs(x.hidden_mean[-1]),), Criterion(high=0.2), None),
    ),
    (
        "relu-same-init-vanishes",
        "He et al. 2015 (eq. 10)",
        "Under the same init ReLU halves the variance at every layer.",
        f"×½ per layer: 2^-{DEPTH} = {2.0**-DEPTH:.1e} after {DEPTH} (derived)",
        "variance of the last hidden layer at init, ReLU, {on}",
        ("relu", lambda x: (x.hidden_std[-1] ** 2,), Criterion(high=1e-6), None),
    ),
    (
        "selu-gradient-stable",
        "Klambauer et al. 2017 (Theorems 2, 3)",
        "SELU gradients neither vanish nor explode: the first layer's is within 10× "
        f"of the mean-field χ^(L/2) ≈ {SELU_GRADIENT_RATIO:.2g} times the last's.",
        "variance bounds rule out vanishing and exploding gradients",
        _RATIO + ", SELU, {on}",
        # χ^(L/2) ≈ 3, within a factor 10
        ("selu", lambda x: (x.gradient_ratio,), Criterion(low=0.3, high=30.0), _verdicts),
    ),
    (
        "relu-gradient-vanishes",
        "He et al. 2015 (eq. 14)",
        "Under the same init ReLU's gradient vanishes toward the input.",
        f"×½ per layer in variance: 2^-{DEPTH // 2} = {2.0 ** -(DEPTH // 2):.1e} in norm (derived)",
        _RATIO + ", ReLU, {on}; its band: 1e-3",
        ("relu", lambda x: (x.gradient_ratio,), Criterion(high=1e-3), _verdicts),
    ),
    (
        "selu-trains",
        "Klambauer et al. 2017 (Fig. 1)",
        "A 32-layer SELU net trains without any normalization layer.",
        "SNNs of 8, 16 and 32 layers train on MNIST and CIFAR-10 (loss curves)",
        "final training loss, SELU, {on}",
        ("selu", lambda x: (x.final_loss,), Criterion(high=0.3), _accuracies),
    ),
    (
        "relu-same-init-stalls",
        "He et al. 2015 (Fig. 3); Klambauer et al. 2017",
        "The ReLU net of the same depth and init stalls at chance.",
        "deep rectifier nets under a variance-halving init stall",
        "final training loss, ReLU, {on}; chance ln 10 = " + f"{CHANCE_LOSS:.3f}",
        ("relu", lambda x: (x.final_loss,), Criterion(low=2.2), None),
    ),
)
"""id, source, statement, paper, what is measured (``{on}``: the setting), (activation, the
values of one run, criterion, the note on the runs (None: no note))."""


def _claims(r: Runs) -> tuple[Claim, ...]:
    on = f"{DEPTH} × {WIDTH}, LeCun init, LR {LR}, {STEPS} steps, {len(r.seeds)} seed(s)"
    found = []
    for claim_id, source, statement, paper, measured, (activation, value, crit, note) in _CLAIMS:
        runs = r.of(INIT, DEPTH, activation)
        values = tuple(v for x in runs for v in value(x))
        text = "" if note is None else note(runs)
        found.append(
            Claim(claim_id, source, statement, paper, measured.format(on=on), values, crit, text)
        )
    return tuple(found)


class Selu(LabExperiment):
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
    record_type = Run
    denormals = True

    def config(self, quick: bool) -> dict[str, Any]:
        """The same in both variants: every activation is probed and trained."""
        return {
            **stacked_config(SETTING),
            "init": "LeCun normal N(0, 1/fan_in), biases 0",
            "activations": list(ACTIVATIONS),
            "selu_chi": SELU_CHI,
        }

    def units(self, quick: bool, seeds: tuple[int, ...]) -> int:
        """Probes and training ticks."""
        return progress_units(SETTING, len(seeds))

    def measure(self, quick: bool, seeds: tuple[int, ...], tick: Ticker) -> list[Run]:
        """Probe and train every activation, side by side."""
        return run_setting(SETTING, seeds, tick)

    def claims(self, records: Sequence[Run], seeds: tuple[int, ...]) -> tuple[Claim, ...]:
        """Unit variance and zero mean at init, stable gradients, training; ReLU against."""
        return _claims(Runs(records, seeds))

    def tables(self, records: Sequence[Run], seeds: tuple[int, ...]) -> tuple[Table, ...]:
        """One row per activation: init statistics, diagnose, training outcome."""
        r = Runs(records, seeds)
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
        columns = ("activation", "diagnose", "last hidden mean", "last hidden var")
        return (
            Table(
                title=f"{DEPTH} × {WIDTH} MLPs, LeCun N(0, 1/n) init, SGD momentum {MOMENTUM}, "
                f"LR {LR}, {STEPS} steps{spread}",
                columns=(*columns, "grad ratio first/last", "final train loss", "test accuracy"),
                rows=tuple(rows),
                note="At initialization unless stated; diagnose: gradguard.diagnose's verdict.",
            ),
        )

    def figure(self, records: Sequence[Run], data: Mapping[str, Any]) -> Figure:
        """Per-layer variance and mean, per-layer gradient at init; training loss; every seed."""
        fig, axes = new_figure(2, 2, figsize=(12, 8))
        (var_ax, mean_ax), (grad_ax, loss_ax) = axes
        labelled: set[str] = set()
        for row in records:
            act = row.activation
            style = {"color": _COLORS.get(act), "lw": 1, "alpha": 0.8}
            label = {"label": LABELS.get(act, act)} if act not in labelled else {}
            labelled.add(act)
            variance = [s**2 for s in row.hidden_std]
            layers = range(1, len(variance) + 1)
            var_ax.plot(layers, positive_or_nan(variance), marker=".", **style, **label)
            mean_ax.plot(layers, list(row.hidden_mean), marker=".", **style)
            rel = positive_or_nan(row.relative_grad)
            grad_ax.plot(range(1, len(rel) + 1), rel, marker=".", **style)
            loss_ax.plot(row.log_steps, positive_or_nan(row.loss), **style)
        var_ax.set(xlabel="hidden layer", ylabel="activation variance at init", yscale="log")
        var_ax.axhspan(0.5, 2.0, color="#9467bd", alpha=0.1, lw=0)
        mean_ax.set(xlabel="hidden layer", ylabel="activation mean at init")
        grad_ax.set(xlabel="Linear layer", ylabel="output gradient / last layer's", yscale="log")
        loss_ax.set(xlabel="step", ylabel="batch loss", yscale="log")
        loss_ax.axhline(CHANCE_LOSS, color="#7f7f7f", ls="--", lw=0.8)
        var_ax.legend(fontsize=8)
        title = f"{DEPTH}-layer MLPs on digits under LeCun init: SELU self-normalizes"
        return finish(fig, title, axes.flat)


EXPERIMENT = Selu()
claims = EXPERIMENT.claims  # judges stored records too: ``claims(runs, seeds)``
