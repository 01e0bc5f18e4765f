"""Experiment ``recovery``: recovering from a loss spike by rollback and an LR cool-down.

A x100 LR burst wrecks a small regression run; the guard alone cannot undo it, and
``Rollback`` brings the run back (the PaLM recipe, Chowdhery et al. 2022 sec. 5.1). See
docs/lab/recovery.md for the setup, the papers' numbers and the criteria.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from gradguard.guard import Guard
from gradguard.lab._figures import new_figure
from gradguard.lab._harness import LabExperiment, data_generator
from gradguard.lab._records import BySeed, Claim, Criterion, Table, TracedRun, format_value
from gradguard.lab._training import Recorder, index_batches
from gradguard.recover import Rollback
from gradguard.testing.faults import FaultInjector

if TYPE_CHECKING:
    from matplotlib.figure import Figure

STEPS = 1200
FAULT_STEP = 500
LR = 3e-3
N_POINTS = 1024
N_INPUTS = 8
WIDTH = 64
BATCH_SIZE = 64
LR_FACTOR = 100.0
LR_STEPS = 10
EVERY = 50
COOLDOWN = 100
LOG_EVERY = 10

MODEL_TEXT = f"an {N_INPUTS} → {WIDTH} → {WIDTH} → 1 tanh MLP on {N_POINTS:,} synthetic points"
TASK_CONFIG: Mapping[str, Any] = {
    "model": f"MLP {N_INPUTS}-{WIDTH}-{WIDTH}-1, tanh, PyTorch default init",
    "data": f"{N_POINTS} points, x ~ N(0, 1)^{N_INPUTS}, y = tanh(x.w), w ~ N(0, 1)",
    "loss": "mse",
    "batch_size": BATCH_SIZE,
}
"""The model and data in words and in the config (``early-stopping`` shares them)."""

ARMS = ("clean", "guard", "rollback")
ARM_LABELS: Mapping[str, str] = {
    "clean": "clean (no fault)",
    "guard": "fault, Guard only",
    "rollback": "fault, Guard + Rollback",
}


@dataclass(frozen=True)
class Regression:
    """The synthetic data of one seed and the state its batch stream starts from."""

    x: Tensor
    y: Tensor
    stream_state: Tensor

    def batches(self) -> Iterator[Tensor]:
        """Index batches, epoch after shuffled epoch; every call starts the same stream."""
        generator = torch.Generator()
        generator.set_state(self.stream_state)
        return index_batches(N_POINTS, BATCH_SIZE, generator, drop_last=False)

    def loss(self, model: nn.Module, index: Tensor) -> Tensor:
        """The MSE of ``model`` on the points at ``index``."""
        return nn.functional.mse_loss(model(self.x[index]), self.y[index])


def regression(seed: int) -> Regression:
    """Return ``x ~ N(0, 1)^8``, ``y = tanh(x·w)`` with ``w ~ N(0, 1)^8``; data seed 1000+seed."""
    generator = data_generator(seed)
    x = torch.randn(N_POINTS, N_INPUTS, generator=generator)
    teacher = torch.randn(N_INPUTS, 1, generator=generator)
    return Regression(x, torch.tanh(x @ teacher), generator.get_state())


def build_model(seed: int) -> nn.Sequential:
    """The 8 → 64 → 64 → 1 tanh MLP, PyTorch's default init under ``seed``; keeps the RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(N_INPUTS, WIDTH),
            nn.Tanh(),
            nn.Linear(WIDTH, WIDTH),
            nn.Tanh(),
            nn.Linear(WIDTH, 1),
        )


