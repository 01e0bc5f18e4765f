"""Overhead benchmark: what gradguard costs between ``loss.backward()`` and ``optimizer.step()``.

Every claim about overhead in the documentation comes from here. One process times, on real
gradients of two models (a 9M-parameter GPT-like transformer and a 500-layer MLP of small
tensors): torch's ``clip_grad_norm_(foreach=True)`` (the baseline), gradguard's
:func:`~gradguard.stats.grad_stats` alone and with each clipping policy, the peer packages
``zclip`` and ``autoclip``, a per-parameter ``.item()`` logger, one memory-bound pass over
the gradient bytes (the floor), one whole AdamW training step, and ``Guard.step`` next to
the bare ``optimizer.step()`` it makes and to torch's clip before that same step (the
guard's own cost, a :class:`GuardCost`). The contenders run in interleaved rounds (each
round times every contender once, in a shuffled order), so slow drifts of the machine hit
all of them alike; medians and min-max over the rounds are reported. A second table times
AutoClip's history at step 10 against step 100,000, and the ``autoclip`` package's growing
history.

``gradguard bench`` and ``benchmarks/overhead.py`` call :func:`run_overhead`, then
:func:`print_result`, :meth:`OverheadResult.to_markdown` or :func:`report_markdown`. This
module lives in a checkout's ``benchmarks/``, not in the wheel: import it with that folder
on ``sys.path`` (as ``benchmarks/overhead.py``, ``gradguard bench`` and the tests do).
"""

from __future__ import annotations

import copy
import gc
import importlib
import importlib.util
import math
import operator
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name
from torch import Tensor, nn

import gradguard as gg
from gradguard.clip import AGC, AutoClip, NormClip, ValueClip, ZClip, clip_
from gradguard.errors import ConfigError
from gradguard.guard import Guard
from gradguard.stats import GradStats, grad_stats

if TYPE_CHECKING:
    from rich.console import Console

__all__ = [
    "Goal",
    "GuardCost",
    "HistoryTable",
    "Machine",
    "ModelTable",
    "OverheadResult",
    "Row",
    "Settings",
    "print_result",
    "report_markdown",
    "run_overhead",
]

#: Gradients are scaled by this before the rows that clip every call (restored each call).
CLIPPING_SCALE = 1e4
# Row names of the per-model tables, in display order.
BASELINE = "torch clip_grad_norm_(params, 1.0, foreach=True)"
GRAD_STATS = "gg.grad_stats(model), per-layer norms included"
NORM_CLIP = "gg.grad_stats(model) with per-layer norms, then NormClip(1.0)"
FLAT_STATS = "gg.grad_stats(model), per-layer norms, flat buffer (gg.flatten_grads_)"
VALUE_CLIP = "gg.clip_(model, ValueClip(1.0))"
VALUE_PEER = "torch clip_grad_value_(params, 1.0, foreach=True)"
AUTO_CLIP = "gg.clip_(model, AutoClip())"
Z_CLIP = "gg.clip_(model, ZClip())"
AGC_CLIP = "gg.clip_(model, AGC(exclude=()))"
AGC_PEER = "timm adaptive_clip_grad(params) (timm/utils/agc.py)"
RESTORE = f"restore the gradients x{CLIPPING_SCALE:g} (a copy into the buffer)"
VALUE_CLIPPING = "restore x1e4, then gg.clip_(model, ValueClip(1.0))"
VALUE_PEER_CLIPPING = "restore x1e4, then torch clip_grad_value_(params, 1.0)"
AGC_CLIPPING = "restore x1e4, then gg.clip_(model, AGC(exclude=()))"
AGC_PEER_CLIPPING = "restore x1e4, then timm adaptive_clip_grad(params)"
ZCLIP_PACKAGE = "zclip.ZClip(max_grad_norm=None).step(model)"
AUTOCLIP_PACKAGE = "autoclip QuantileClip(0.1, 1000, global).step()"
ITEM_LOGGER = "per-parameter p.grad.norm().item() logger"
FLOOR = "floor: one sum() over the gradient bytes"
NORM_FLOOR = "one linalg.vector_norm() over the gradient bytes"
VIEW_READS = "read every p.grad and p.requires_grad (what proves the flat views in place)"
TRAIN_STEP = "AdamW training step (fwd + bwd + step)"
OPT_FOREACH = "torch AdamW(lr=1e-6, foreach=True).step()"
CLIP_FOREACH = "torch clip_grad_norm_ (foreach), then the same AdamW(foreach=True).step()"
GUARD_FOREACH = "gg.Guard(model, AdamW(foreach=True), clip=NormClip(1.0)).step(loss)"
OPT_FUSED = "torch AdamW(lr=1e-6, fused=True).step()"
CLIP_FUSED = "torch clip_grad_norm_ (foreach), then the same AdamW(fused=True).step()"
GUARD_FUSED = "gg.Guard(model, AdamW(fused=True), clip=NormClip(1.0)).step(loss)"
#: (AdamW implementation, bare ``optimizer.step()`` row, torch's clip followed by that
#: step, ``guard.step`` making that step): the rows of one :class:`GuardCost`.
GUARD_ROWS = (
    ("foreach", OPT_FOREACH, CLIP_FOREACH, GUARD_FOREACH),
    ("fused", OPT_FUSED, CLIP_FUSED, GUARD_FUSED),
)
MODEL_ROWS = (
    BASELINE,
    GRAD_STATS,
    FLAT_STATS,
    NORM_CLIP,
    VALUE_CLIP,
    VALUE_PEER,
    AUTO_CLIP,
    Z_CLIP,
    AGC_CLIP,
    AGC_PEER,
    RESTORE,
    VALUE_CLIPPING,
    VALUE_PEER_CLIPPING,
    AGC_CLIPPING,
    AGC_PEER_CLIPPING,
    ZCLIP_PACKAGE,
    AUTOCLIP_PACKAGE,
    ITEM_LOGGER,
    FLOOR,
    NORM_FLOOR,
    VIEW_READS,
    OPT_FOREACH,
    CLIP_FOREACH,
    GUARD_FOREACH,
    OPT_FUSED,
    CLIP_FUSED,
    GUARD_FUSED,
    TRAIN_STEP,
)
NOT_INSTALLED = "not installed"

#: Global norm the measured gradients are rescaled to: below every clipping threshold
#: used here, so after the first call each clip multiplies by exactly 1 and repeated
#: calls on the same gradients cannot drift them towards subnormals.
GRAD_NORM = 0.5
#: Percentile / quantile of the history-based clippers (AutoClip's paper default).
PERCENTILE = 10.0
#: History length of the autoclip package in the per-model tables (its default).
PACKAGE_HISTORY = 1000
#: Most calls timed back to back in one round (cheap contenders on tiny models).
MAX_CALLS = 500
#: Pareto tail index of the synthetic norm history: heavy-tailed, minimum 1 (> GRAD_NORM).
PARETO_ALPHA = 1.5
#: Learning rate of the AdamW steps timed bare and under the guard: small, so that the
#: weights barely move between the per-round restores (AdamW's cost does not depend on it).
#: The row names and the method text spell it out as ``lr=1e-6``.
GUARD_LR = 1e-6
#: The guard's drain interval (its default); guard blocks hold whole multiples of it.
LOG_EVERY = 10


