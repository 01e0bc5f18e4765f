"""The training pieces lab experiments share: batch streams, the loop, a recorder, evaluation.

Every experiment trains small models on the CPU the same way: shuffled index batches from
a data stream seeded apart from the model, ``zero_grad`` / forward / backward, then either
``guard.step(loss)`` (the guard steps the optimizer and the LR scheduler) or a plain
``optimizer.step()`` and ``scheduler.step()``. The per-step numbers come from the guard's
drains through :class:`Recorder`, so recording adds no host sync of its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gradguard.guard import Guard
from gradguard.lab._harness import data_generator
from gradguard.lab._records import Record
from gradguard.lab.data import N_TRAIN, load_digits
from gradguard.records import Event, StepReport, Window


def index_batches(
    n: int, batch_size: int, generator: torch.Generator, *, drop_last: bool = True
) -> Iterator[Tensor]:
    """Yield index batches of ``range(n)``, one shuffled epoch after another, forever.

    With ``drop_last`` an epoch's last, short batch is dropped (every batch has
    ``batch_size`` rows).
    """
    stop = n - batch_size + 1 if drop_last else n
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, stop, batch_size):
            yield order[start : start + batch_size]


def digit_batches(seed: int, batch_size: int) -> Iterator[Tensor]:
    """Index batches of the digits' training split, data seed ``1000 + seed``, full batches."""
    return index_batches(N_TRAIN, batch_size, data_generator(seed))


def digits_loss(model: nn.Module, index: Tensor) -> Tensor:
    """Cross-entropy of ``model`` on the training digits at ``index``."""
    digits = load_digits()
    return nn.functional.cross_entropy(model(digits.x_train[index]), digits.y_train[index])


def evaluate_digits(model: nn.Module) -> tuple[float, float]:
    """Return (test accuracy, training loss on the whole split), measured in eval mode."""
    digits = load_digits()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(digits.x_test).argmax(dim=1) == digits.y_test).float().mean())
        loss = float(nn.functional.cross_entropy(model(digits.x_train), digits.y_train))
    model.train()
    return accuracy, loss


class Recorder:
    """A sink that keeps every drained step in memory: the guard's own record of a run.

    A rollback makes the step numbers go back; ``steps`` keeps them in call order.
    """

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.loss: list[float] = []
        self.grad_norm: list[float] = []
        self.scale: list[float] = []
        self.finite: list[bool] = []
        self.lr: list[float] = []
        self.per_layer: list[list[float]] = []
        self.layer_names: tuple[str, ...] = ()
        self.skipped = 0
        self.events: list[Event] = []

    def open(self, meta: Mapping[str, Any]) -> None:
        """Nothing to set up."""

    def write(self, window: Window, events: Sequence[Event]) -> None:
        """Append the window's steps and events."""
        self.steps += window.steps.tolist()
        self.loss += window.loss.tolist()
        self.grad_norm += window.grad_norm.tolist()
        self.scale += window.scale.tolist()
        self.finite += window.finite.tolist()
        self.lr += window.lr.tolist()
        self.per_layer += window.per_layer.tolist()
        self.layer_names = window.layer_names
        self.skipped += int(window.skipped.sum())
        self.events += events

    def close(self) -> None:
        """Nothing to release."""

    def layer_columns(self, names: Sequence[str]) -> list[tuple[float, ...]]:
        """Per step, the gradient norms of the layers ``names``, in that order."""
        columns = [self.layer_names.index(n) for n in names]
        return [tuple(row[c] for c in columns) for row in self.per_layer]

    def event_dicts(self) -> tuple[dict[str, Any], ...]:
        """Every event, as ``Event.to_dict()``."""
        return tuple(e.to_dict() for e in self.events)


StepHook = Callable[[int, Tensor, StepReport | None], bool | None]
"""Called after each step as ``hook(step, loss, report)``; returning True stops the loop."""


def train_loop(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[Tensor],
    loss_of: Callable[[nn.Module, Tensor], Tensor],
    steps: int,
    *,
    guard: Guard | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    before_step: Callable[[int], None] | None = None,
    after_step: StepHook | None = None,
) -> int:
    """Train for ``steps`` steps (1-based) and return how many were taken.

    With a guard, ``guard.step(loss)`` steps the optimizer and the scheduler: the scheduler
    must be the guard's own (``Guard(scheduler=...)``), so a skipped step also skips the
    schedule. Without one, ``optimizer.step()`` and ``scheduler.step()`` run as usual.

    Raises:
        ValueError: a guard and a scheduler the guard does not hold are both given.
    """
    if guard is not None and scheduler is not None and guard.scheduler is not scheduler:
        raise ValueError("pass the scheduler to the Guard: guard.step() must step it.")
    step = 0
    for step in range(1, steps + 1):
        if before_step is not None:
            before_step(step)
        index = next(batches)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(model, index)
        loss.backward()  # type: ignore[no-untyped-call]
        report = None
        if guard is not None:
            report = guard.step(loss)
        else:
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
        if after_step is not None and after_step(step, loss, report):
            break
    return step


@dataclass(frozen=True)
class DigitsRun(Record):
    """The fields every record of a net trained on the digits has."""

    seed: int
    """Model seed (data seed ``1000 + seed``)."""
    train_loss: float
    """Cross-entropy on the training split after training."""
    test_accuracy: float
    loss: tuple[float, ...]
    """The batch loss of every step."""
    grad_norm: tuple[float, ...]
    """The global gradient norm of every step."""


@dataclass(frozen=True)
class GuardedRun(DigitsRun):
    """A :class:`DigitsRun` trained through a measuring guard (:func:`train_guarded`)."""

    init_ratio: float
    """First layer's (or block's) gradient norm over the last one's, at initialization."""
    events: tuple[dict[str, Any], ...]
    """The guard's detector events, as ``Event.to_dict()``."""


def train_guarded(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    seed: int,
    *,
    batch_size: int,
    steps: int,
    log_every: int,
    after_step: StepHook | None = None,
) -> tuple[Recorder, float, float]:
    """Train on the digits through a Guard that only measures (default detectors, no clip).

    Returns the guard's :class:`Recorder`, then the test accuracy and the training loss
    after training (:func:`evaluate_digits`).
    """
    recorder = Recorder()
    guard = Guard(model, optimizer, log_every=log_every, sinks=[recorder])
    batches = digit_batches(seed, batch_size)
    train_loop(model, optimizer, batches, digits_loss, steps, guard=guard, after_step=after_step)
    guard.close()
    return (recorder, *evaluate_digits(model))


def first_over_last(norms: Sequence[float]) -> float:
    """The first norm over the last one; NaN when the last is not positive."""
    return norms[0] / norms[-1] if norms[-1] > 0 else math.nan
