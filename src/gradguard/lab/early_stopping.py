"""Experiment ``early-stopping``: the Divergence detector stops a run before it reaches NaN.

Practitioners' guides recommend "regularly monitoring training metrics and
employing early stopping" to catch gradient explosion "before [it] escalates". The rule
behind :class:`gradguard.detect.Divergence` is Prechelt's (1998) generalization-loss
criterion GL_α applied to the training loss: stop once the loss has stayed above
(1 + α) times its best for a while. The LR range test of Smith (2017) raises the learning
rate until the loss runs away, which is exactly a run headed to NaN. This experiment
measures whether the guard's default detectors stop such a run before its loss or
gradient goes non-finite, how many steps before, and that they stay quiet on a healthy
run.

Setup. A tanh MLP 8 → 64 → 64 → 1 (PyTorch's default init) regresses ``tanh(x·w)`` on
1,024 synthetic points (``x`` and ``w`` standard normal, drawn from data seed
``1000 + seed``), MSE loss, batches of 64 from shuffled epochs, plain SGD. The squared
error grows geometrically once a step overshoots, so the run does not jump to NaN in one
step: it is headed there over tens of steps. Two arms per seed, both through
``Guard(log_every=10)`` with the default detectors (``Divergence`` with tolerance 1 and
patience 5: a loss above twice its best for five log intervals) and no clip policy:

* ``ramp``: the LR rises linearly, 0.1 + 0.002 (t - 1) at step t, an LR range test
  (Smith 2017) or a warm-up that never ends; the run trains past ``should_stop`` until its
  first non-finite loss or gradient, to measure how far NaN was;
* ``healthy``: the LR stays at 0.1 for as many steps (the control: no stop expected).

Pilot runs (seeds 100-107, not the lab's) chose the model and the ramp; the default
detectors were not changed. A guard without a clip policy steps the optimizer exactly as
an unguarded loop would, so the guarded run *is* the unguarded run up to the first
non-finite step (a test checks it). Per step the loss, the global gradient norm and the
LR are kept, with every event.

A fast blow-up is outside this claim: at a constant LR of 2.0 the same net goes from a
healthy loss to NaN within a few steps, faster than five log intervals; the guard then
skips the non-finite steps (``NonFinite`` events) rather than stopping the run before them.
The ``abrupt`` arm shows it for comparison, without a claim.

On seeds 0-10 the detector stopped 9 of the 11 range tests before NaN, 22-141 steps
early, and never fired on a healthy run. On seeds 6 and 9 it did not fire at all: the
loss rose, came back near its best within five log intervals, then blew up in under 50
steps. The claim (every seed of a run stops before NaN) holds on the full variant's
seeds 0-4; it is a statement about runs headed to NaN slowly, not a guarantee.

Nor is the healthy control a guarantee against false alarms. Its loss is smooth (plain
SGD, MSE around 1e-3). Near a loss of 0, "twice the best" alone is within the batch noise:
the healthy BN nets of the ``residual`` experiment, trained with momentum 0.9, wobble at
window losses of 0.004-0.17 against bests of 0.0004-0.04. The default margin of 5 % of the
starting loss (``start_fraction``) keeps that noise from reading as divergence; the range
test's runs still stop before NaN because a loss that climbs at three drains in a row is
stopped without waiting for the full patience.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradguard.guard import Guard
from gradguard.lab._harness import seeds_for, single_thread
from gradguard.lab._records import (
    Claim,
    Criterion,
    ExperimentResult,
    Progress,
    Table,
    format_value,
)
from gradguard.lab.recovery import BATCH_SIZE, N_INPUTS, N_POINTS, WIDTH, build_model, regression
from gradguard.records import Event, Window

LR = 0.1
RAMP = 0.002
ABRUPT_LR = 2.0
MAX_STEPS = 1000
HEALTHY_STEPS = 500
LOG_EVERY = 10
FULL_SEEDS = 5

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


class _Recorder:
    """A sink that keeps every drained step and event in memory (records only)."""

    def __init__(self) -> None:
        self.loss: list[float] = []
        self.grad_norm: list[float] = []
        self.events: list[Event] = []

    def open(self, meta: Mapping[str, Any]) -> None:
        """Nothing to set up."""

    def write(self, window: Window, events: Sequence[Event]) -> None:
        """Append the window's steps and events."""
        self.loss += window.loss.tolist()
        self.grad_norm += window.grad_norm.tolist()
        self.events += events

    def close(self) -> None:
        """Nothing to release."""