@dataclass(frozen=True)
class Settings:
    """How the benchmark ran.

    Attributes:
        rounds: interleaved rounds; every contender is timed once per round.
        quick: tiny models and a short history (smoke tests); numbers are not meaningful.
        threads: ``torch.get_num_threads()`` during the run.
        seed: seeds the models, the batches, the norm history and the round order.
        target_block_us: each contender is called back to back enough times per round
            for the timed block to last about this long (timer noise is then negligible).
        history: norms fed to AutoClip's sketch before timing "step N".
    """

    rounds: int
    quick: bool
    threads: int
    seed: int
    target_block_us: float
    history: int


@dataclass(frozen=True)
class Machine:
    """Where the numbers were measured."""

    cpu: str
    cores: int
    torch_version: str
    threads: int
    python: str
    system: str

    def describe(self) -> str:
        """One line: CPU, cores, torch, threads, Python, OS."""
        return (
            f"{self.cpu}, {self.cores} cores, torch {self.torch_version}, "
            f"{_threads(self.threads)}, Python {self.python}, {self.system}"
        )


@dataclass(frozen=True)
class Row:
    """One contender: its per-call time in every round and ratios to reference rows.

    Attributes:
        name: what was timed.
        samples_us: per-call time in µs, one per round (the round's block / ``calls``);
            empty when the contender did not run (see ``note``).
        calls: calls timed back to back in each round.
        reference: the row ``ratio`` divides by (its median).
        ratio: ``median_us / median_us of reference``.
        step_percent: ``100 * median_us / median_us of the AdamW training step``, in the
            per-model tables.
        note: why the row is empty (``"not installed"``), or a remark.
    """

    name: str
    samples_us: tuple[float, ...]
    calls: int
    reference: str
    ratio: float | None
    step_percent: float | None = None
    note: str = ""

    @property
    def ran(self) -> bool:
        """Whether the contender was timed."""
        return bool(self.samples_us)

    @property
    def median_us(self) -> float | None:
        """Median per-call time over the rounds, in µs."""
        return statistics.median(self.samples_us) if self.samples_us else None

    @property
    def min_us(self) -> float | None:
        """Fastest round's per-call time, in µs."""
        return min(self.samples_us) if self.samples_us else None

    @property
    def max_us(self) -> float | None:
        """Slowest round's per-call time, in µs."""
        return max(self.samples_us) if self.samples_us else None


def _find(rows: Sequence[Row], name: str) -> Row:
    for row in rows:
        if row.name == name:
            return row
    raise KeyError(f"no row named {name!r}; rows: {[r.name for r in rows]}")


@dataclass(frozen=True)
class ModelTable:
    """Every contender on one model; ratios are to torch's ``clip_grad_norm_``."""

    key: str
    title: str
    description: str
    num_params: int
    num_tensors: int
    rows: tuple[Row, ...]
    guard_costs: tuple[GuardCost, ...] = ()

    def row(self, name: str) -> Row:
        """Return the row called ``name`` (one of :data:`MODEL_ROWS`)."""
        return _find(self.rows, name)

    def guard_cost(self, optimizer: str) -> GuardCost:
        """Return the guard's own cost with AdamW ``optimizer`` (``"foreach"``, ``"fused"``)."""
        for cost in self.guard_costs:
            if cost.optimizer == optimizer:
                return cost
        raise KeyError(f"no guard cost for {optimizer!r} on {self.key!r}")


@dataclass(frozen=True)
class GuardCost:
    """The guard's own cost per step: ``guard.step`` minus the ``optimizer.step()`` it makes.

    All rows, and torch's ``clip_grad_norm_``, are timed in the same interleaved rounds;
    the cost is the difference of two medians. The same subtraction for torch's clip
    followed by the same optimizer step prices the clip where the guard's statistics
    run: after an optimizer step has streamed its state through the caches, not on
    gradients left hot by the previous call, as back-to-back calls leave them.

    Attributes:
        model: the model's key (``"gpt"`` or ``"mlp"``).
        optimizer: the AdamW implementation of the rows (``"foreach"`` or ``"fused"``).
        step_row: the bare ``optimizer.step()`` row of the model table.
        clip_row: the row of torch's ``clip_grad_norm_`` followed by that step.
        guard_row: the ``guard.step(loss)`` row of the model table.
        step_us: median of ``step_row``; None when it did not run.
        clip_step_us: median of ``clip_row``; None when it did not run.
        guard_us: median of ``guard_row``; None when it did not run.
        baseline_us: median of torch's ``clip_grad_norm_`` alone, in the same rounds.
        paired_us: median over the rounds of ``guard - step`` within each round, a check
            on the difference of medians that cancels drifts between rounds.
        note: why the rows did not run.
    """

    model: str
    optimizer: str
    step_row: str
    clip_row: str
    guard_row: str
    step_us: float | None
    clip_step_us: float | None
    guard_us: float | None
    baseline_us: float | None
    paired_us: float | None
    note: str = ""

    @property
    def own_us(self) -> float | None:
        """``guard_us - step_us``: what the guard adds to the optimizer step, in µs."""
        if self.guard_us is None or self.step_us is None:
            return None
        return self.guard_us - self.step_us

    @property
    def ratio(self) -> float | None:
        """``own_us / baseline_us``: the guard's own cost in units of torch's clip."""
        own = self.own_us
        return None if own is None or not self.baseline_us else own / self.baseline_us

    @property
    def clip_before_step_us(self) -> float | None:
        """``clip_step_us - step_us``: torch's clip where the guard's statistics run."""
        if self.clip_step_us is None or self.step_us is None:
            return None
        return self.clip_step_us - self.step_us

    @property
    def ratio_before_step(self) -> float | None:
        """``own_us / clip_before_step_us``: the guard against torch's clip, both in place."""
        own, clip = self.own_us, self.clip_before_step_us
        return None if own is None or not clip else own / clip


@dataclass(frozen=True)
class HistoryTable:
    """Per-step cost against the length of the norm history (AutoClip and autoclip)."""

    description: str
    rows: tuple[Row, ...]
    steps: int
    autoclip_young: str
    autoclip_old: str

    def row(self, name: str) -> Row:
        """Return the row called ``name``."""
        return _find(self.rows, name)


@dataclass(frozen=True)
class Goal:
    """A performance goal, with the measured value; never rounded into a pass.

    Attributes:
        name: what is compared.
        measured: the measured ratio, or None when it could not be measured.
        target: the largest ratio that meets the goal.
        note: why ``measured`` is missing.
    """

    name: str
    measured: float | None
    target: float
    note: str = ""

    @property
    def met(self) -> bool | None:
        """True or False once measured; None when it could not be measured."""
        return None if self.measured is None else self.measured <= self.target


@dataclass(frozen=True)
class OverheadResult:
    """Everything :func:`run_overhead` measured, and how."""

    settings: Settings
    machine: Machine
    models: tuple[ModelTable, ...]
    history: HistoryTable
    goals: tuple[Goal, ...]
    elapsed_s: float

    def model(self, key: str) -> ModelTable:
        """Return the table of model ``key`` (``"gpt"`` or ``"mlp"``)."""
        for table in self.models:
            if table.key == key:
                return table
        raise KeyError(f"no model {key!r}; models: {[t.key for t in self.models]}")

    def to_markdown(self) -> str:
        """The tables and goals as GitHub markdown (no preamble; see :func:`report_markdown`)."""
        s = self.settings
        parts = [
            f"Median of {s.rounds} interleaved rounds, min–max over the rounds; "
            f"{_threads(s.threads)}; total run {self.elapsed_s:.0f} s."
            + (" **Quick mode: tiny models, numbers are not meaningful.**" if s.quick else "")
        ]
        for table in self.models:
            header, rows = _model_cells(table)
            parts.append(
                f"### {table.title}\n\n{table.description}\n\n{_markdown_table(header, rows)}"
            )
        header, rows = _guard_cost_cells(self.models)
        parts.append(
            f"### Guard cost per step\n\n{GUARD_COST_TEXT}\n\n{_markdown_table(header, rows)}"
        )
        header, rows = _history_cells(self.history)
        parts.append(
            "### Cost against history length\n\n"
            f"{self.history.description}\n\n{_markdown_table(header, rows)}"
        )
        header, rows = _goal_cells(self.goals)
        parts.append(f"### Goals\n\n{_markdown_table(header, rows)}")
        header, rows = _flat_bound_cells(self.models)
        parts.append(
            "### What bounds the flat-buffer goal\n\n"
            f"{FLAT_BOUND_TEXT}\n\n{_markdown_table(header, rows)}"
        )
        return "\n\n".join(parts) + "\n"


