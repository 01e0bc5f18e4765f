"""Experiment ``early-stopping``: the Divergence detector stops a run before it reaches NaN.

An LR range test heads to NaN; the guard's default detectors ask it to stop first and stay
quiet on a healthy run (Prechelt 1998; Smith 2017). See docs/lab/early-stopping.md for the
setup, the papers' numbers and the criteria.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gradguard.guard import Guard
from gradguard.lab._figures import new_figure, positive_or_nan
from gradguard.lab._harness import LabExperiment
from gradguard.lab._records import BySeed, Claim, Criterion, Table, TracedRun, format_value
from gradguard.lab._training import Recorder, train_loop
from gradguard.lab.recovery import MODEL_TEXT, TASK_CONFIG, build_model, regression
from gradguard.records import StepReport

if TYPE_CHECKING:
    from matplotlib.figure import Figure

LR = 0.1
RAMP = 0.002
ABRUPT_LR = 2.0
MAX_STEPS = 1000
HEALTHY_STEPS = 500
LOG_EVERY = 10

ARMS = ("ramp", "healthy", "abrupt")
ARM_LABELS: Mapping[str, str] = {
    "ramp": f"LR {LR:g} + {RAMP:g}·t (range test)",
    "healthy": f"LR {LR:g} constant",
    "abrupt": f"LR {ABRUPT_LR:g} constant",
}


def lr_at(arm: str, step: int) -> float:
    """The learning rate of optimizer step ``step`` (from 1) in ``arm``.

    Example:
        >>> [round(lr_at("ramp", s), 3) for s in (1, 2, 451)], lr_at("healthy", 451)
        ([0.1, 0.102, 1.0], 0.1)
    """
    if arm == "ramp":
        return LR + RAMP * (step - 1)
    return ABRUPT_LR if arm == "abrupt" else LR


@dataclass(frozen=True)
class Run(TracedRun):
    """One arm of one seed."""

    stop_step: int | None
    """The step after which ``guard.should_stop`` was first True, or None."""
    divergence_onset: int | None
    """The onset step the divergence event names, or None."""
    nonfinite_step: int | None
    """The first step whose loss or gradient (norm) was not finite (overflows come earlier)."""
    best_loss: float
    """The lowest batch loss before the stop (or the end)."""
    lr: tuple[float, ...]

    @property
    def lead(self) -> float:
        """Steps from the stop to the first non-finite step; NaN if either is missing."""
        if self.stop_step is None or self.nonfinite_step is None:
            return math.nan
        return float(self.nonfinite_step - self.stop_step)

    def first(self, kind: str) -> int | None:
        """The step of the first event of ``kind``, or None."""
        return min((int(e["step"]) for e in self.events if e["kind"] == kind), default=None)


def train(arm: str, seed: int) -> Run:
    """Train one arm until its first non-finite step (or the step budget) and measure."""
    data = regression(seed)
    model = build_model(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr_at(arm, 1))
    recorder = Recorder()
    guard = Guard(model, optimizer, log_every=LOG_EVERY, sinks=[recorder])
    stop_step = nonfinite_step = None

    def set_lr(step: int) -> None:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(arm, step)

    def after(step: int, loss: Tensor, report: StepReport | None) -> bool:
        nonlocal stop_step, nonfinite_step
        assert report is not None
        if guard.should_stop and stop_step is None:
            stop_step = step  # the drain at this step raised the divergence event
        # CPU tensors: reading them costs no device sync. An fp32-overflowed norm reads inf.
        numbers = (loss.item(), float(report.grad_norm))
        if not (bool(report.finite) and all(math.isfinite(v) for v in numbers)):
            nonfinite_step = step
        return nonfinite_step is not None

    budget = HEALTHY_STEPS if arm == "healthy" else MAX_STEPS
    batches = data.batches()
    train_loop(
        model,
        optimizer,
        batches,
        data.loss,
        budget,
        guard=guard,
        before_step=set_lr,
        after_step=after,
    )
    guard.close()
    divergence = next((e for e in recorder.events if e.kind == "divergence"), None)
    end = stop_step or len(recorder.loss)
    finite_losses = [v for v in recorder.loss[:end] if math.isfinite(v)]
    return Run(
        arm=arm,
        seed=seed,
        stop_step=stop_step,
        divergence_onset=None if divergence is None else divergence.step,
        nonfinite_step=nonfinite_step,
        best_loss=min(finite_losses) if finite_losses else math.nan,
        loss=tuple(recorder.loss),
        grad_norm=tuple(recorder.grad_norm),
        lr=tuple(lr_at(arm, s) for s in range(1, len(recorder.loss) + 1)),
        events=recorder.event_dicts(),
    )


def _at(step: int | None, arm: str) -> str:
    return "never" if step is None else f"{step} (LR {lr_at(arm, step):.3g})"


def _first(step: int | None) -> str:
    return "none" if step is None else str(step)


class EarlyStoppingExperiment(LabExperiment):
    """The ``early-stopping`` experiment (practitioners' guides; Prechelt 1998; Smith 2017)."""

    name = "early-stopping"
    title = "The Divergence detector stops a run headed to NaN before it gets there (seed 004)"
    references = (
        "Prechelt 1998, Early Stopping - But When?, in Neural Networks: Tricks of the Trade "
        "(LNCS 1524)",
        "Smith 2017, Cyclical Learning Rates for Training Neural Networks, sec. 3.3, the LR "
        "range test (arXiv 1506.01186)",
    )
    setting = (
        "Papers: validation-loss early stopping on small benchmark nets (Prechelt), CIFAR "
        f"nets (Smith). Here: {MODEL_TEXT} under a linearly rising LR."
    )
    full_seeds = 5
    record_type = Run

    def config(self, quick: bool) -> dict[str, Any]:
        """The same for both variants."""
        return {
            **TASK_CONFIG,
            "optimizer": "SGD (no momentum)",
            "lr": {arm: ARM_LABELS[arm] for arm in ARMS},
            "max_steps": MAX_STEPS,
            "healthy_steps": HEALTHY_STEPS,
            "guard": f"Guard(log_every={LOG_EVERY}, detectors='default', clip=None)",
            "log_every": LOG_EVERY,
        }

    def grid(self, quick: bool, seeds: tuple[int, ...]) -> list[Callable[[], Run]]:
        """Every arm of every seed (``train`` looked up at call time)."""
        return [partial(train, a, s) for s in seeds for a in ARMS]

    def claims(self, records: Sequence[Run], seeds: tuple[int, ...]) -> tuple[Claim, ...]:
        """Every range test stops before NaN; no healthy run is stopped."""
        r = BySeed(records, seeds, key=lambda x: (x.arm,))
        n = f"{len(seeds)} seed(s)"
        ramps = r.get("ramp")
        return (
            Claim(
                id="divergence-stops-before-nan",
                source="Prechelt 1998; practitioners' guides",
                statement="The guard's Divergence detector (defaults) asks a run headed to NaN "
                "to stop before its loss or gradient goes non-finite.",
                paper="early stopping catches the explosion 'before [it] escalates' (seed 004); "
                "stop when the loss exceeds (1 + α) x its best (Prechelt's GL_α)",
                measured_on=f"first non-finite step - stop step, LR range test, {n} (NaN: no "
                "stop, or no NaN within the budget)",
                values=tuple(x.lead for x in ramps),
                criterion=Criterion(low=0.0),
                note="; ".join(
                    f"stop {_at(x.stop_step, 'ramp')}, non-finite {_at(x.nonfinite_step, 'ramp')}"
                    for x in ramps
                ),
            ),
            Claim(
                id="no-false-alarm",
                source="Prechelt 1998",
                statement="On the healthy control (same net, LR 0.1, a smooth loss) the "
                "detector never fires.",
                paper="a stopping criterion should not stop a run that still improves "
                "(qualitative)",
                measured_on=f"divergence events, LR {LR:g} for {HEALTHY_STEPS} steps, {n}",
                values=tuple(
                    float(sum(e["kind"] == "divergence" for e in x.events))
                    for x in r.get("healthy")
                ),
                criterion=Criterion(high=0.5),
            ),
        )

    def tables(self, records: Sequence[Run], seeds: tuple[int, ...]) -> tuple[Table, ...]:
        """The timeline table (one row per seed and arm)."""
        r = BySeed(records, seeds, key=lambda x: (x.arm,))
        rows = tuple(
            (
                ARM_LABELS[arm],
                str(x.seed),
                format_value(x.best_loss),
                _first(x.first("spike")),
                _first(x.first("exploding")),
                _first(x.divergence_onset),
                _at(x.stop_step, arm),
                _at(x.nonfinite_step, arm),
                "-" if math.isnan(x.lead) else f"{x.lead:g}",
                str(sum(e["kind"] in ("nonfinite", "overflow") for e in x.events)),
            )
            for arm in ARMS
            for x in r.get(arm)
        )
        return (
            Table(
                title="Timeline of each run (optimizer steps)",
                columns=(
                    "arm",
                    "seed",
                    "best batch loss",
                    "first spike event",
                    "first exploding event",
                    "divergence onset",
                    "stop (should_stop)",
                    "first non-finite",
                    "steps early",
                    "non-finite / overflow events",
                ),
                rows=rows,
                note=f"Divergence fires at the drain (every {LOG_EVERY} steps) that completes "
                "its patience; its onset is the first step of the first bad drain. Runs train on "
                "past the stop to measure where NaN was. The abrupt arm (no claim) goes "
                "non-finite faster than the detector's five drains. The defaults do fire on some "
                "healthy but noisy runs whose loss is near 0 (see the residual experiment's guard "
                "events); min_delta is the remedy.",
            ),
        )

    def figure(self, records: Sequence[Run], data: Mapping[str, Any]) -> Figure:
        """Loss, LR and gradient norm of the range test (first seed), events, stop and NaN."""
        first_seed = min(x.seed for x in records)
        chosen = {x.arm: x for x in records if x.seed == first_seed}
        fig, (loss_ax, norm_ax) = new_figure(1, 2, figsize=(14, 4.4))
        for arm in ("healthy", "ramp"):
            values = positive_or_nan(chosen[arm].loss)
            loss_ax.plot(range(1, len(values) + 1), values, color=_COLORS[arm], lw=0.7)
            loss_ax.plot([], [], color=_COLORS[arm], label=ARM_LABELS[arm])
            norms = positive_or_nan(chosen[arm].grad_norm)
            norm_ax.plot(range(1, len(norms) + 1), norms, color=_COLORS[arm], lw=0.7)
        ramp = chosen["ramp"]
        for ax in (loss_ax, norm_ax):
            if ramp.stop_step is not None:
                ax.axvline(ramp.stop_step, color="#1f77b4", lw=1.2, label="Divergence: stop")
            if ramp.divergence_onset is not None:
                ax.axvline(ramp.divergence_onset, color="#1f77b4", lw=0.8, ls=":", label="onset")
            if ramp.nonfinite_step is not None:
                ax.axvline(
                    ramp.nonfinite_step, color="#000000", lw=1.2, ls="--", label="non-finite"
                )
            ax.set_yscale("log")
            ax.set_ylim(top=1e6)  # the last steps reach 1e30 and more: keep the rise readable
            ax.set_xlabel("optimizer step")
            ax.grid(True, which="major", alpha=0.3)
        for kind, (color, marker) in _EVENT_STYLE.items():
            steps = [int(e["step"]) for e in ramp.events if e["kind"] == kind]
            values = [ramp.grad_norm[s - 1] for s in steps if s <= len(ramp.grad_norm)]
            norm_ax.plot(
                steps[: len(values)], values, ls="", marker=marker, color=color, label=kind
            )
        lr_axis = loss_ax.twinx()
        lr_axis.plot(range(1, len(ramp.lr) + 1), ramp.lr, color=_COLORS["ramp"], ls="--", lw=0.8)
        lr_axis.set_ylabel("range-test LR (dashed)")
        loss_ax.set_ylabel("batch loss (MSE)")
        norm_ax.set_ylabel("global gradient norm")
        loss_ax.legend(fontsize=7, loc="upper left")
        norm_ax.legend(fontsize=7, loc="upper left")
        lead = "" if math.isnan(ramp.lead) else f": stopped {ramp.lead:g} steps before NaN"
        fig.suptitle(f"Early stopping in an LR range test (seed {first_seed}){lead}")
        fig.tight_layout()
        return fig


_COLORS = {"ramp": "#d62728", "healthy": "#7f7f7f", "abrupt": "#ff7f0e"}
_EVENT_STYLE = {"spike": ("#9467bd", "v"), "exploding": ("#8c564b", "^")}

EXPERIMENT = EarlyStoppingExperiment()
claims = EXPERIMENT.claims
