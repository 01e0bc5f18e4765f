"""Hugging Face: ``GradGuardCallback`` puts a :class:`gradguard.Guard` in ``transformers.Trainer``.

One line::

    trainer = Trainer(..., callbacks=[GradGuardCallback(clip=gg.NormClip(1.0))])

Trainer callbacks cannot veto an optimizer step, so at ``on_train_begin`` the callback
builds the guard for the model and the Trainer's optimizer (whichever it is: the one
``create_optimizer`` made or the one given through ``optimizers=``) and installs the
guard's wrapped optimizer inside accelerate's ``AcceleratedOptimizer``, the object the
Trainer steps. The Trainer's ``optimizer.step()`` then runs ``guard.step(loss)``: a
non-finite step is skipped exactly. The loss reaches the guard as a device tensor from a
forward hook (the model output's ``loss``), so a NaN loss is reported, never hidden.
When the guard sets ``should_stop`` (divergence), the callback stops training.

Under DDP (several processes) the guard is given the data-parallel group, so the loss it
logs and detects on is the mean over the ranks and every rank takes the same decisions;
with FSDP2 (DTensor parameters) the guard reduces the gradient norms itself. FSDP1
(``FullyShardedDataParallel``) is refused. See ``docs/integrations.md`` and
``docs/distributed.md``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

try:
    from accelerate.optimizer import AcceleratedOptimizer  # type: ignore[import-untyped]
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.training_args import ParallelMode
except ModuleNotFoundError as error:  # pragma: no cover - depends on the extras installed
    raise ModuleNotFoundError(
        f"{__name__} needs transformers and accelerate: pip install 'gradguard[transformers]'"
    ) from error

from gradguard import _distributed
from gradguard.errors import ConfigError
from gradguard.guard import Guard, GuardedOptimizer
from gradguard.integrations._common import (
    LossFedOptimizer,
    TrainerSink,
    check_guard_options,
    guard_with_sink,
    log_event,
    refuse_double_clip,
)
from gradguard.records import Event, Window

__all__ = ["GradGuardCallback"]

_log = logging.getLogger(__name__)

_OWNED = {
    "scheduler": "the Trainer steps its lr_scheduler itself.",
    "scaler": "accelerate owns the GradScaler, and fp16 is not supported; use bf16=True.",
}


class GradGuardCallback(TrainerCallback):
    """Guard every optimizer step of a ``transformers.Trainer`` run.

    Skipped steps leave the weights and the optimizer state bitwise unchanged, also with
    gradient accumulation (a NaN in any micro-batch makes the accumulated gradient
    non-finite). Each drain appends a summary row and one marker row per event to
    ``state.log_history`` (saved with every checkpoint) and logs each event with its
    message on the ``gradguard`` Python logger; ``run_dir=`` keeps every step in the run
    directory.

    Args:
        **guard_options: options of :class:`gradguard.Guard` (``clip``, ``nonfinite``,
            ``detectors``, ``recovery``, ``log_every``, ``run_dir``, ``on_event``,
            ``sinks``); not ``scheduler`` or ``scaler``, which the Trainer owns.

    Attributes:
        guard: the guard of the current or last ``train()`` (None before the first).
    """

    def __init__(self, **guard_options: Any) -> None:
        check_guard_options(guard_options, _OWNED)
        self.guard_options = guard_options
        self.guard: Guard | None = None
        self._accelerated: Any = None
        self._optimizer: torch.optim.Optimizer | None = None  # the one the Trainer built
        self._hook: RemovableHandle | None = None
        self._loss: Tensor | None = None
        self._micro_batches = 0

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Build the guard and install it inside the optimizer the Trainer steps."""
        model, accelerated = kwargs.get("model"), _accelerated(kwargs.get("optimizer"))
        if not isinstance(model, nn.Module):
            raise ConfigError("GradGuardCallback needs the Trainer's model at on_train_begin.")
        _check(args, accelerated.scaler, self.guard_options)
        _check_sharding(model)
        optimizer = accelerated.optimizer
        if isinstance(optimizer, GuardedOptimizer):  # left by a train() that raised
            optimizer = optimizer.optimizer
        # The guard measures the model, not the DDP wrapper the Trainer steps through.
        group = _data_parallel_group(args, model)
        self.guard = guard_with_sink(
            model, optimizer, self.guard_options, group, _HistorySink(state)
        )
        # The guard's steps are the Trainer's global_step after each update, also when the
        # Trainer resumes from a checkpoint: a run_dir then continues the earlier run's logs.
        self.guard.step_count = state.global_step
        self._loss, self._micro_batches = None, 0
        self._hook = model.register_forward_hook(self._gather_loss)
        accelerated.optimizer = LossFedOptimizer(self.guard, self._take_loss)
        self._accelerated, self._optimizer = accelerated, optimizer

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Stop training when the guard says so (the ``Divergence`` detector, at a drain)."""
        if self.guard is not None and self.guard.should_stop:
            control.should_training_stop = True

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Drain the last steps, remove the hook and give the Trainer its optimizer back."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._accelerated is not None:
            self._accelerated.optimizer = self._optimizer
            self._accelerated = self._optimizer = None
        if self.guard is not None:
            self.guard.close()

    def _gather_loss(self, module: nn.Module, args: Any, output: Any) -> None:
        """Forward hook: add a training forward's loss to the step's, on the device."""
        if not (module.training and torch.is_grad_enabled() and isinstance(output, Mapping)):
            return
        loss = output.get("loss")
        if isinstance(loss, Tensor) and loss.numel() == 1:
            detached = loss.detach().float().reshape(())
            self._loss = detached if self._loss is None else self._loss + detached
            self._micro_batches += 1

    def _take_loss(self) -> Tensor | None:
        """The mean loss over the micro-batches of this optimizer step."""
        if self._loss is None:
            return None
        loss = self._loss / self._micro_batches
        self._loss, self._micro_batches = None, 0
        return loss


class _HistorySink(TrainerSink):
    """Writes each drain to ``state.log_history`` and each event to the Python log.

    Rows hold numbers only, as the Trainer's own do: a summary per drain and a
    ``gradguard/event/<kind>`` marker per event. Steps are the guard's, which the callback
    numbers as the Trainer's ``global_step`` after that optimizer step (the step its own
    rows carry).
    """

    def __init__(self, state: TrainerState) -> None:
        self.state = state

    def write(self, window: Window, events: Sequence[Event]) -> None:
        """Append one summary row for the drain and one marker row per event."""
        finite = window.grad_norm[np.isfinite(window.grad_norm)]
        history = self.state.log_history
        history.append(
            {
                "gradguard/skipped": int(window.skipped.sum()),
                "gradguard/clipped": int(window.clipped.sum()),
                "gradguard/grad_norm_max": float(finite.max()) if finite.size else math.nan,
                "gradguard/scale_min": float(window.scale.min()),
                "step": int(window.steps[-1]),
            }
        )
        for event in events:
            log_event(_log, event, self.state.is_world_process_zero)
            history.append({f"gradguard/event/{event.kind}": 1.0, "step": event.step})


def _accelerated(optimizer: object) -> Any:
    """The Trainer's optimizer, if it is the plain accelerate wrapper the adapter supports."""
    if type(optimizer) is not AcceleratedOptimizer:
        raise ConfigError(
            f"GradGuardCallback steps through accelerate's AcceleratedOptimizer, but the Trainer "
            f"steps a {type(optimizer).__name__} (DeepSpeed and SageMaker optimizers step "
            "inside their engine and are not supported)."
        )
    return optimizer


