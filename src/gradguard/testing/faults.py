"""Deterministic fault injection, to test a training loop against what goes wrong for real.

A :class:`FaultInjector` wraps each training step in a context. On the steps its schedule
names, it puts NaN or Inf into one gradient tensor, multiplies every gradient by a factor
(a spike), corrupts the loss (the model's output becomes NaN, so the loss and every
gradient do), or multiplies the learning rate for ``k`` optimizer steps (a real divergence,
not a synthetic one). Everything is done with hooks registered on entry and removed on
exit, so a disabled injector, or a step without a fault, leaves no trace::

    injector = FaultInjector(model, optimizer, probability=0.02, seed=0)
    for x, y in loader:
        with injector.step():
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            guard.step(loss)
    injector.log  # [Fault(step=..., kind=..., target=...), ...]
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from gradguard.errors import ConfigError

FaultKind = Literal["nan", "inf", "spike", "loss", "lr"]
KINDS: tuple[FaultKind, ...] = ("nan", "inf", "spike", "loss", "lr")


@dataclass(frozen=True)
class Fault:
    """One injected fault: the injector's step, the kind and what it hit."""

    step: int
    kind: FaultKind
    target: str = ""


class FaultInjector:
    """Inject faults into a model's gradients, loss or learning rate on a schedule.

    Args:
        model: the module being trained.
        optimizer: its optimizer (for LR faults; optional otherwise).
        at: explicit schedule ``{step: kind}`` (steps count from 1, one per
            :meth:`step` context).
        probability: otherwise, the chance of a fault at each step, with kinds drawn
            uniformly from ``kinds``.
        kinds: the kinds a random schedule draws from.
        seed: seeds the random schedule and the choice of target tensors.
        parameter: the parameter name to corrupt for NaN/Inf; random when None.
        spike_factor: gradient multiplier of a ``spike``.
        lr_factor: LR multiplier of an ``lr`` fault, held for ``lr_steps`` optimizer steps.
        lr_steps: how many optimizer steps an ``lr`` fault lasts.
        enabled: False makes every context a no-op.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        at: Mapping[int, FaultKind] | None = None,
        probability: float = 0.0,
        kinds: Sequence[FaultKind] = ("nan", "inf", "spike", "loss"),
        seed: int = 0,
        parameter: str | None = None,
        spike_factor: float = 1e6,
        lr_factor: float = 100.0,
        lr_steps: int = 10,
        enabled: bool = True,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.at = dict(at or {})
        for kind in [*self.at.values(), *kinds]:
            if kind not in KINDS:
                raise ConfigError(f"unknown fault kind {kind!r}; choose from {KINDS}.")
        if ("lr" in self.at.values() or "lr" in kinds) and optimizer is None:
            raise ConfigError("'lr' faults need the optimizer: FaultInjector(model, optimizer).")
        if not 0.0 <= probability <= 1.0:
            raise ConfigError(f"probability must lie in [0, 1], got {probability!r}.")
        self.probability = probability
        self.kinds = tuple(kinds)
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        if parameter is not None and parameter not in self.names:
            raise ConfigError(
                f"parameter {parameter!r} is not a trainable parameter of the model; "
                f"choose from {self.names[:6]}{'...' if len(self.names) > 6 else ''}."
            )
        self.parameter = parameter
        self.spike_factor = float(spike_factor)
        self.lr_factor = float(lr_factor)
        if not isinstance(lr_steps, int) or lr_steps < 1:
            raise ConfigError(f"lr_steps must be an int >= 1, got {lr_steps!r}.")
        self.lr_steps = lr_steps
        self.enabled = enabled
        self.steps = 0
        self.log: list[Fault] = []
        self._rng = random.Random(seed)
        self._lr_left = 0

    def _planned(self) -> FaultKind | None:
        if self.steps in self.at:
            return self.at[self.steps]
        if self.probability and self._rng.random() < self.probability:
            return self._rng.choice(self.kinds)
        return None

    @contextlib.contextmanager
    def step(self) -> Iterator[Fault | None]:
        """A context around one training step; yields the fault it injects, if any."""
        self.steps += 1
        kind = self._planned() if self.enabled else None
        handles: list[RemovableHandle] = []
        fault: Fault | None = None
        if kind is not None:
            fault = self._arm(kind, handles)
            self.log.append(fault)
        if self._lr_left > 0 and self.optimizer is not None:
            handles += self._arm_lr()
        try:
            yield fault
        finally:
            for handle in handles:
                handle.remove()

    def _arm(self, kind: FaultKind, handles: list[RemovableHandle]) -> Fault:
        params = dict(self.model.named_parameters())
        if kind in ("nan", "inf"):
            name = self.parameter or self._rng.choice(self.names)
            value = math.nan if kind == "nan" else math.inf
            handles.append(
                params[name].register_post_accumulate_grad_hook(_poison(value))  # type: ignore[no-untyped-call]
            )
            return Fault(self.steps, kind, name)
        if kind == "spike":
            for name in self.names:
                hook = _scale(self.spike_factor)
                handles.append(params[name].register_post_accumulate_grad_hook(hook))  # type: ignore[no-untyped-call]
            return Fault(self.steps, kind, "all gradients")
        if kind == "loss":
            handles.append(self.model.register_forward_hook(_nan_output))
            return Fault(self.steps, kind, "model output")
        self._lr_left = self.lr_steps
        return Fault(self.steps, kind, f"lr x{self.lr_factor:g} for {self.lr_steps} steps")

    def _arm_lr(self) -> list[RemovableHandle]:
        """Multiply the LR during the optimizer step only, so schedulers never see it."""
        assert self.optimizer is not None
        saved: list[Any] = []

        def before(optimizer: torch.optim.Optimizer, *_: Any) -> None:
            saved[:] = [g["lr"] for g in optimizer.param_groups]
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * self.lr_factor

        def after(optimizer: torch.optim.Optimizer, *_: Any) -> None:
            for group, lr in zip(optimizer.param_groups, saved, strict=True):
                group["lr"] = lr
            self._lr_left -= 1

        return [
            self.optimizer.register_step_pre_hook(before),
            self.optimizer.register_step_post_hook(after),
        ]


def _poison(value: float) -> Any:
    def hook(param: Tensor) -> None:
        if param.grad is not None:
            param.grad.view(-1)[0] = value

    return hook


def _scale(factor: float) -> Any:
    def hook(param: Tensor) -> None:
        if param.grad is not None:
            param.grad.mul_(factor)

    return hook


def _nan_output(module: nn.Module, args: Any, output: Any) -> Any:
    if isinstance(output, Tensor):
        return output * math.nan
    return output