# --------------------------------------------------------------------------- formatting


def _threads(count: int) -> str:
    return f"{count} torch thread" + ("" if count == 1 else "s")


def _us(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _row_cells(row: Row, with_step: bool) -> list[str]:
    if not row.ran:
        return [row.name, row.note or "—", "—", "—"] + (["—"] if with_step else [])
    cells = [
        row.name,
        _us(row.median_us),
        f"{_us(row.min_us)}–{_us(row.max_us)}",
        "—" if row.ratio is None else f"{row.ratio:.2f}×",
    ]
    if with_step:
        pct = row.step_percent
        cells.append("—" if pct is None else f"{pct:.2f}%" if pct < 10 else f"{pct:.0f}%")
    return cells


def _model_cells(table: ModelTable) -> tuple[list[str], list[list[str]]]:
    header = ["contender", "median µs", "min–max µs", "× torch clip", "% of AdamW step"]
    return header, [_row_cells(row, with_step=True) for row in table.rows]


GUARD_COST_TEXT = (
    '`gg.Guard(model, optimizer, clip=gg.NormClip(1.0), detectors="default", '
    f"log_every={LOG_EVERY})`: per-layer statistics, NormClip, the six default detectors "
    f"and a drain every {LOG_EVERY} steps (the buffered statistics and each layer's "
    "parameter norm, one fused norm over the parameters, in one copy), with the drains and "
    "detectors amortised over the steps. "
    '"guard\'s own" = median of `guard.step(loss)` − median of the bare '
    "`optimizer.step()` of the same AdamW configuration, timed in the same rounds; "
    '"per-round pairs" is the median of that difference taken within each round; '
    "\"× torch clip\" divides the guard's own cost by the median of torch's foreach "
    '`clip_grad_norm_` from the same rounds, timed alone, back to back. "torch clip before '
    "the step\" is the median of torch's clip followed by the same `optimizer.step()`, "
    "minus the bare step's median: the clip where the guard's statistics run, after an "
    "optimizer step has streamed its state through the caches, rather than on gradients "
    'still hot from the previous call; "own × that" divides the guard\'s own cost by it.'
)


def _guard_cost_cells(tables: Sequence[ModelTable]) -> tuple[list[str], list[list[str]]]:
    header = [
        "model",
        "AdamW",
        "optimizer.step() µs",
        "guard.step(loss) µs",
        "guard's own µs",
        "per-round pairs µs",
        "torch clip µs",
        "own × torch clip",
        "torch clip before the step µs",
        "own × that",
    ]
    rows = []
    for table in tables:
        for cost in table.guard_costs:
            ratio, in_place = cost.ratio, cost.ratio_before_step
            if cost.own_us is None:
                rows.append([table.key, cost.optimizer, cost.note or "—", *["—"] * 7])
                continue
            rows.append(
                [
                    table.key,
                    cost.optimizer,
                    _us(cost.step_us),
                    _us(cost.guard_us),
                    _us(cost.own_us),
                    _us(cost.paired_us),
                    _us(cost.baseline_us),
                    "—" if ratio is None else f"{ratio:.2f}×",
                    _us(cost.clip_before_step_us),
                    "—" if in_place is None else f"{in_place:.2f}×",
                ]
            )
    return header, rows


def _history_cells(table: HistoryTable) -> tuple[list[str], list[list[str]]]:
    header = ["contender", "median µs", "min–max µs", "× same at step/history 10"]
    return header, [_row_cells(row, with_step=False) for row in table.rows]


def _goal_cells(goals: Sequence[Goal]) -> tuple[list[str], list[list[str]]]:
    rows = []
    for goal in goals:
        if goal.measured is None:
            rows.append([goal.name, goal.note or "not measured", f"≤ {goal.target:.2f}×", "n/a"])
        else:
            mark = "✓" if goal.met else "✗"
            rows.append([goal.name, f"{goal.measured:.3f}×", f"≤ {goal.target:.2f}×", mark])
    return ["goal", "measured", "target", "met"], rows


#: The flat-buffer goals of :func:`_goals`, per model key.
FLAT_GOALS = {"gpt": 1.3, "mlp": 5.0}

FLAT_BOUND_TEXT = (
    "Whatever else it does, an exact flat path pays for two things every step: reading "
    "each parameter's `.grad` and `.requires_grad`, which proves that the gradients are "
    "still the buffer's views and that no parameter was frozen since (without it a "
    "replaced or stale gradient would be measured silently), and one "
    "`linalg.vector_norm` pass over every gradient byte, the kernel of torch's own "
    "per-tensor norms, which keeps the norms, the clip and the skip bitwise those of the "
    "path without the buffer. Their sum, over the floor, is a lower bound on the "
    "flat-buffer row; where it exceeds the goal, no exact implementation meets the goal "
    "on this machine."
)


def _flat_bound_cells(tables: Sequence[ModelTable]) -> tuple[list[str], list[list[str]]]:
    header = [
        "model",
        "floor µs",
        "vector_norm × floor",
        "reads × floor",
        "lower bound × floor",
        "flat grad_stats × floor",
        "goal",
    ]
    rows = []
    for table in tables:
        floor = table.row(FLOOR).median_us
        parts = [table.row(name).median_us for name in (NORM_FLOOR, VIEW_READS, FLAT_STATS)]
        if floor is None or floor <= 0 or any(v is None for v in parts):
            rows.append([table.key, "—", "—", "—", "—", "—", "—"])
            continue
        norm, reads, flat = (float(v or 0.0) / floor for v in parts)
        rows.append(
            [
                table.key,
                _us(floor),
                f"{norm:.2f}×",
                f"{reads:.2f}×",
                f"{norm + reads:.2f}×",
                f"{flat:.2f}×",
                f"≤ {FLAT_GOALS[table.key]:.2f}×",
            ]
        )
    return header, rows


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    align = ["---"] + ["---:"] * (len(header) - 1)
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def report_markdown(result: OverheadResult) -> str:
    """The whole ``docs/performance.md``: machine, method, how to reproduce, tables."""
    s = result.settings
    pinned = (
        f"The benchmark pins torch to {_threads(s.threads)} (`torch.set_num_threads`) for "
        "stable numbers; `run_overhead(threads=None)` in `benchmarks/overhead_bench.py` keeps "
        "torch's default."
    )
    return f"""# Performance

What gradguard costs per training step, between `loss.backward()` and `optimizer.step()`,
next to `torch.nn.utils.clip_grad_norm_`, the peer packages and a whole training step.
This file is generated by `benchmarks/overhead.py`; do not edit it by hand.

**Machine.** {result.machine.describe()}. {pinned}

**Method.** {_method(s)}

**Reading the tables.** "× torch clip" below 1 is faster than torch's foreach
`clip_grad_norm_`; "% of AdamW step" puts each cost on the scale of a whole training
step. On the GPT-like model the gradient passes are bound by memory bandwidth: compare
them with the floor. On the MLP, 1,000 tensors make per-tensor launches and Python
dominate. On the CPU, where reading a value back costs nothing, gradguard (like the
zclip package) skips the in-place multiply when the scale is exactly 1 and runs ZClip's
scalar rule on Python floats; on an accelerator it always multiplies and keeps every
number on the device, so it never waits for it. These two CPU shortcuts are the only ones
kept: `python benchmarks/clip_paths.py` times each host path against the device path it
replaces (NormClip's and AutoClip's host decision saved under 1 % and went). On a GPU each
`.item()` of the package and of the per-parameter logger is a host-device sync, which
these CPU tables do not measure.

**GPU: not measured.** No GPU has been available to these benchmark runs, so every
number here is a CPU number. On a GPU what a step costs is mostly the kernels it launches
and the host syncs it waits for. The CPU carries a proxy for the first:
`tests/test_dispatch_budget.py` counts the operators `guard.step` dispatches beyond the
optimizer's own, and those of each policy's `gg.clip_`, for 10 and for 1,000 parameter
tensors, with foreach and fused AdamW, and requires the same count for both (every
operator is at most one launch). Where a GPU is present, `tests/test_stats.py`,
`tests/test_clip.py` and `tests/test_guard.py` check with
`torch.cuda.set_sync_debug_mode("error")` that the statistics, the clip policies and a
guarded step do not sync.

**Reproduce.** From a checkout: `make bench` or `python benchmarks/overhead.py` (rewrites
this file; about {_round_up(result.elapsed_s)} s here); `gradguard bench` prints the same tables.

## Results

{result.to_markdown()}"""


def _round_up(seconds: float) -> int:
    return max(10, int(math.ceil(seconds / 10.0)) * 10)


def _method(s: Settings) -> str:
    return f"""All contenders run in one process, in {s.rounds} interleaved rounds:
each round times every contender once, in a shuffled order, as a block of back-to-back
calls lasting about {s.target_block_us / 1000:g} ms or more, far above timer noise; a row
reports the per-call median over the rounds and the fastest and slowest round. Garbage
collection is paused while timing. Gradients are real: one forward/backward on a small
batch. They are then rescaled to a global norm of {GRAD_NORM} and clipped once by AGC, so
that every threshold used here (`max_norm=1`, `clip_value=1`, the histories below) lies
above them: after a first call, each clip multiplies by exactly 1 (torch still runs
the multiply; gradguard skips it on the CPU). The gradients are views into one
flat buffer, restored from a copy at the start of every round, so nothing drifts towards
subnormals (checked: no subnormal gradient element before or after timing), and the
floor, one `sum()` over that buffer, reads the very bytes the contenders read. Stateful
policies are timed in their steady state: ZClip and the zclip package after 30 warm-up
steps (their warm-up is 25); AutoClip's sketch and the autoclip package's history
filled beforehand with heavy-tailed norms (Pareto, tail index {PARETO_ALPHA}, minimum 1)
and restored before each timed block. In that steady state the zclip package finds no
spike and skips its multiply: its cheapest path. gradguard rows call
`gradguard.clip_(model, policy)`: statistics, then the policy; per-layer norms are
computed when first read, so the policies other than NormClip skip them, while the
`grad_stats` and NormClip rows read them (all statistics, as the goal below states).
The `.item()` logger is
`{{name: p.grad.norm().item()}}` over the parameters. ValueClip and AGC are timed against
their peers on the same gradients: torch's `clip_grad_value_(foreach=True)` and timm's
`adaptive_clip_grad` (its own `utils/agc.py`), every tensor given to both
(`AGC(exclude=())`). At the fixed point above neither clips anything, the common case;
the rows "restore x1e4, then ..." time the other extreme, on a copy of the model whose
gradients are restored, scaled by {CLIPPING_SCALE:g}, before every call, so that every
gradient holds elements beyond the value bound and every unit exceeds AGC's bound; their
goals subtract the restore row (the copy timed alone). The flat-buffer row measures the
same gradients in the one buffer `gg.flatten_grads_` made on another copy of the model,
against the floor of the same bytes; two more rows, one `linalg.vector_norm` over those
bytes and the reads of every `p.grad` and `p.requires_grad`, price what any exact flat
path must do (see "What bounds the flat-buffer goal"). The training step is
`zero_grad(set_to_none=True)`, forward, backward and `torch.optim.AdamW(lr=1e-4).step()`
with torch's default implementation, on a copy of the same model, timed in the same
rounds; "% of AdamW step" divides each median by its median.

The guard's own cost is a subtraction within the same rounds: on another copy of the
model, whose gradients are views of the same buffer, `guard.step(loss)` of
`gg.Guard(model, optimizer, clip=gg.NormClip(1.0), detectors="default",
log_every={LOG_EVERY})` (per-layer statistics, the clip, the optimizer step, the ring
buffer, and a drain to the six default detectors and the explainer every {LOG_EVERY}
steps, with each layer's parameter norm and, on the drained step, the update ratios of
a subset of layers: a copy of at most the largest layer's weights before the optimizer
step) is timed next
to the bare `optimizer.step()` of the very same `torch.optim.AdamW(lr=1e-6)`
(two instances of one configuration were seen to differ by up to 3% in step time, 1.4 ms
on the GPT-like model, where they land in memory), and the cost is the difference of the
two medians. Two configurations: `foreach=True` (torch's default on GPUs; on the CPU its
default is a per-tensor loop, on which the guard takes the same path) and `fused=True`,
on which the guard skips on the device through `found_inf`, with no host read. A third
row, torch's `clip_grad_norm_` followed by the same optimizer step, minus the bare step,
prices torch's clip in the guard's position: after an optimizer step has streamed its
state through the caches, whereas back-to-back calls of the clip alone find the
gradients still cached. The guard's goal compares it with that row, like for like: in
a training loop both run between `backward()` and the optimizer step, on gradients in
the same cache state; the guard against the clip timed alone is shown as well, and on
the GPT-like model it mostly measures the cache (its gradients, 36 MB, are read again
from memory after each optimizer step). All three blocks hold the same number of
calls, a multiple of {LOG_EVERY}, and the guard's ring buffer is drained (untimed)
before each block, so every timed block holds whole drains and their cost is
amortised over the steps as in training. The weights are restored at the start of each
round; after timing, each optimizer has made as many steps as it was called bare plus
through the guard, and no non-finite event was raised (checked: no step was skipped)."""


def _rich_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> object:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for cells in rows:
        table.add_row(*cells)
    return table


def print_result(result: OverheadResult, console: Console | None = None) -> None:
    """Print the tables and goals to the terminal (rich if installed, else markdown)."""
    try:
        from rich.console import Console as RichConsole
    except ImportError:  # rich comes with the ``cli`` extra; plain markdown reads fine too
        print(result.to_markdown())
        return
    out = console if console is not None else RichConsole()
    s = result.settings
    out.print(
        f"[bold]gradguard overhead[/bold]: {result.machine.describe()}; median of {s.rounds} "
        f"interleaved rounds; {result.elapsed_s:.0f} s"
        + (" [yellow](quick mode: numbers are not meaningful)[/yellow]" if s.quick else "")
    )
    for table in result.models:
        out.print(_rich_table(table.title, *_model_cells(table)))
    out.print(_rich_table("Guard cost per step", *_guard_cost_cells(result.models)))
    out.print(_rich_table("Cost against history length", *_history_cells(result.history)))
    out.print(_rich_table("Goals", *_goal_cells(result.goals)))
    out.print(_rich_table("What bounds the flat-buffer goal", *_flat_bound_cells(result.models)))


# --------------------------------------------------------------------------- models


class _Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention, then a 4x GELU MLP."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.out = nn.Linear(4 * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = (
            part.view(b, t, self.heads, d // self.heads).transpose(1, 2)
            for part in self.qkv(self.ln1(x)).split(d, dim=2)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        out: Tensor = x + self.out(F.gelu(self.fc(self.ln2(x))))
        return out


class _GPT(nn.Module):
    """A GPT-2-shaped language model with a head tied to the token embedding."""

    def __init__(self, vocab: int, seq_len: int, d_model: int, heads: int, layers: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.tok.weight
        # GPT-2's initialisation. torch's N(0, 1) embedding, read back through the tied
        # head, gives logits of std ~16: a near one-hot softmax whose gradient is ~20%
        # subnormal floats, which makes every pass over it ~10x slower on a CPU.
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, 0.0, 0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits: Tensor = self.head(self.ln(x))
        return logits


class _ResidualTanh(nn.Module):
    """``x + tanh(W x + b) / sqrt(depth)``: 500 of them keep gradients finite and normal."""

    def __init__(self, width: int, branch_scale: float) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.branch_scale = branch_scale

    def forward(self, x: Tensor) -> Tensor:
        return x + self.branch_scale * torch.tanh(self.lin(x))


@dataclass(frozen=True)
class _Case:
    """A model, the loss of one fixed batch, and how to describe it."""

    key: str
    title: str
    description: str
    model: nn.Module
    loss: Callable[[nn.Module], Tensor]


def _gpt_case(quick: bool, gen: torch.Generator) -> _Case:
    vocab, seq_len, d_model, heads, layers, batch = (
        (512, 16, 32, 2, 2, 2) if quick else (16384, 128, 256, 4, 6, 4)
    )
    model = _GPT(vocab, seq_len, d_model, heads, layers)
    idx = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    targets = torch.randint(0, vocab, (batch, seq_len), generator=gen)

    def loss(m: nn.Module) -> Tensor:
        return F.cross_entropy(m(idx).reshape(-1, vocab), targets.reshape(-1))

    n, tensors = _count(model)
    return _Case(
        key="gpt",
        title=f"GPT-like: {n:,} parameters in {tensors} tensors",
        description=(
            f"{layers} pre-LN transformer blocks, d_model {d_model}, {heads} heads, MLP 4x, "
            f"vocabulary {vocab:,}, context {seq_len}, head tied to the token embedding. "
            f"Gradients and the training step from a batch of {batch} × {seq_len} tokens."
        ),
        model=model,
        loss=loss,
    )


def _mlp_case(quick: bool, gen: torch.Generator) -> _Case:
    depth, width, batch = (20, 32, 16) if quick else (500, 32, 64)
    model = nn.Sequential(*(_ResidualTanh(width, depth**-0.5) for _ in range(depth)))
    x = torch.randn(batch, width, generator=gen)
    y = torch.randn(batch, width, generator=gen)

    def loss(m: nn.Module) -> Tensor:
        return F.mse_loss(m(x), y)

    n, tensors = _count(model)
    return _Case(
        key="mlp",
        title=f"{depth}-layer MLP: {n:,} parameters in {tensors} tensors",
        description=(
            f"{depth} × Linear({width}, {width}) in residual tanh blocks "
            f"(x + tanh(Wx + b) / √{depth}): many small tensors, where per-tensor overhead "
            f"dominates. Gradients and the training step from a batch of {batch}, MSE loss."
        ),
        model=model,
        loss=loss,
    )


def _count(model: nn.Module) -> tuple[int, int]:
    params = [p for p in model.parameters() if p.requires_grad]
    return sum(p.numel() for p in params), len(params)


# --------------------------------------------------------------------------- timing


def _noop() -> None:
    """Nothing to reset."""


@dataclass(frozen=True)
class _Contender:
    """Something timed: ``fn`` runs once per call; ``reset`` runs untimed before a block.

    ``multiple``: the calls per block are a multiple of it (a guard's ``log_every``, so
    that every block holds whole drains).
    """

    name: str
    fn: Callable[[], object]
    reset: Callable[[], object] = _noop
    available: bool = True
    note: str = ""
    multiple: int = 1


def _missing(name: str, note: str = NOT_INSTALLED) -> _Contender:
    return _Contender(name, _noop, available=False, note=note)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Keep the cyclic garbage collector from firing inside a timed block (as timeit does)."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _time_block(contender: _Contender, calls: int) -> float:
    """Per-call µs of ``calls`` back-to-back calls, after an untimed reset."""
    contender.reset()
    fn = contender.fn
    start = time.perf_counter_ns()
    for _ in range(calls):
        fn()
    return (time.perf_counter_ns() - start) / calls / 1e3


def _calibrate(contender: _Contender, target_us: float) -> int:
    """Warm up (first calls allocate) and pick the calls per block to last ``target_us``."""
    _time_block(contender, 2)
    single = _time_block(contender, 1)
    calls = max(1, min(MAX_CALLS, math.ceil(target_us / max(single, 1e-3))))
    return math.ceil(calls / contender.multiple) * contender.multiple


def _time_rounds(
    contenders: Sequence[_Contender],
    settings: Settings,
    rng: random.Random,
    before_round: Callable[[], object] = _noop,
) -> dict[str, tuple[tuple[float, ...], int]]:
    """Time every available contender once per round, in a fresh shuffled order each round.

    Returns:
        For each contender that ran: its per-call µs in every round, and the calls per block.
    """
    active = [c for c in contenders if c.available]
    calls = {c.name: _calibrate(c, settings.target_block_us) for c in active}
    samples: dict[str, list[float]] = {c.name: [] for c in active}
    order = list(active)
    with _gc_paused():
        for _ in range(settings.rounds):
            before_round()
            rng.shuffle(order)
            for contender in order:
                samples[contender.name].append(_time_block(contender, calls[contender.name]))
    return {name: (tuple(values), calls[name]) for name, values in samples.items()}


def _rows(
    contenders: Sequence[_Contender],
    timings: dict[str, tuple[tuple[float, ...], int]],
    reference: Callable[[str], str],
    step: str | None = None,
) -> tuple[Row, ...]:
    """Rows in contender order; ratios are medians over the reference row's median."""
    medians = {name: statistics.median(values) for name, (values, _) in timings.items()}
    rows = []
    for contender in contenders:
        if contender.name not in timings:
            rows.append(
                Row(contender.name, (), 0, reference(contender.name), None, None, contender.note)
            )
            continue
        values, calls = timings[contender.name]
        ref = reference(contender.name)
        median = medians[contender.name]
        ratio = median / medians[ref] if ref in medians else None
        percent = 100.0 * median / medians[step] if step in medians else None
        rows.append(Row(contender.name, values, calls, ref, ratio, percent, contender.note))
    return tuple(rows)


# --------------------------------------------------------------------------- set-up


def _import_peer(name: str) -> ModuleType | None:
    """Import an optional peer package, or None when it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _grads(params: Sequence[Tensor]) -> list[Tensor]:
    grads = [p.grad for p in params]
    present = [g for g in grads if g is not None]
    if len(present) != len(grads):
        raise RuntimeError("benchmark model has a parameter without a gradient after backward")
    return present


def _subnormals(grads: Sequence[Tensor]) -> int:
    tiny = torch.finfo(torch.float32).tiny
    return sum(int(((g != 0) & (g.abs() < tiny)).sum()) for g in grads)


def _check_normal(grads: Sequence[Tensor], when: str) -> None:
    count = _subnormals(grads)
    if count:
        raise RuntimeError(
            f"{count} subnormal gradient elements {when}: the timings would measure the CPU's "
            "subnormal penalty, not the code. This is a bug in the benchmark's set-up."
        )


def _prepare_grads(model: nn.Module, params: Sequence[Tensor]) -> Tensor:
    """Rescale real gradients to :data:`GRAD_NORM`, then to AGC's fixed point; flatten them.

    Returns:
        One flat buffer holding every gradient, each ``p.grad`` now a view into it (as
        with DDP's ``gradient_as_bucket_view``): the floor reads exactly the bytes, in the
        same cache state, that the contenders read, and one copy restores them all.
    """
    grads = _grads(params)
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, GRAD_NORM / float(total))
    clip_(model, AGC())  # AGC clips some units once; later AGC calls leave them as they are
    flat = torch.cat([g.reshape(-1) for g in grads])
    _view_grads(params, flat)
    _check_normal([flat], "before timing")
    return flat


def _view_grads(params: Sequence[Tensor], flat: Tensor) -> None:
    """Make each ``p.grad`` a view into ``flat``, in order (another model may share them)."""
    offset = 0
    for param in params:
        param.grad = flat[offset : offset + param.numel()].view_as(param)
        offset += param.numel()


def _heavy_tailed_norms(count: int, gen: torch.Generator) -> Tensor:
    """Pareto(``PARETO_ALPHA``) norms, minimum 1: occasional spikes orders of magnitude up."""
    return torch.empty(count).exponential_(generator=gen).div_(PARETO_ALPHA).exp_()


def _filled_autoclip(norms: Tensor) -> AutoClip:
    """An AutoClip whose sketch has seen ``norms``, fed one step at a time (the real path)."""
    policy = AutoClip(percentile=PERCENTILE)
    for norm in norms:
        policy.observe(norm)
    return policy


def _autoclip_contender(
    name: str, apply: Callable[[AutoClip], object], filled: AutoClip
) -> _Contender:
    """A gradguard AutoClip with its sketch restored to ``filled``'s before every block."""
    state = filled.state_dict()
    policy = AutoClip(percentile=PERCENTILE)
    return _Contender(name, lambda: apply(policy), lambda: policy.load_state_dict(state))


def _quantile_clip(
    name: str, params: Sequence[Tensor], history: Tensor, history_length: int
) -> _Contender:
    """The autoclip package's QuantileClip, its history reset to ``history`` per block."""
    module = _import_peer("autoclip.torch")
    if module is None:
        return _missing(name, f"autoclip {NOT_INSTALLED}")
    clipper = module.QuantileClip(
        list(params),
        quantile=PERCENTILE / 100.0,
        history_length=history_length,
        global_threshold=True,
    )

    def reset() -> None:
        clipper.state["global_history"] = history.clone()

    return _Contender(name, clipper.step, reset)


def _timm_agc() -> ModuleType | None:
    """Timm's ``agc.py``, or None without timm.

    Through timm, or from its file alone: timm's package imports torchvision, which may be
    missing or built for another torch.
    """
    try:
        from timm.utils import agc

        return agc
    except Exception:  # noqa: BLE001 - any failure of timm's own imports: read the file
        try:
            spec = importlib.util.find_spec("timm")
        except (ImportError, ValueError):  # timm blocked, or imported without a spec
            return None
        if spec is None or spec.origin is None:
            return None
        path = Path(spec.origin).parent / "utils" / "agc.py"
        alone = importlib.util.spec_from_file_location("timm_agc_alone", path)
        if alone is None or alone.loader is None:
            return None
        module = importlib.util.module_from_spec(alone)
        alone.loader.exec_module(module)
        return module


def _zclip_package(model: nn.Module) -> _Contender:
    """The zclip package, past its warm-up."""
    module = _import_peer("zclip")
    if module is None:
        return _missing(ZCLIP_PACKAGE)
    clipper = module.ZClip(max_grad_norm=None)
    for _ in range(clipper.warmup_steps + 5):
        clipper.step(model)
    return _Contender(ZCLIP_PACKAGE, lambda: clipper.step(model))


def _warm_zclip(model: nn.Module) -> ZClip:
    policy = ZClip()
    for _ in range(policy.warmup_steps + 5):
        clip_(model, policy)
    return policy


def _item_logger(model: nn.Module) -> Callable[[], dict[str, float]]:
    """The per-step monitoring many loops do: one host read per parameter."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def log() -> dict[str, float]:
        return {n: p.grad.norm().item() for n, p in named if p.grad is not None}

    return log


def _train_step(model: nn.Module, loss: Callable[[nn.Module], Tensor]) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss(model))
        optimizer.step()

    return step


class _Guarded:
    """One AdamW stepped bare and through a guard, in separate blocks; counts bare steps.

    One optimizer serves both rows, so the guard is timed against the bare
    ``optimizer.step()`` it makes: two AdamW of the same configuration were seen to differ
    by up to 3% in step time (where their state lands in memory), 1.4 ms on the GPT-like
    model, a large part of the guard's own cost there. The guard's blocks start with an
    empty ring buffer (flushed before, untimed) and both rows hold whole multiples of
    ``LOG_EVERY`` calls.
    """

    def __init__(
        self, optimizer: str, names: tuple[str, str, str], model: nn.Module, loss: Tensor
    ) -> None:
        self.bare_steps = 0
        self.guard: Guard | None = None
        params = [p for p in model.parameters() if p.requires_grad]
        self.params = params
        foreach, fused = (True, None) if optimizer == "foreach" else (None, True)
        try:
            opt = torch.optim.AdamW(params, lr=GUARD_LR, foreach=foreach, fused=fused)
        except RuntimeError as error:  # fused needs a supported device and dtype
            note = f"AdamW({optimizer}) unsupported here: {error}"
            self.bare, self.clipped, self.guarded = (_missing(name, note) for name in names)
            return
        self.optimizer = opt
        guard = Guard(model, opt, clip=NormClip(1.0), detectors="default", log_every=LOG_EVERY)
        self.guard = guard
        self.bare = _Contender(names[0], self._bare_step, multiple=LOG_EVERY)
        self.clipped = _Contender(names[1], self._clipped_step, multiple=LOG_EVERY)
        marked = params[0]

        def guarded_step() -> None:
            # The timed gradients are reused: mark them written, as a backward would, or
            # the guard refuses a second step on the same gradients (about 1 µs).
            if marked.grad is not None:
                torch.autograd.graph.increment_version(marked.grad)
            guard.step(loss)

        self.guarded = _Contender(names[2], guarded_step, guard.flush, multiple=LOG_EVERY)

    def _bare_step(self) -> None:
        self.optimizer.step()
        self.bare_steps += 1

    def _clipped_step(self) -> None:
        nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        self.optimizer.step()
        self.bare_steps += 1

    def check_not_skipped(self) -> None:
        """Raise when the guard skipped a step: it would have timed another path."""
        guard = self.guard
        if guard is None:
            return
        param = next(p for p in guard.model.parameters() if p.requires_grad)
        state = self.optimizer.state[param]
        steps = int(state["step"]) if "step" in state else 0  # sync: after timing
        guard.flush()
        events = [e for e in guard.events if e.kind in ("nonfinite", "overflow")]
        if steps != self.bare_steps + guard.step_count or events:
            raise RuntimeError(
                f"the optimizer made {steps} steps in {self.bare_steps} bare calls and "
                f"{guard.step_count} guard calls, and the guard raised {events[:3]}: it "
                "skipped steps, so its timing is not that of a normal step. This is a bug "
                "in the benchmark's set-up."
            )


def _all_stats(model: nn.Module) -> GradStats:
    """Every statistic: per-layer norms are computed on first use, so use them."""
    stats = grad_stats(model)
    stats.per_layer  # noqa: B018 - computing it is the point
    return stats


def _reads_of(params: Sequence[Tensor]) -> Callable[[], object]:
    """Read every ``p.grad`` and ``p.requires_grad``, the cheapest way in Python."""
    grad, requires_grad = operator.attrgetter("grad"), operator.attrgetter("requires_grad")
    return lambda: (list(map(grad, params)), list(map(requires_grad, params)))


def _model_contenders(
    case: _Case,
    params: Sequence[Tensor],
    flat: Tensor,
    train_model: nn.Module,
    history: AutoClip,
    norms: Tensor,
    guarded: Sequence[_Guarded],
) -> list[_Contender]:
    model = case.model
    norm_clip, value_clip, z_clip = NormClip(1.0), ValueClip(1.0), _warm_zclip(model)
    agc = AGC(exclude=())
    flat_model = copy.deepcopy(model)  # its own flat buffer, holding the same gradients
    gg.flatten_grads_(flat_model)
    # The rows that clip on every call work on a copy whose gradients are restored, scaled
    # up, before each call; the other rows keep reading the unscaled buffer.
    clip_model = copy.deepcopy(model)
    clip_params = [p for p in clip_model.parameters() if p.requires_grad]
    clip_flat = flat.clone()
    _view_grads(clip_params, clip_flat)
    scaled = flat * CLIPPING_SCALE

    def restored(fn: Callable[[], object]) -> Callable[[], None]:
        def call() -> None:
            clip_flat.copy_(scaled)
            fn()

        return call

    timm_agc = _timm_agc()
    if timm_agc is None:
        agc_peer = _missing(AGC_PEER, f"timm {NOT_INSTALLED}")
        agc_peer_clipping = _missing(AGC_PEER_CLIPPING, f"timm {NOT_INSTALLED}")
    else:
        timm_clip = timm_agc.adaptive_clip_grad
        agc_peer = _Contender(AGC_PEER, lambda: timm_clip(params))
        agc_peer_clipping = _Contender(AGC_PEER_CLIPPING, restored(lambda: timm_clip(clip_params)))
    contenders = [
        _Contender(BASELINE, lambda: nn.utils.clip_grad_norm_(params, 1.0, foreach=True)),
        _Contender(GRAD_STATS, lambda: _all_stats(model)),
        _Contender(FLAT_STATS, lambda: _all_stats(flat_model)),
        _Contender(NORM_CLIP, lambda: clip_(model, norm_clip, _all_stats(model))),
        _Contender(VALUE_CLIP, lambda: clip_(model, value_clip)),
        _Contender(VALUE_PEER, lambda: nn.utils.clip_grad_value_(params, 1.0, foreach=True)),
        _autoclip_contender(AUTO_CLIP, lambda p: clip_(model, p), history),
        _Contender(Z_CLIP, lambda: clip_(model, z_clip)),
        _Contender(AGC_CLIP, lambda: clip_(model, agc)),
        agc_peer,
        _Contender(RESTORE, restored(_noop)),
        _Contender(VALUE_CLIPPING, restored(lambda: clip_(clip_model, value_clip))),
        _Contender(
            VALUE_PEER_CLIPPING,
            restored(lambda: nn.utils.clip_grad_value_(clip_params, 1.0, foreach=True)),
        ),
        _Contender(AGC_CLIPPING, restored(lambda: clip_(clip_model, agc))),
        agc_peer_clipping,
        _zclip_package(model),
        _quantile_clip(AUTOCLIP_PACKAGE, params, norms[:PACKAGE_HISTORY], PACKAGE_HISTORY),
        _Contender(ITEM_LOGGER, _item_logger(model)),
        _Contender(FLOOR, flat.sum),
        _Contender(NORM_FLOOR, lambda: torch.linalg.vector_norm(flat)),
        _Contender(VIEW_READS, _reads_of(params)),
        *(c for g in guarded for c in (g.bare, g.clipped, g.guarded)),
        _Contender(TRAIN_STEP, _train_step(train_model, case.loss)),
    ]
    if [c.name for c in contenders] != list(MODEL_ROWS):  # pragma: no cover - a typo guard
        raise RuntimeError("contender list and MODEL_ROWS disagree")
    return contenders


def _bench_model(
    case: _Case, settings: Settings, rng: random.Random, history: AutoClip, norms: Tensor
) -> ModelTable:
    model = case.model
    train_model = copy.deepcopy(model)  # its AdamW steps must not touch the measured grads
    # The guards and their bare AdamW step this copy's weights (so AGC's fixed point on
    # `model` holds); its gradients are views of the same buffer as `model`'s.
    stepped = copy.deepcopy(model)
    loss = case.loss(model)
    torch.autograd.backward(loss)
    params = [p for p in model.parameters() if p.requires_grad]
    flat = _prepare_grads(model, params)
    pristine = flat.clone()
    weights: list[Tensor] = [p for p in stepped.parameters() if p.requires_grad]
    _view_grads(weights, flat)
    saved = [w.detach().clone() for w in weights]
    guarded = [
        _Guarded(optimizer, (bare, clipped, guard), stepped, loss.detach())
        for optimizer, bare, clipped, guard in GUARD_ROWS
    ]
    contenders = _model_contenders(case, params, flat, train_model, history, norms, guarded)

    def restore() -> None:
        flat.copy_(pristine)
        with torch.no_grad():
            torch._foreach_copy_(weights, saved)

    timings = _time_rounds(contenders, settings, rng, before_round=restore)
    _check_normal([flat], "after timing")
    for pair in guarded:
        pair.check_not_skipped()
    n, tensors = _count(model)
    rows = _rows(contenders, timings, lambda _: BASELINE, step=TRAIN_STEP)
    return ModelTable(
        key=case.key,
        title=case.title,
        description=case.description,
        num_params=n,
        num_tensors=tensors,
        rows=rows,
        guard_costs=tuple(_guard_cost(case.key, rows, *names) for names in GUARD_ROWS),
    )


def _guard_cost(
    key: str, rows: Sequence[Row], optimizer: str, step_row: str, clip_row: str, guard_row: str
) -> GuardCost:
    """Difference of the medians (and per-round pairs) of ``guard_row`` and ``step_row``."""
    step, guard = _find(rows, step_row), _find(rows, guard_row)
    pairs = [g - s for g, s in zip(guard.samples_us, step.samples_us, strict=True)]
    return GuardCost(
        model=key,
        optimizer=optimizer,
        step_row=step_row,
        clip_row=clip_row,
        guard_row=guard_row,
        step_us=step.median_us,
        clip_step_us=_find(rows, clip_row).median_us,
        guard_us=guard.median_us,
        baseline_us=_find(rows, BASELINE).median_us,
        paired_us=statistics.median(pairs) if pairs else None,
        note=guard.note,
    )


def _bench_history(
    settings: Settings, gen: torch.Generator, rng: random.Random, old: AutoClip, norms: Tensor
) -> HistoryTable:
    """AutoClip at step 10 vs step N, and the autoclip package at history 10 vs full."""
    model = nn.Linear(256, 256)
    torch.autograd.backward(model(torch.randn(64, 256, generator=gen)).square().mean())
    params = list(model.parameters())
    _prepare_grads(model, params)
    stats = grad_stats(model)
    n = settings.history
    short = min(PACKAGE_HISTORY, n)
    young_name = "gg.AutoClip().clip_(stats), step 10"
    old_name = f"gg.AutoClip().clip_(stats), step {n:,}"
    package = f"autoclip QuantileClip(history_length={short:,}).step()"
    package_10 = f"{package}, history 10"
    contenders = [
        _autoclip_contender(young_name, lambda p: p.clip_(stats), _filled_autoclip(norms[:10])),
        _autoclip_contender(old_name, lambda p: p.clip_(stats), old),
        _quantile_clip(package_10, params, norms[:10], short),
        _quantile_clip(f"{package}, history {short:,} (full)", params, norms[:short], short),
        _quantile_clip(
            f"autoclip QuantileClip(history_length={n:,}).step(), history {n:,} (full)",
            params,
            norms[:n],
            n,
        ),
    ]
    timings = _time_rounds(contenders, settings, rng)
    rows = _rows(
        contenders, timings, lambda name: young_name if name.startswith("gg.") else package_10
    )
    return HistoryTable(
        description=(
            "Per-step cost of the history-based clippers on a Linear(256, 256) (tiny "
            "gradients, so the history's own cost is not hidden behind a pass over many "
            "bytes). gradguard's AutoClip is timed as the policy alone, on precomputed "
            f"statistics, after 10 and after {n:,} heavy-tailed norms fed through its real "
            "update path; its sketch is a fixed-size histogram, so the cost should not "
            "grow. The autoclip package keeps the last `history_length` norms in a tensor "
            "that it concatenates and sorts (`torch.quantile`) every step, so its cost "
            f"grows with the history; a history of {n:,} is what matching AutoClip's "
            "whole-run percentile over that many steps takes."
        ),
        rows=rows,
        steps=n,
        autoclip_young=young_name,
        autoclip_old=old_name,
    )


def _ratio(table: ModelTable, ours: str, theirs: str, minus: str | None = None) -> float | None:
    """Median of row ``ours`` over that of ``theirs``, both less row ``minus`` if given."""
    a, b = table.row(ours).median_us, table.row(theirs).median_us
    base = 0.0 if minus is None else table.row(minus).median_us
    if a is None or b is None or base is None or b - base <= 0:
        return None
    return (a - base) / (b - base)


def _goals(models: Sequence[ModelTable], history: HistoryTable) -> tuple[Goal, ...]:
    goals = [
        Goal(
            f"grad_stats + NormClip vs torch clip_grad_norm_, {t.key}", t.row(NORM_CLIP).ratio, 1.10
        )
        for t in models
    ]
    for table in models:
        ours, theirs = table.row(Z_CLIP).median_us, table.row(ZCLIP_PACKAGE).median_us
        goals.append(
            Goal(
                f"ZClip vs the zclip package, {table.key}",
                None if ours is None or theirs is None else ours / theirs,
                0.8,
                note=f"zclip {NOT_INSTALLED}",
            )
        )
    # Like for like: torch's clip priced where the guard's statistics run (after an
    # optimizer step, on gradients no longer in cache), not back to back on hot gradients.
    goals.extend(
        Goal(
            f"guard.step own cost vs torch clip_grad_norm_ before the same AdamW "
            f"{optimizer} step, {t.key}",
            t.guard_cost(optimizer).ratio_before_step,
            1.15,
            note=t.guard_cost(optimizer).note,
        )
        for t in models
        for optimizer, *_ in GUARD_ROWS
    )
    for table in models:
        key = table.key

        timm = f"timm {NOT_INSTALLED}"
        goals += [
            Goal(
                f"ValueClip vs torch clip_grad_value_, {key}",
                _ratio(table, VALUE_CLIP, VALUE_PEER),
                1.0,
            ),
            Goal(
                f"ValueClip vs torch clip_grad_value_, every gradient clipped, {key}",
                _ratio(table, VALUE_CLIPPING, VALUE_PEER_CLIPPING, RESTORE),
                1.0,
            ),
            Goal(
                f"AGC vs timm adaptive_clip_grad, {key}",
                _ratio(table, AGC_CLIP, AGC_PEER),
                1.0,
                timm,
            ),
            Goal(
                f"AGC vs timm adaptive_clip_grad, every unit clipped, {key}",
                _ratio(table, AGC_CLIPPING, AGC_PEER_CLIPPING, RESTORE),
                1.0,
                timm,
            ),
            Goal(f"AGC vs torch clip_grad_norm_, {key}", table.row(AGC_CLIP).ratio, 2.0),
            Goal(
                f"grad_stats with per-layer norms, flat buffer, vs the floor, {key}",
                _ratio(table, FLAT_STATS, FLOOR),
                FLAT_GOALS[key],
            ),
        ]
    old = history.row(history.autoclip_old)
    goals.append(
        Goal(f"AutoClip per-step cost at step {history.steps:,} vs step 10", old.ratio, 1.2)
    )
    return tuple(goals)


# --------------------------------------------------------------------------- entry point


def _machine(threads: int) -> Machine:
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), ""
            )
    except OSError:  # not Linux
        pass
    return Machine(
        cpu=cpu or platform.processor() or platform.machine() or "unknown CPU",
        cores=os.cpu_count() or 1,
        torch_version=torch.__version__,
        threads=threads,
        python=platform.python_version(),
        system=f"{platform.system()} {platform.release()}",
    )


def _validate(rounds: int, threads: int | None) -> None:
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        raise ConfigError(f"rounds must be an int >= 1 (30 or more for the docs), got {rounds!r}.")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ConfigError(
            f"threads must be None (torch's default) or an int >= 1, got {threads!r}."
        )


def run_overhead(
    rounds: int = 30, quick: bool = False, *, threads: int | None = 1, seed: int = 0
) -> OverheadResult:
    """Time gradguard's per-step gradient post-processing against torch and peer packages.

    Takes about two minutes on a quiet 2-core CPU (``quick``: a second or two). The caller's
    torch thread count and RNG state are restored afterwards.

    Args:
        rounds: interleaved rounds; medians and min-max are over these (30 or more for
            numbers worth publishing).
        quick: tiny models and a history of 2,000 norms instead of 100,000: a smoke test.
        threads: torch threads during the run; 1 (default) gives the most stable numbers,
            None keeps torch's current setting.
        seed: seeds the models, batches, norm history and the order within rounds.

    Returns:
        The tables, the goals with their measured values, and the settings.

    Raises:
        ConfigError: ``rounds`` or ``threads`` is not a positive int.
    """
    _validate(rounds, threads)
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        settings = Settings(
            rounds=rounds,
            quick=quick,
            threads=torch.get_num_threads(),
            seed=seed,
            target_block_us=200.0 if quick else 5000.0,
            history=2_000 if quick else 100_000,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            models, history = _run(settings)
    finally:
        torch.set_num_threads(previous_threads)
    return OverheadResult(
        settings=settings,
        machine=_machine(settings.threads),
        models=models,
        history=history,
        goals=_goals(models, history),
        elapsed_s=time.perf_counter() - started,
    )


def _run(settings: Settings) -> tuple[tuple[ModelTable, ...], HistoryTable]:
    gen = torch.Generator().manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    norms = _heavy_tailed_norms(settings.history, gen)
    old = _filled_autoclip(norms)
    models = tuple(
        _bench_model(make(settings.quick, gen), settings, rng, old, norms)
        for make in (_gpt_case, _mlp_case)
    )
    return models, _bench_history(settings, gen, rng, old, norms)
