"""Thin adapters that put a :class:`gradguard.Guard` inside trainers that step for you.

- :mod:`gradguard.integrations.lightning`: ``GradGuardCallback`` for ``lightning.Trainer``.
- :mod:`gradguard.integrations.transformers`: ``GradGuardCallback`` for
  ``transformers.Trainer``.
- :mod:`gradguard.integrations.accelerate`: ``prepare_guard`` for loops written with
  ``accelerate.Accelerator``, gradient accumulation included.

The two callbacks work the same way: when training starts they build the guard for the trainer's
model and optimizer and swap the optimizer the trainer steps for the guard's wrapped
one, so the trainer's own ``optimizer.step()`` runs ``guard.step(loss)``. Skips are then
the guard's exact skips. Neither adapter reads a device value on the host: the loss
reaches the guard as a device tensor and the logs are written at the guard's drains.
See ``docs/integrations.md``.

This module imports neither framework; each submodule imports its own. Its two helpers,
``check_guard_options`` and ``LossFedOptimizer``, are shared by the adapters and are not
public API.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from gradguard.errors import ConfigError
from gradguard.guard import Guard, GuardedOptimizer

_GUARD_OPTIONS = frozenset(inspect.signature(Guard).parameters) - {"model", "optimizer"}


def check_guard_options(
    options: Mapping[str, Any], owned: Mapping[str, str], owner: str = "GradGuardCallback"
) -> None:
    """Fail at construction on an option ``Guard`` does not take or the trainer owns.

    Args:
        options: the keyword arguments an adapter will pass to ``Guard``.
        owned: option name -> why the trainer, not the user, supplies it.
        owner: the adapter's name, for the messages.
    """
    for name in options:
        if name in owned:
            raise ConfigError(f"{owner} does not take {name}=: {owned[name]}")
        if name not in _GUARD_OPTIONS:
            raise ConfigError(
                f"{owner} got an unknown option {name!r}; it takes the options of "
                f"gg.Guard: {', '.join(sorted(_GUARD_OPTIONS - set(owned)))}."
            )


class LossFedOptimizer(GuardedOptimizer):
    """A guarded optimizer whose loss comes from the trainer's hooks, not the closure.

    Trainers call ``optimizer.step(closure)`` once per accumulated batch; the loss the
    guard should log (the mean over the micro-batches) is gathered on the device by the
    adapter's hooks and handed over by ``take_loss``. The closure still runs first, so
    trainers that compute the loss inside ``step`` (Lightning) keep their semantics.
    """

    def __init__(self, guard: Guard, take_loss: Callable[[], Tensor | None]) -> None:
        super().__init__(guard)
        self._take_loss = take_loss

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Run the closure, then ``guard.step`` with the gathered loss."""
        result = None
        if closure is not None:
            with torch.enable_grad():
                result = closure()
        loss: Tensor | float | None = self._take_loss()
        if loss is None and isinstance(result, Tensor | float):
            loss = result
        self.guard.step(loss)
        return result
