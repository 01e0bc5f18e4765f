"""What the framework adapters share: option checks, the loss-fed optimizer, guard building.

Private to :mod:`gradguard.integrations`; imports neither framework.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from gradguard.errors import ConfigError
from gradguard.guard import Guard, GuardedOptimizer
from gradguard.records import Event

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


def with_group(options: Mapping[str, Any], group: Any) -> dict[str, Any]:
    """A copy of the guard options, with ``process_group=group`` unless set or ``group`` is None.

    The guard measures the module inside the trainer's DDP wrapper: DDP's group makes it
    average the loss over the ranks (the gradients already are), so loss-based events and
    ``should_stop`` agree on every rank.
    """
    copied = dict(options)
    if group is not None:
        copied.setdefault("process_group", group)
    return copied


def ddp_group(module: object) -> Any:
    """The process group ``module`` averages its gradients over, when it is a DDP wrapper."""
    if isinstance(module, nn.parallel.DistributedDataParallel):
        return module.process_group
    return None


def guard_with_sink(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    options: Mapping[str, Any],
    group: Any,
    sink: Any,
) -> Guard:
    """The callback's guard: the user's options and sinks, then the trainer's ``sink``."""
    options = with_group(options, group)
    return Guard(model, optimizer, sinks=[*options.pop("sinks", ()), sink], **options)


def refuse_double_clip(
    log: logging.Logger, clip: object, conflict: str, warning: str, *args: object
) -> None:
    """Refuse the trainer's clipping while the guard clips; warn that it clips first otherwise.

    Args:
        log: the adapter's logger, for ``warning``.
        clip: the guard's ``clip`` option (None: the guard does not clip).
        conflict: the ConfigError's message when both clip.
        warning: the warning's %-format when only the trainer clips.
        *args: the values for ``warning``.
    """
    if clip is not None:
        raise ConfigError(conflict)
    log.warning(warning, *args)


class TrainerSink:
    """Base of the callbacks' sinks: the trainer owns what they write to.

    Subclasses write each drain (and :func:`log_event` each event); there is nothing to
    open or close.
    """

    def open(self, meta: Mapping[str, Any]) -> None:
        """Nothing to open: the trainer owns its logs."""

    def close(self) -> None:
        """Nothing to close: the trainer finalizes its logs."""


def log_event(log: logging.Logger, event: Event, main_process: bool) -> None:
    """Log ``event`` with its message on ``log``, from the main process only."""
    if main_process:
        log.warning("gradguard: %s", event)


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