@dataclass(frozen=True)
class Run:
    """One arm of one seed.

    Attributes:
        arm: ``ramp``, ``healthy`` or ``abrupt``.
        seed: model seed (data seed ``1000 + seed``).
        stop_step: the step after which ``guard.should_stop`` was first True, or None.
        divergence_onset: the onset step the divergence event names, or None.
        nonfinite_step: the first step whose loss, gradient or gradient norm was not
            finite, or None (steps whose fp32 sum of squares overflowed but whose norm
            is still finite come earlier: ``overflow`` events).
        best_loss: the lowest batch loss before the stop (or the end).
        loss: the batch loss of every step.
        grad_norm: the global gradient norm of every step.
        lr: the learning rate of every step.
        events: every event of the guard, as ``Event.to_dict()``.
    """

    arm: str
    seed: int
    stop_step: int | None
    divergence_onset: int | None
    nonfinite_step: int | None
    best_loss: float
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
        fields["best_loss"] = float(fields["best_loss"])
        for key in ("loss", "grad_norm", "lr"):
            fields[key] = tuple(float(v) for v in fields[key])
        fields["events"] = tuple(dict(e) for e in fields["events"])
        return cls(**fields)

    @property
    def lead(self) -> float:
        """Steps from the stop to the first non-finite step; NaN if either is missing."""
        if self.stop_step is None or self.nonfinite_step is None:
            return math.nan
        return float(self.nonfinite_step - self.stop_step)

    def first(self, kind: str) -> int | None:
        """The step of the first event of ``kind``, or None."""
        steps = [int(e["step"]) for e in self.events if e["kind"] == kind]
        return min(steps) if steps else None


def train(arm: str, seed: int) -> Run:
    """Train one arm until its first non-finite step (or the step budget) and measure."""
    data = regression(seed)
    model = build_model(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr_at(arm, 1))
    recorder = _Recorder()
    guard = Guard(model, optimizer, log_every=LOG_EVERY, sinks=[recorder])
    stream = data.batches()
    budget = HEALTHY_STEPS if arm == "healthy" else MAX_STEPS
    stop_step = nonfinite_step = None
    lrs: list[float] = []
    for step in range(1, budget + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(arm, step)
        lrs.append(lr_at(arm, step))
        index = next(stream)
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(data.x[index]), data.y[index])
        loss.backward()  # type: ignore[no-untyped-call]
        report = guard.step(loss)
        if guard.should_stop and stop_step is None:
            stop_step = step  # the drain at this step raised the divergence event
        # CPU tensors: reading them costs no device sync. An fp32-overflowed norm reads inf.
        numbers = (loss.item(), float(report.grad_norm))
        if not (bool(report.finite) and all(math.isfinite(v) for v in numbers)):
            nonfinite_step = step
            break
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
        lr=tuple(lrs[: len(recorder.loss)]),
        events=tuple(e.to_dict() for e in recorder.events),
    )


class _Runs:
    """The runs of one experiment, indexed by (arm, seed)."""

    def __init__(self, runs: Sequence[Run], seeds: tuple[int, ...]) -> None:
        self.by_key = {(r.arm, r.seed): r for r in runs}
        self.seeds = seeds

    def get(self, arm: str) -> list[Run]:
        """Return the runs of ``arm``, one per seed."""
        return [self.by_key[(arm, s)] for s in self.seeds]


def _at(step: int | None, arm: str) -> str:
    return "never" if step is None else f"{step} (LR {lr_at(arm, step):.3g})"


def claims(runs: Sequence[Run], seeds: tuple[int, ...]) -> tuple[Claim, ...]:
    """Judge the two claims against the runs of every seed."""
    r = _Runs(runs, seeds)
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
            paper="a stopping criterion should not stop a run that still improves (qualitative)",
            measured_on=f"divergence events, LR {LR:g} for {HEALTHY_STEPS} steps, {n}",
            values=tuple(
                float(sum(e["kind"] == "divergence" for e in x.events)) for x in r.get("healthy")
            ),
            criterion=Criterion(high=0.5),
        ),
    )


def _first(step: int | None) -> str:
    return "none" if step is None else str(step)


def tables(runs: Sequence[Run], seeds: tuple[int, ...]) -> tuple[Table, ...]:
    """Return the timeline table (one row per seed and arm)."""
    r = _Runs(runs, seeds)
    rows = []
    for arm in ARMS:
        for x in r.get(arm):
            rows.append(
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
            rows=tuple(rows),
            note=f"Divergence fires at the drain (every {LOG_EVERY} steps) that completes "
            "its patience; its onset is the first step of the first bad drain. Runs train on "
            "past the stop to measure where NaN was. The abrupt arm (no claim) goes "
            "non-finite faster than the detector's five drains. The defaults do fire on some "
            "healthy but noisy runs whose loss is near 0 (see the residual experiment's guard "
            "events); min_delta is the remedy.",
        ),
    )


