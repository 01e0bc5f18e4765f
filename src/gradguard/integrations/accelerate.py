"""Accelerate: ``prepare_guard`` builds a :class:`gradguard.Guard` for a prepared training loop.

After ``accelerator.prepare``::

    guard = prepare_guard(accelerator, model, optimizer, clip=gg.NormClip(1.0))
    for x, y in loader:
        with accelerator.accumulate(model):
            loss = loss_fn(model(x), y)
            accelerator.backward(loss)
            guard.step(loss)            # instead of optimizer.step()
            optimizer.zero_grad()

``guard.step`` is called after every micro-batch, as ``optimizer.step()`` is in
Accelerate's own examples; the guard acts only when ``accelerator.sync_gradients`` says the
gradients are complete, so one optimizer step is measured, clipped, skipped and logged
once, with the mean loss of its micro-batches. The guard steps the optimizer inside the
``AcceleratedOptimizer`` itself, so a fused optimizer keeps the guard's sync-free skip.
The model is measured unwrapped (no DDP or compile wrapper in the layer names), and the
guard averages the loss over DDP's ranks.

Refused: DeepSpeed and Megatron-LM (they step inside their engine), FSDP1 (flat gradient
shards), ``accelerator.clip_grad_norm_`` or ``clip_grad_value_`` while the guard clips
(one of the two must clip, and the guard's policy logs the norm before clipping). See
``docs/integrations.md``.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

try:
    from accelerate import Accelerator  # type: ignore[import-untyped]
    from accelerate.optimizer import AcceleratedOptimizer  # type: ignore[import-untyped]
    from accelerate.scheduler import AcceleratedScheduler  # type: ignore[import-untyped]
    from accelerate.utils import DistributedType  # type: ignore[import-untyped]
except ModuleNotFoundError as error:  # pragma: no cover - depends on the extras installed
    raise ModuleNotFoundError(
        f"{__name__} needs accelerate: pip install 'gradguard[transformers]' (or accelerate)"
    ) from error

from gradguard.errors import ConfigError
from gradguard.guard import Guard
from gradguard.integrations._common import check_guard_options, ddp_group, with_group

__all__ = ["prepare_guard"]

_log = logging.getLogger(__name__)

_OWNED = {
    "accumulation_steps": "Accelerate decides which micro-batch completes the gradients "
    "(Accelerator(gradient_accumulation_steps=...)).",
    "scaler": "the Accelerator owns the GradScaler (mixed_precision='fp16').",
}
_CLIPS = ("clip_grad_norm_", "clip_grad_value_")


def prepare_guard(
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    scheduler: Any = None,
    **guard_options: Any,
) -> Guard:
    """Build the guard for a loop that ``accelerator.prepare``-d its model and optimizer.

    Args:
        accelerator: the loop's ``Accelerator``.
        model: the prepared model (or the original module).
        optimizer: the prepared ``AcceleratedOptimizer`` (or the optimizer it wraps).
        scheduler: an LR scheduler for the guard to step after each optimizer step that
            was taken (not after skipped ones): a prepared one, or a plain one. Leave it
            out to step it yourself.
        **guard_options: the other options of :class:`gradguard.Guard` (``clip``,
            ``nonfinite``, ``detectors``, ``recovery``, ``log_every``, ``run_dir``, ...);
            not ``accumulation_steps`` or ``scaler``, which the Accelerator owns.

    Returns:
        A guard whose ``step(loss)`` replaces ``optimizer.step()`` (and the scheduler's
        step when given) inside ``accelerator.accumulate``.

    Raises:
        ConfigError: an unsupported distributed type, or options the Accelerator owns.
    """
    if not isinstance(accelerator, Accelerator):
        raise ConfigError(
            f"prepare_guard needs the loop's accelerate.Accelerator, got "
            f"{type(accelerator).__name__}."
        )
    check_guard_options(guard_options, _OWNED, owner="prepare_guard")
    _check_distributed_type(accelerator)
    inner = optimizer.optimizer if isinstance(optimizer, AcceleratedOptimizer) else optimizer
    # The guard measures the module inside DDP, averaging the loss over DDP's group.
    options = with_group(guard_options, ddp_group(model))
    guard = Guard(
        accelerator.unwrap_model(model),
        inner,
        scheduler=_plain_scheduler(scheduler, accelerator),
        scaler=accelerator.scaler,
        accumulation_steps=_sync_gradients(accelerator),
        **options,
    )
    _watch_clipping(accelerator, guard)
    return guard


def _sync_gradients(accelerator: Accelerator) -> Callable[[], bool]:
    """Asked at each ``guard.step``: whether this micro-batch completes the gradients."""

    def sync_gradients() -> bool:
        return bool(accelerator.sync_gradients)

    return sync_gradients


def _check_distributed_type(accelerator: Accelerator) -> None:
    kind = accelerator.distributed_type
    if kind in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise ConfigError(
            f"prepare_guard does not support {kind.value}: it steps the optimizer inside its "
            "engine and keeps the gradients in its own partitions, out of the guard's reach."
        )
    if kind == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        if getattr(plugin, "fsdp_version", 1) != 2:
            raise ConfigError(
                "prepare_guard does not support FSDP1: each rank holds a flat shard of the "
                "gradients that is not a DTensor, so the ranks would decide on their own "
                "shards. Use FSDP2 (FullyShardedDataParallelPlugin(fsdp_version=2)), whose "
                "DTensor gradients the guard reduces over the ranks."
            )


def _plain_scheduler(scheduler: Any, accelerator: Accelerator) -> Any:
    """The LR scheduler inside a prepared one, when stepping it once per step is right."""
    if not isinstance(scheduler, AcceleratedScheduler):
        return scheduler
    if accelerator.num_processes > 1 and not scheduler.split_batches:
        raise ConfigError(
            "this prepared scheduler steps once per process at each optimizer step (Accelerate "
            "counts its steps for the whole dataset on each process), which the guard does not "
            "reproduce: pass the scheduler before accelerator.prepare, built for the steps each "
            "process takes, or leave scheduler= out and step the prepared one yourself."
        )
    return scheduler.scheduler


def _watch_clipping(accelerator: Accelerator, guard: Guard) -> None:
    """Refuse Accelerate's clipping while the guard clips; warn once when it does not.

    The accelerator's own ``clip_grad_norm_`` and ``clip_grad_value_`` are shadowed on this
    accelerator object, for as long as the guard is open.
    """
    guard_ref = weakref.ref(guard)
    warned: list[bool] = []
    for name in _CLIPS:
        original = getattr(type(accelerator), name).__get__(accelerator)

        def clip(*args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
            current = guard_ref()
            if current is not None and not current.closed:
                if current.clip is not None:
                    raise ConfigError(
                        f"accelerator.{_name}() and the guard's clip={current.clip!r} both clip "
                        f"the gradients; remove the accelerator.{_name}() call and keep the "
                        "guard's policy, which logs the norm before clipping."
                    )
                if not warned:
                    warned.append(True)
                    _log.warning(
                        "gradguard: accelerator.%s() clips the gradients before the guard "
                        "measures them, so the logged norms are the clipped ones; prefer "
                        "prepare_guard(..., clip=gg.NormClip(max_norm)).",
                        _name,
                    )
            return _original(*args, **kwargs)

        setattr(accelerator, name, clip)
