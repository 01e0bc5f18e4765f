"""``GuardedOptimizer``: an optimizer whose ``step()`` runs a guard, for trainers that step."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from gradguard.guard import Guard


class GuardedOptimizer(torch.optim.Optimizer):
    """An optimizer whose ``step()`` runs the guard: for trainers that step it themselves.

    ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's, so LR
    schedulers and framework code that read them keep working.
    """

    def __init__(self, guard: Guard) -> None:  # no super().__init__: everything delegates
        self.guard = guard
        self.optimizer = guard.optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The wrapped optimizer's parameter groups."""
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:
        """The wrapped optimizer's state."""
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        """The wrapped optimizer's defaults."""
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Run the closure (if any) for the loss, then ``guard.step(loss)``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.guard.step(loss if isinstance(loss, Tensor | float) else None)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of the wrapped optimizer's parameters.

        With the guard's flat buffer (``flat_grads=True``) the buffer is zeroed and every
        gradient stays its view, whatever ``set_to_none`` asks: that is what the buffer is for.
        """
        if self.guard.flat_grads is not None:
            self.guard.flat_grads.zero_()
            return
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the wrapped optimizer."""
        self.optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer."""
        self.optimizer.add_param_group(param_group)

    def __repr__(self) -> str:
        return f"GuardedOptimizer({self.optimizer!r})"

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
