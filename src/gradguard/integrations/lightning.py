"""Lightning: ``GradGuardCallback`` puts a :class:`gradguard.Guard` inside ``lightning.Trainer``.

One line::

    trainer = L.Trainer(callbacks=[GradGuardCallback(clip=gg.ZClip())])

At fit start the callback builds the guard for the LightningModule and its optimizer and
swaps the optimizer the strategy steps for the guard's wrapped one. Lightning then calls
``optimizer.step(closure)`` as always: the closure runs ``training_step`` and
``backward`` (and Lightning's hooks), then the guard measures, clips and steps or skips,
exactly, with no host read beyond the guard's own. Each drain is written to the Trainer's
loggers as ``gradguard/*`` scalars; events also go to the ``gradguard`` Python logger. When
the guard sets ``should_stop`` (divergence), the callback stops the fit.

Under ``strategy="ddp"`` the guard is given DDP's process group, so the loss it logs and
detects on is the mean over the ranks and every rank takes the same decisions; under
``ModelParallelStrategy`` with ``fully_shard`` the gradients are DTensors and the guard
reduces their norms itself. ``FSDPStrategy`` (FSDP1) and ``DeepSpeedStrategy`` are refused.
See ``docs/integrations.md`` and ``docs/distributed.md`` for what is and is not supported.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
except ModuleNotFoundError as error:  # pragma: no cover - depends on the extras installed
    raise ModuleNotFoundError(
        f"{__name__} needs Lightning: pip install 'gradguard[lightning]'"
    ) from error

from gradguard.errors import ConfigError
from gradguard.guard import Guard, GuardedOptimizer
from gradguard.integrations._common import (
    LossFedOptimizer,
    TrainerSink,
    check_guard_options,
    ddp_group,
    guard_with_sink,
    log_event,
    refuse_double_clip,
)
from gradguard.records import Event, Window

__all__ = ["GradGuardCallback"]

_log = logging.getLogger(__name__)

_OWNED = {
    "scheduler": "Lightning steps the schedulers returned by configure_optimizers itself.",
    "scaler": "Lightning's precision plugin owns the GradScaler; use precision='bf16-mixed'.",
}


class GradGuardCallback(Callback):
    """Guard every optimizer step of a ``lightning.Trainer`` fit.

    Skipped steps leave the weights and the optimizer state bitwise unchanged, with any
    ``precision`` that has no GradScaler (32, bf16-mixed, bf16-true) and with
    ``accumulate_grad_batches`` (a NaN in any micro-batch makes the accumulated gradient
    non-finite, so the step is skipped). The loss given to the guard is the window's mean
    training loss, gathered on the device in ``on_before_backward``.

    Args:
        **guard_options: options of :class:`gradguard.Guard` (``clip``, ``nonfinite``,
            ``detectors``, ``recovery``, ``log_every``, ``run_dir``, ``on_event``,
            ``sinks``); not ``scheduler`` or ``scaler``, which Lightning owns.

    Attributes:
        guard: the guard of the current or last fit (None before the first).
    """

    def __init__(self, **guard_options: Any) -> None:
        check_guard_options(guard_options, _OWNED)
        self.guard_options = guard_options
        self.guard: Guard | None = None
        self._sink: _LoggerSink | None = None
        self._optimizer: torch.optim.Optimizer | None = None  # the one Lightning built
        self._loss: Tensor | None = None
        self._saved: Mapping[str, Any] | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the guard and make it the optimizer Lightning steps."""
        optimizer = _single_optimizer(trainer.strategy.optimizers)
        _check_trainer(trainer, self.guard_options)
        self._sink = _LoggerSink(trainer)
        # The guard measures the LightningModule, not Lightning's DDP wrapper around it.
        group = ddp_group(trainer.strategy.model)
        self.guard = guard_with_sink(pl_module, optimizer, self.guard_options, group, self._sink)
        if self._saved is not None:
            self.guard.load_state_dict(self._saved)
            self._saved = None
        self._optimizer = optimizer
        self._loss = None
        trainer.strategy.optimizers = [LossFedOptimizer(self.guard, self._take_loss)]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Number the guard's steps as Lightning logs them (restored after ``on_fit_start``).

        Lightning logs an optimizer step at the ``global_step`` its ``training_step`` ran
        at (0 for the first), so the guard's next step takes that number: its events,
        rows and run directory then carry the step of Lightning's own metrics.
        """
        if self.guard is not None:
            self.guard.step_count = trainer.global_step - 1

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        """Add this micro-batch's loss to the window's, on the device."""
        # Lightning divides the loss by accumulate_grad_batches before backward, so the
        # sum over an accumulation window is the window's mean loss.
        detached = loss.detach().float()
        self._loss = detached if self._loss is None else self._loss + detached

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Stop the fit when the guard says so (the ``Divergence`` detector, at a drain)."""
        if self.guard is not None and self.guard.should_stop:
            trainer.should_stop = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Drain the last steps to the loggers and give Lightning its optimizer back."""
        self._finish(trainer)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Drain what the guard buffered before the failure, so its events are logged."""
        self._finish(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Same as ``on_train_end``, for fits that ended another way."""
        self._finish(trainer)

    def state_dict(self) -> dict[str, Any]:
        """The guard's state, saved in Lightning checkpoints (drains first: one sync)."""
        if self.guard is None:
            return {}
        return {"guard": self.guard.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the guard's saved state; it is loaded when the guard is built."""
        self._saved = state_dict.get("guard")

    def _take_loss(self) -> Tensor | None:
        loss, self._loss = self._loss, None
        return loss

    def _finish(self, trainer: pl.Trainer) -> None:
        if self._optimizer is not None:
            trainer.strategy.optimizers = [self._optimizer]
            self._optimizer = None
        if self.guard is not None:
            self.guard.close()


class _LoggerSink(TrainerSink):
    """Writes each drain to the Trainer's loggers, and each event to the Python log.

    Steps are the guard's, which the callback numbers as Lightning does: the
    ``global_step`` at which that step's ``training_step`` ran (its own ``self.log`` calls
    use the same). Like Lightning's own metrics, a step is logged every
    ``log_every_n_steps``; skipped steps and events always are.
    """

    def __init__(self, trainer: pl.Trainer) -> None:
        self.trainer = trainer

    def write(self, window: Window, events: Sequence[Event]) -> None:
        """Log one drain: four or five scalars per logged step, a marker per event."""
        loggers = self.trainer.loggers
        # Trainer(log_every_n_steps=...): an attribute its logger connector sets; 0 = never
        every: int = getattr(self.trainer, "log_every_n_steps", 1)
        for i, guard_step in enumerate(window.steps):
            step = int(guard_step)
            if not window.skipped[i] and (every == 0 or (step + 1) % every):
                continue
            metrics = {
                "gradguard/grad_norm": float(window.grad_norm[i]),
                "gradguard/clipped_norm": float(window.clipped_norm[i]),
                "gradguard/scale": float(window.scale[i]),
                "gradguard/skipped": float(window.skipped[i]),
            }
            if window.loss_given[i]:
                metrics["gradguard/loss"] = float(window.loss[i])
            for logger in loggers:
                logger.log_metrics(metrics, step=step)
        for event in events:
            log_event(_log, event, self.trainer.is_global_zero)
            for logger in loggers:
                logger.log_metrics({f"gradguard/event/{event.kind}": 1.0}, event.step)
        for logger in loggers:
            logger.save()


def _single_optimizer(optimizers: Sequence[torch.optim.Optimizer]) -> torch.optim.Optimizer:
    if len(optimizers) != 1:
        raise ConfigError(
            f"GradGuardCallback guards one optimizer; configure_optimizers returned "
            f"{len(optimizers)}. With several optimizers (manual optimization), build one "
            "gg.Guard per optimizer and call guard.step() in training_step instead."
        )
    optimizer = optimizers[0]
    if isinstance(optimizer, GuardedOptimizer):
        raise ConfigError(
            "configure_optimizers returned a guarded optimizer and GradGuardCallback guards it "
            "again; return the plain optimizer and let the callback wrap it."
        )
    return optimizer


def _check_strategy(strategy: pl.strategies.Strategy) -> None:
    """Refuse strategies whose gradients or optimizer step the guard cannot see whole."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    if isinstance(strategy, FSDPStrategy):
        raise ConfigError(
            "GradGuardCallback does not support FSDPStrategy (FSDP1): each rank holds a flat "
            "shard of the gradients that is not a DTensor, so the guard would measure and decide "
            "on its own shard only and the ranks would disagree. Use ModelParallelStrategy and "
            "torch.distributed.fsdp.fully_shard in configure_model (FSDP2): the guard reduces "
            "the norms of its DTensor gradients over the ranks."
        )
    if isinstance(strategy, DeepSpeedStrategy):
        raise ConfigError(
            "GradGuardCallback does not support DeepSpeedStrategy: DeepSpeed steps inside its "
            "engine and keeps the gradients in its own partitions, out of the guard's reach."
        )


def _check_trainer(trainer: pl.Trainer, options: Mapping[str, Any]) -> None:
    _check_strategy(trainer.strategy)
    if getattr(trainer.precision_plugin, "scaler", None) is not None:
        raise ConfigError(
            f"GradGuardCallback does not support precision={trainer.precision!r}: its GradScaler "
            "skips overflowed steps before the guard sees them, so they would be missing from "
            "the guard's logs. Use precision='bf16-mixed' (or '32'), or a plain loop with "
            "gg.Guard(model, optimizer, scaler=scaler)."
        )
    if trainer.gradient_clip_val:
        refuse_double_clip(
            _log,
            options.get("clip"),
            f"both Trainer(gradient_clip_val={trainer.gradient_clip_val}) and "
            f"GradGuardCallback(clip={options.get('clip')!r}) clip the gradients; keep one: "
            "Trainer(gradient_clip_val=None) and the guard's policy is the one that logs "
            "the norm before clipping.",
            "gradguard: Lightning clips the gradients (gradient_clip_val=%s) before the guard "
            "measures them, so the logged norms are the clipped ones; prefer "
            "Trainer(gradient_clip_val=None) and GradGuardCallback(clip=gg.NormClip(%s)).",
            trainer.gradient_clip_val,
            trainer.gradient_clip_val,
        )