@dataclass(frozen=True)
class Arm(TracedRun):
    """One training run (traces per ``guard.step`` call, in call order)."""

    fault_step: int | None
    """The optimizer step of the LR fault's onset; None without a fault."""
    final_loss: float
    """MSE on all points after training."""
    optimizer_steps: int
    iterations: int
    """Batches drawn (more than the steps when a rollback rewound)."""
    skipped_steps: int
    should_stop: bool
    """Whether the guard asked the loop to stop (``Divergence``)."""
    snapshot_nbytes: int
    """CPU memory of the rollback's snapshots (0 without one)."""
    steps: tuple[int, ...]
    """The guard's step number of every call (a rollback makes it go back)."""

    def steps_of(self, kind: str, metric: str | None = None) -> list[int]:
        """Return the steps of this arm's events of ``kind`` (and ``metric``), in order."""
        return [
            int(e["step"])
            for e in self.events
            if e["kind"] == kind and (metric is None or e["metric"] == metric)
        ]

    @property
    def restored_steps(self) -> list[float]:
        """The snapshot step each rollback restored (NaN for a rollback that gave up)."""
        return [float(e["value"]) for e in self.events if e["kind"] == "rollback"]


def train(arm: str, seed: int, steps: int = STEPS, fault_step: int = FAULT_STEP) -> Arm:
    """Train ``steps`` optimizer steps (the cosine's length), faulty from ``fault_step``."""
    model = build_model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    rollback = Rollback(every=EVERY, cooldown=COOLDOWN) if arm == "rollback" else None
    recorder = Recorder()
    guard = Guard(
        model,
        optimizer,
        recovery=rollback,
        scheduler=scheduler,
        log_every=LOG_EVERY,
        sinks=[recorder],
    )
    faulty = arm != "clean"
    injector = FaultInjector(
        model,
        optimizer,
        at={fault_step: "lr"} if faulty else {},
        lr_factor=LR_FACTOR,
        lr_steps=LR_STEPS,
    )
    data = regression(seed)
    batches = data.batches()
    iterations = 0
    # Loop on optimizer steps, not batches: a rollback rewinds guard.step_count. It also
    # restores the global RNG states to the snapshot's; nothing here draws from them.
    while guard.step_count < steps:
        index = next(batches)
        iterations += 1
        with injector.step():
            optimizer.zero_grad(set_to_none=True)
            loss = data.loss(model, index)
            loss.backward()  # type: ignore[no-untyped-call]
            guard.step(loss)
    guard.close()
    with torch.no_grad():
        final = float(nn.functional.mse_loss(model(data.x), data.y))
    return Arm(
        arm=arm,
        seed=seed,
        fault_step=fault_step if faulty else None,
        final_loss=final,
        optimizer_steps=guard.step_count,
        iterations=iterations,
        skipped_steps=recorder.skipped,
        should_stop=guard.should_stop,
        snapshot_nbytes=0 if rollback is None else rollback.snapshot_nbytes,
        steps=tuple(recorder.steps),
        loss=tuple(recorder.loss),
        grad_norm=tuple(recorder.grad_norm),
        events=recorder.event_dicts(),
    )


def _restored_margin(arm: Arm) -> float:
    """Return fault step - restored snapshot step, the smallest over rollbacks; NaN if none."""
    restored = arm.restored_steps
    if not restored or arm.fault_step is None:
        return math.nan
    return min(arm.fault_step - r for r in restored)


def _first(values: Sequence[int]) -> str:
    return str(values[0]) if values else "none"


def _final_row(label: str, clean: float, hurt: float, recovered: float) -> tuple[str, ...]:
    losses = (format_value(clean), format_value(hurt), format_value(recovered))
    return (label, *losses, format_value(hurt / clean), f"{recovered / clean - 1:+.1%}")


