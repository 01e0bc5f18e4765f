"""What the guard refuses: checks made when it is built, before a step, and on a saved state.

Each check raises :class:`~gradguard.errors.ConfigError` naming what is wrong and what to
do instead; ``docs/guard.md`` lists them ("What the guard refuses").
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from gradguard._guarded_optimizer import GuardedOptimizer
from gradguard.detect import default_detectors
from gradguard.errors import ConfigError
from gradguard.protocols import ClipPolicy, Detector, Recovery
from gradguard.stats import named_parameters

if TYPE_CHECKING:
    from gradguard.guard import Guard


class _Registrations:
    """Counts parameter and submodule registrations on any module, process-wide.

    A guard compares the count at each step (one integer): when it moved, some module
    gained a parameter or a submodule, and the guard checks its own model once.
    """

    count = 0
    installed = False

    @classmethod
    def install(cls) -> None:
        if cls.installed:
            return

        def bump(*_args: Any) -> None:
            cls.count += 1

        from torch.nn.modules import module as module_mod

        module_mod.register_module_parameter_registration_hook(bump)
        module_mod.register_module_module_registration_hook(bump)
        cls.installed = True


def _optimizer_shape(optimizer: torch.optim.Optimizer) -> tuple[int, ...]:
    """How many parameters each group holds: changes when a group or parameter is added."""
    return tuple(len(group["params"]) for group in optimizer.param_groups)


def _check_parameters(model: nn.Module) -> None:
    """Parameters the guard can measure: real (not ``meta``) floating-point tensors."""
    for name, param in named_parameters(model):
        if not param.requires_grad:
            continue
        if param.is_meta:
            raise ConfigError(
                f"parameter {name} is on the 'meta' device (no data): materialize the model "
                "first (model.to_empty(device=...) and initialize it), then build the Guard."
            )
        if param.is_complex():
            raise ConfigError(
                f"parameter {name} is complex ({param.dtype}): the guard measures real "
                "floating-point gradients only; keep real and imaginary parts as two real "
                "parameters (torch.view_as_real) to guard this model."
            )


def _check_optimizer_params(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The optimizer must step the model's parameters only: the guard measures those."""
    owned = {id(p) for p in model.parameters()}
    foreign = [
        (i, tuple(p.shape))
        for i, group in enumerate(optimizer.param_groups)
        for p in group["params"]
        if id(p) not in owned
    ]
    if foreign:
        shown = ", ".join(f"group {i}: {list(shape)}" for i, shape in foreign[:4])
        more = f" and {len(foreign) - 4} more" if len(foreign) > 4 else ""
        raise ConfigError(
            f"the optimizer steps {len(foreign)} tensor(s) that are not parameters of the "
            f"model ({shown}{more}): the guard measures the model's gradients only, so a "
            "NaN there would reach the weights. Build the optimizer from "
            "model.parameters(), or give the Guard the model that owns them."
        )


_STATE_KEYS = ("step_count", "should_stop", "sync_count", "clip", "detectors", "events")


def _check_saved_state(guard: Guard, state: object) -> None:
    """Refuse a saved guard state that would not describe this guard's run."""
    if not isinstance(state, Mapping):
        raise ConfigError(
            f"load_state_dict takes the dict guard.state_dict() returned, got "
            f"{type(state).__name__}."
        )
    missing = [key for key in _STATE_KEYS if key not in state]
    if missing:
        raise ConfigError(
            f"this is not a saved guard state (missing {', '.join(missing)}): pass what "
            "guard.state_dict() returned (not the model's or the optimizer's state dict)."
        )
    names = state.get("layer_names")
    if names is not None and list(names) != list(guard.layer_names):
        differ = sorted(set(names) ^ set(guard.layer_names))[:4]
        raise ConfigError(
            "the saved guard state is of another model (its layers differ"
            + (f": {', '.join(differ)}" if differ else ": their order")
            + "): load the state saved with this model."
        )
    saved_detectors = state["detectors"]
    if not isinstance(saved_detectors, Sequence) or len(saved_detectors) != len(guard.detectors):
        count = len(saved_detectors) if isinstance(saved_detectors, Sequence) else "?"
        raise ConfigError(
            f"the saved guard had {count} detectors, this one has {len(guard.detectors)}: "
            "build the guard with the same detectors to resume."
        )
    types = state.get("detector_types")
    mine = [type(d).__name__ for d in guard.detectors]
    if types is not None and list(types) != mine:
        raise ConfigError(
            f"the saved guard's detectors are {list(types)}, this one's {mine}: build the "
            "guard with the same detectors, in the same order, to resume."
        )
    if (state["clip"] is None) != (guard.clip is None):
        raise ConfigError("the saved guard and this one differ in having a clip policy.")
    clip_type = state.get("clip_type")
    if clip_type is not None and clip_type != type(guard.clip).__name__:
        raise ConfigError(
            f"the saved guard clipped with {clip_type}, this one with "
            f"{type(guard.clip).__name__}: build the guard with the same policy to resume."
        )