class EarlyStoppingExperiment:
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
        f"nets (Smith). Here: an {N_INPUTS} → {WIDTH} → {WIDTH} → 1 tanh MLP on {N_POINTS:,} "
        "synthetic points under a linearly rising LR."
    )

    def run(self, *, quick: bool, seed: int, progress: Progress | None = None) -> ExperimentResult:
        """Train every arm; quick uses 1 seed, full :data:`FULL_SEEDS` seeds."""
        seeds = seeds_for(seed, quick=quick, n_full=FULL_SEEDS)
        grid = [(arm, s) for s in seeds for arm in ARMS]
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
                "model": f"MLP {N_INPUTS}-{WIDTH}-{WIDTH}-1, tanh, PyTorch default init",
                "data": f"{N_POINTS} points, x ~ N(0, 1)^{N_INPUTS}, y = tanh(x.w), w ~ N(0, 1)",
                "loss": "mse",
                "batch_size": BATCH_SIZE,
                "optimizer": "SGD (no momentum)",
                "lr": {arm: ARM_LABELS[arm] for arm in ARMS},
                "max_steps": MAX_STEPS,
                "healthy_steps": HEALTHY_STEPS,
                "guard": f"Guard(log_every={LOG_EVERY}, detectors='default', clip=None)",
                "log_every": LOG_EVERY,
            },
            seeds=seeds,
            claims=claims(runs, seeds),
            tables=tables(runs, seeds),
            measurements=tuple(x.to_dict() for x in runs),
            duration_s=time.perf_counter() - start,
        )


EXPERIMENT = EarlyStoppingExperiment()

_COLORS = {"ramp": "#d62728", "healthy": "#7f7f7f", "abrupt": "#ff7f0e"}
_EVENT_STYLE = {"spike": ("#9467bd", "v"), "exploding": ("#8c564b", "^")}


def plot(experiment_data: Mapping[str, Any], out_dir: Path) -> Path:
    """Loss, LR and gradient norm of the range test, with its events, stop and NaN marked.

    Drawn from the ``results.json`` data alone (first seed).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [Run.from_dict(m) for m in experiment_data["measurements"]]
    first_seed = min(x.seed for x in rows)
    chosen = {x.arm: x for x in rows if x.seed == first_seed}
    fig, (loss_ax, norm_ax) = plt.subplots(1, 2, figsize=(14, 4.4))
    for arm in ("healthy", "ramp"):
        run = chosen[arm]
        values = [v if math.isfinite(v) and v > 0 else math.nan for v in run.loss]
        loss_ax.plot(range(1, len(values) + 1), values, color=_COLORS[arm], lw=0.7)
        loss_ax.plot([], [], color=_COLORS[arm], label=ARM_LABELS[arm])
        norms = [v if math.isfinite(v) and v > 0 else math.nan for v in run.grad_norm]
        norm_ax.plot(range(1, len(norms) + 1), norms, color=_COLORS[arm], lw=0.7)
    ramp = chosen["ramp"]
    for ax in (loss_ax, norm_ax):
        if ramp.stop_step is not None:
            ax.axvline(ramp.stop_step, color="#1f77b4", lw=1.2, label="Divergence: stop")
        if ramp.divergence_onset is not None:
            ax.axvline(ramp.divergence_onset, color="#1f77b4", lw=0.8, ls=":", label="onset")
        if ramp.nonfinite_step is not None:
            ax.axvline(ramp.nonfinite_step, color="#000000", lw=1.2, ls="--", label="non-finite")
        ax.set_yscale("log")
        ax.set_ylim(top=1e6)  # the last steps reach 1e30 and more: keep the rise readable
        ax.set_xlabel("optimizer step")
        ax.grid(True, which="major", alpha=0.3)
    for kind, (color, marker) in _EVENT_STYLE.items():
        steps = [int(e["step"]) for e in ramp.events if e["kind"] == kind]
        values = [ramp.grad_norm[s - 1] for s in steps if s <= len(ramp.grad_norm)]
        norm_ax.plot(steps[: len(values)], values, ls="", marker=marker, color=color, label=kind)
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
    path = out_dir / "early-stopping.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