def _data_parallel_group(args: TrainingArguments, model: nn.Module) -> Any:
    """The group DDP averages the gradients over, when the Trainer runs data-parallel.

    None on one process and for DTensor (FSDP2, tensor-parallel) parameters, whose
    norms the guard reduces over their own device mesh. Accelerate's DDP wrapper uses the
    default group.
    """
    if args.parallel_mode != ParallelMode.DISTRIBUTED or not _distributed.available():
        return None
    if torch.distributed.get_world_size() < 2:
        return None
    if any(_distributed.is_dtensor(p) for p in model.parameters()):
        return None
    return torch.distributed.group.WORLD


def _check_sharding(model: nn.Module) -> None:
    """Refuse FSDP1: its gradients are flat per-rank shards the guard cannot reduce."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ConfigError(
            "GradGuardCallback does not support FSDP1 (FullyShardedDataParallel): each rank "
            "holds a flat shard of the gradients that is not a DTensor, so the guard would "
            "measure and decide on its own shard only and the ranks would disagree. Use FSDP2: "
            "fsdp_config={'version': 2} (the default), whose DTensor gradients the guard "
            "reduces over the ranks."
        )


def _check(args: TrainingArguments, scaler: object, options: Mapping[str, Any]) -> None:
    if scaler is not None:
        raise ConfigError(
            "GradGuardCallback does not support fp16=True: accelerate's GradScaler skips "
            "overflowed steps before the guard sees them and steps the optimizer around it. "
            "Use bf16=True (or fp32)."
        )
    if args.max_grad_norm and args.max_grad_norm > 0:
        refuse_double_clip(
            _log,
            options.get("clip"),
            f"both TrainingArguments(max_grad_norm={args.max_grad_norm}) and "
            f"GradGuardCallback(clip={options.get('clip')!r}) clip the gradients; set "
            "max_grad_norm=0 and keep the guard's policy, which logs the norm before "
            "clipping.",
            "gradguard: the Trainer clips the gradients (max_grad_norm=%s) before the guard "
            "measures them, so the logged norms are the clipped ones; prefer max_grad_norm=0 "
            "and GradGuardCallback(clip=gg.NormClip(%s)).",
            args.max_grad_norm,
            args.max_grad_norm,
        )