def _detectors(value: Literal["default"] | Sequence[Detector] | None) -> list[Detector]:
    if value is None:
        return []
    if isinstance(value, str):
        if value != "default":
            raise ConfigError(f"detectors must be 'default', a list or None, got {value!r}.")
        return default_detectors()
    detectors = list(value)
    for d in detectors:
        if not isinstance(d, Detector):
            raise ConfigError(
                f"detectors must be detector objects such as gg.detect.Spike(), got "
                f"{type(d).__name__}."
            )
    return detectors


#: The longest drain interval: the device buffer holds this many rows of statistics.
MAX_LOG_EVERY = 10_000


def _check_optimizer(optimizer: object) -> None:
    """An optimizer the guard can step: a plain ``torch.optim.Optimizer``, no closure."""
    if not isinstance(optimizer, torch.optim.Optimizer) or isinstance(optimizer, GuardedOptimizer):
        raise ConfigError(
            f"optimizer must be a torch.optim.Optimizer (not a guarded one), got "
            f"{type(optimizer).__name__}."
        )
    if type(optimizer).__module__.startswith("accelerate.") and hasattr(optimizer, "optimizer"):
        raise ConfigError(
            f"the optimizer is accelerate's {type(optimizer).__name__}: build the guard with "
            "gradguard.integrations.accelerate.prepare_guard(accelerator, model, optimizer, "
            "...), which steps the optimizer inside it (keeping a fused optimizer's sync-free "
            "skip) and acts once per accumulated step."
        )
    step = inspect.signature(type(optimizer).step)
    closure = step.parameters.get("closure")
    if isinstance(optimizer, torch.optim.LBFGS) or (
        closure is not None and closure.default is inspect.Parameter.empty
    ):
        raise ConfigError(
            f"{type(optimizer).__name__} needs a closure that re-evaluates the loss several "
            "times per step, so one backward's gradients do not decide the step: the guard "
            "cannot measure or skip it. Use a first-order optimizer (SGD, Adam, AdamW), or "
            "clip inside the closure with gg.clip_(model, policy)."
        )


def _check_scheduler(scheduler: object, optimizer: object) -> None:
    """A scheduler the guard can step after each real step: an LR scheduler of ``optimizer``."""
    if scheduler is None:
        return
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise ConfigError(
            "ReduceLROnPlateau steps on a validation metric, not once per optimizer step: "
            "do not pass it to the Guard; call scheduler.step(val_loss) yourself after each "
            "evaluation (the guard reads the learning rate the optimizer holds)."
        )
    if not isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
        raise ConfigError(
            f"scheduler must be a torch.optim.lr_scheduler.LRScheduler, got "
            f"{type(scheduler).__name__}."
        )
    if scheduler.optimizer is not optimizer:
        raise ConfigError(
            "the scheduler was built for another optimizer: build it on the optimizer "
            "given to the Guard (torch.optim.lr_scheduler.X(optimizer, ...))."
        )


def _validate(
    model: object,
    optimizer: object,
    clip: object,
    nonfinite: str,
    recovery: object,
    scheduler: object,
    log_every: object,
    on_event: object,
) -> None:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be an nn.Module, got {type(model).__name__}.")
    _check_optimizer(optimizer)
    if clip is not None and not isinstance(clip, ClipPolicy):
        raise ConfigError(
            f"clip must be a policy such as gg.NormClip(1.0) or None, got {type(clip).__name__}."
        )
    if nonfinite not in ("skip", "raise", "zero"):
        raise ConfigError(f"nonfinite must be 'skip', 'raise' or 'zero', got {nonfinite!r}.")
    if recovery is not None and not isinstance(recovery, Recovery):
        raise ConfigError(
            f"recovery must be a strategy such as gg.Rollback() or None, got "
            f"{type(recovery).__name__}."
        )
    _check_scheduler(scheduler, optimizer)
    if (
        not isinstance(log_every, int)
        or isinstance(log_every, bool)
        or not 1 <= log_every <= MAX_LOG_EVERY
    ):
        raise ConfigError(
            f"log_every must be an int in [1, {MAX_LOG_EVERY}], got {log_every!r}: the guard "
            "keeps that many steps of statistics on the device between drains."
        )
    if on_event is not None and not callable(on_event):
        raise ConfigError("on_event must be a callable taking an Event.")


def _check_accumulation(value: object) -> None:
    if callable(value):
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(
            f"accumulation_steps must be an int >= 1 (micro-batches per optimizer step) or a "
            f"function returning True on the last micro-batch, got {value!r}."
        )


def check_parameter_set(
    model: nn.Module, measured: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer
) -> None:
    """After a model or optimizer change: refuse what the guard would not measure.

    The guard measures the parameters it saw when it was built; a parameter stepped by the
    optimizer but not measured could take a NaN into the weights.
    """
    ids = {id(p) for p in measured}
    new = [name for name, p in named_parameters(model) if p.requires_grad and id(p) not in ids]
    if new:
        shown = ", ".join(new[:6]) + (f" and {len(new) - 6} more" if len(new) > 6 else "")
        raise ConfigError(
            f"the model has parameters the guard was not built with: {shown}. A module "
            "or parameter was added (or replaced) after the Guard was made: build a new "
            "Guard for the changed model (and give its optimizer the new parameters)."
        )
    _check_optimizer_params(model, optimizer)