class RecoveryExperiment(LabExperiment):
    """The ``recovery`` experiment (Chowdhery et al. 2022, sec. 5.1)."""

    name = "recovery"
    title = (
        "Recovering from a loss spike: rollback + LR cool-down "
        "(the PaLM recipe, Chowdhery et al. 2022 sec. 5.1)"
    )
    references = (
        "Chowdhery et al. 2022, PaLM: Scaling Language Modeling with Pathways, sec. 5.1 "
        "(arXiv 2204.02311)",
        "Zhang et al. 2022, OPT: Open Pre-trained Transformer Language Models, sec. 2.5 "
        "(arXiv 2205.01068)",
    )
    setting = (
        "Papers: PaLM 540B on 6,144 TPU v4 chips, ~20 spikes, restart ~100 steps back; "
        f"OPT-175B. Here: {MODEL_TEXT}, {STEPS:,} AdamW steps, the LR x{LR_FACTOR:g} for "
        f"{LR_STEPS} steps at step {FAULT_STEP}, snapshots every {EVERY} steps."
    )
    record_type = Arm

    def config(self, quick: bool) -> dict[str, Any]:
        """The same for both variants: both train the full 1,200 steps."""
        return {
            **TASK_CONFIG,
            "optimizer": f"AdamW(lr={LR:g}), CosineAnnealingLR(T_max={STEPS})",
            "steps": STEPS,
            "fault": f"FaultInjector(at={{{FAULT_STEP}: 'lr'}}, lr_factor={LR_FACTOR:g}, "
            f"lr_steps={LR_STEPS})",
            "fault_step": FAULT_STEP,
            "lr_factor": LR_FACTOR,
            "lr_steps": LR_STEPS,
            "guard": f"Guard(log_every={LOG_EVERY}, detectors='default', clip=None)",
            "recovery": repr(Rollback(every=EVERY, cooldown=COOLDOWN)),
            "every": EVERY,
            "cooldown": COOLDOWN,
            "arms": list(ARMS),
        }

    def grid(self, quick: bool, seeds: tuple[int, ...]) -> list[Callable[[], Arm]]:
        """The three arms of every seed."""
        return [partial(train, a, s) for s in seeds for a in ARMS]

    def claims(self, records: Sequence[Arm], seeds: tuple[int, ...]) -> tuple[Claim, ...]:
        """The guard alone cannot undo the fault; the rollback does, from before it."""
        a = BySeed(records, seeds, key=lambda x: (x.arm,))
        clean, hurt, recovered = ([x.final_loss for x in a.get(arm)] for arm in ARMS)
        pairs = list(zip(clean, hurt, strict=True))
        n = f"{len(seeds)} seed(s)"
        rollbacks = a.get("rollback")
        restored = ", ".join(
            f"{r.restored_steps[0]:g}" if r.restored_steps else "none" for r in rollbacks
        )
        counts = ", ".join(str(len(r.restored_steps)) for r in rollbacks)
        return (
            Claim(
                id="guard-alone-cannot-undo",
                source="Chowdhery et al. 2022",
                statement="A real divergence (LR x100 for 10 steps) ruins the run when the guard "
                "can only skip and warn: final loss NaN or at least 10x the clean run's.",
                paper="~20 loss spikes in PaLM 540B despite gradient clipping, each handled "
                "by a restart (the run without one is not reported)",
                measured_on=f"clean / guard-only final loss, {n} (NaN counts as infinite: 0); "
                "pass: below 0.1",
                values=tuple(c / h if math.isfinite(h) else 0.0 for c, h in pairs),
                criterion=Criterion(high=0.1),
                note="guard-only final loss "
                + ", ".join(f"{format_value(h)} ({format_value(h / c)}x clean)" for c, h in pairs),
            ),
            Claim(
                id="rollback-recovers",
                source="Chowdhery et al. 2022; Zhang et al. 2022",
                statement="Rolling back to a snapshot before the spike, skipping its batches and "
                "halving the LR for 100 steps brings the run back to the clean run's loss.",
                paper="PaLM: restart ~100 steps back, skip 200-500 batches, the spike does not "
                "recur; OPT: restart earlier at a lower LR and training recovers",
                measured_on=f"|rollback - clean| / clean final loss, {n}",
                values=tuple(abs(r - c) / c for r, c in zip(recovered, clean, strict=True)),
                criterion=Criterion(high=0.10),
                note="signed "
                + ", ".join(f"{r / c - 1:+.1%}" for r, c in zip(recovered, clean, strict=True)),
            ),
            Claim(
                id="rollback-predates-fault",
                source="Chowdhery et al. 2022",
                statement="The rollback restores a snapshot taken before the fault's first step.",
                paper="restart from a checkpoint roughly 100 steps before the spike started",
                measured_on=f"fault step - restored snapshot step (every={EVERY}), {n}; NaN when "
                "no rollback happened",
                values=tuple(_restored_margin(r) for r in rollbacks),
                criterion=Criterion(low=0),
                note=f"restored step {restored}; rollbacks per run {counts}",
            ),
        )

    def tables(self, records: Sequence[Arm], seeds: tuple[int, ...]) -> tuple[Table, ...]:
        """The final-loss table and the events table, one row per seed."""
        a = BySeed(records, seeds, key=lambda x: (x.arm,))
        finals = [[x.final_loss for x in a.get(arm)] for arm in ARMS]
        final_rows = [_final_row(str(s), *(f[i] for f in finals)) for i, s in enumerate(seeds)]
        if len(seeds) > 1:
            final_rows.append(_final_row("mean", *(statistics.fmean(f) for f in finals)))
        event_rows = []
        for hurt, rolled in zip(a.get("guard"), a.get("rollback"), strict=True):
            fault = rolled.fault_step
            restored = zip(rolled.steps_of("rollback"), rolled.restored_steps, strict=True)
            event_rows.append(
                (
                    str(rolled.seed),
                    f"{fault}-{(fault or 0) + LR_STEPS - 1}",
                    _first(rolled.steps_of("spike", "loss")),
                    _first(hurt.steps_of("divergence")),
                    ", ".join(f"{rb} → {r:g}" for rb, r in restored) or "none",
                    _first(rolled.steps_of("cooldown")),
                    str(rolled.optimizer_steps),
                    str(rolled.iterations),
                )
            )
        nbytes = a.get("rollback")[0].snapshot_nbytes
        return (
            Table(
                title="Final loss (MSE on all 1,024 points)",
                columns=(
                    "seed",
                    *(ARM_LABELS[arm] for arm in ARMS),
                    "guard only / clean",
                    "rollback vs clean",
                ),
                rows=tuple(final_rows),
                note="The mean row holds the mean loss of each arm and the ratios of those means."
                if len(seeds) > 1
                else "",
            ),
            Table(
                title="Events: the fault, detection, rollback and cool-down (optimizer steps)",
                columns=(
                    "seed",
                    f"LR x{LR_FACTOR:g}",
                    "first loss spike",
                    "guard only: divergence onset",
                    "rollback at → restored",
                    "cool-down over",
                    "optimizer steps",
                    "batches drawn",
                ),
                rows=tuple(event_rows),
                note="A rollback fires at the drain (every 10 steps) after the spike; batches "
                "drawn minus optimizer steps are the batches skipped. The guard-only arm "
                "trains on after its divergence event asked the loop to stop. The Rollback "
                f"held {nbytes:,} bytes of snapshots (keep=2: parameters, AdamW state and "
                "the torch RNG state, twice).",
            ),
        )

    def figure(self, records: Sequence[Arm], data: Mapping[str, Any]) -> Figure:
        """Loss and gradient norm per step of the three arms of the first seed.

        Left the whole run, right a close-up of the fault. The fault window (LR x100) is
        shaded; the rollback (an arrow from the step it fired at back to the snapshot it
        restored) and the end of the cool-down are marked. Steps a rollback undid are dotted.
        """
        config = data["config"]
        first_seed = min(x.seed for x in records)
        arms = {x.arm: x for x in records if x.seed == first_seed}
        fault, lr_steps = config["fault_step"], config["lr_steps"]
        rolled = arms["rollback"]
        marks = zip(rolled.steps_of("rollback"), rolled.restored_steps, strict=True)
        rollbacks = [(s, r) for s, r in marks if math.isfinite(r)]
        cooldowns = rolled.steps_of("cooldown")
        fig, axes = new_figure(
            2, 2, figsize=(12, 6.6), sharey="row", gridspec_kw={"width_ratios": (1.5, 1)}
        )
        for row_axes, field in zip(axes, ("loss", "grad_norm"), strict=True):
            for ax in row_axes:
                for name in ARMS:
                    kept, abandoned = _kept_and_abandoned(
                        list(arms[name].steps), list(getattr(arms[name], field))
                    )
                    color = _ARM_COLORS[name]
                    ax.plot(
                        list(kept), list(kept.values()), color=color, lw=0.8, label=ARM_LABELS[name]
                    )
                    for stretch in abandoned:
                        xs, ys = zip(*stretch, strict=True)
                        ax.plot(xs, ys, color=color, lw=1.0, ls=":", label="_undone")
                ax.set_yscale("log")
                ax.grid(True, which="major", alpha=0.3)
                ax.axvspan(fault - 0.5, fault + lr_steps - 0.5, color="#ff7f0e", alpha=0.3, lw=0)
                for fired, restored in rollbacks:
                    ax.axvline(restored, color="#1f77b4", ls="--", lw=0.8)
                    ax.axvline(fired, color="#1f77b4", ls="-.", lw=0.8)
                for step in cooldowns:
                    ax.axvline(step, color="#7f7f7f", ls="--", lw=0.8)
            row_axes[1].set_xlim(fault - 2 * config["every"], fault + 2 * config["cooldown"])
        zoom = axes[0][1]
        on_x = zoom.get_xaxis_transform()
        for fired, restored in rollbacks:
            zoom.annotate(
                f"rollback {fired} → {restored:g}",
                xy=(restored, 0.93),
                xytext=(fired + 5, 0.93),
                xycoords=on_x,
                textcoords=on_x,
                arrowprops={"arrowstyle": "->", "color": "#1f77b4"},
                va="center",
                fontsize=8,
                color="#1f77b4",
            )
        for step in cooldowns:
            zoom.text(step + 3, 0.8, "cool-down over", transform=on_x, fontsize=8, color="#4d4d4d")
        factor = f"LR x{config['lr_factor']:g}"
        zoom.text(fault - 3, 0.05, factor, ha="right", transform=on_x, fontsize=8, color="#c85a00")
        axes[0][0].set_ylabel("batch loss (MSE)")
        axes[1][0].set_ylabel("gradient norm")
        for ax in axes[1]:
            ax.set_xlabel("optimizer step (a rollback rewinds it)")
        axes[0][0].set_title("whole run", fontsize=10)
        zoom.set_title("around the fault (dotted: steps the rollback undid)", fontsize=10)
        axes[0][0].legend(fontsize=8, loc="lower left")
        fig.suptitle(
            f"A real divergence, with and without rollback (seed {first_seed}, "
            f"{factor} for steps {fault}-{fault + lr_steps - 1})"
        )
        fig.tight_layout()
        return fig


_ARM_COLORS = {"clean": "#2ca02c", "guard": "#d62728", "rollback": "#1f77b4"}


def _kept_and_abandoned(
    steps: list[int], values: list[float]
) -> tuple[dict[int, float], list[list[tuple[int, float]]]]:
    """Split one arm's calls into the path kept and the stretches a rollback abandoned.

    A rollback makes the step numbers go back; the calls it undid form an abandoned
    stretch, and for each step the last value recorded is the one the run kept.
    """
    kept: dict[int, float] = {}
    stretches: list[list[tuple[int, float]]] = [[]]
    for i, (step, value) in enumerate(zip(steps, values, strict=True)):
        if i and step <= steps[i - 1]:
            stretches.append([])
        stretches[-1].append((step, value))
        kept[step] = value
    # Every stretch but the last was cut short by a rollback: keep its undone part only.
    abandoned = [
        [(s, v) for s, v in stretch if s >= nxt[0][0]]
        for stretch, nxt in zip(stretches, stretches[1:], strict=False)
    ]
    return kept, abandoned


EXPERIMENT = RecoveryExperiment()
claims = EXPERIMENT.claims
